"""docs/activation-store.md is the format spec: a freshly extracted store must match its tables
(manifest keys, image-table columns, patch-record fields, file layout, schema version)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from mammo_sae.activations import store as store_format
from mammo_sae.activations.extract import ExtractConfig, extract

SPEC = Path(__file__).resolve().parents[1] / "docs" / "activation-store.md"


def _table(section: str) -> dict[str, list[str]]:
    """First-column name (without backticks) → the other cells, for the table under `## section`."""
    text = SPEC.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(section)}.*?\n(.*?)(?=^## )", text, re.S | re.M)
    assert match, f"spec has no section {section!r}"
    rows = {}
    for line in match.group(1).splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        if line.startswith("|") and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells[1:]
    assert rows, f"section {section!r} has no table"
    return rows


@pytest.fixture(scope="module")
def store_dir(tiny_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return extract(
            ExtractConfig(
                data=tiny_phantom,
                model="efficientnet-phantom",
                out=tmp_path_factory.mktemp("spec") / "store",
                split="all",
                image_size="128x80",
                dtype="bfloat16",
                subsample=0.5,
                shard_images=2,
                workers=0,
                max_images=4,
            ),
            progress=False,
        )
    finally:
        torch.set_num_threads(threads)


def test_schema_version_matches_the_title() -> None:
    title = SPEC.read_text(encoding="utf-8").splitlines()[0]
    assert title.endswith(f"schema version {store_format.SCHEMA_VERSION}")


def test_manifest_keys_are_exactly_the_spec(store_dir: Path) -> None:
    spec = _table("manifest.json")
    manifest = json.loads((store_dir / "manifest.json").read_text())
    assert set(manifest) == set(spec)
    assert manifest["format"] == store_format.STORE_FORMAT and manifest["complete"] is True
    shard_words = set(re.findall(r"`(\w+)`", spec["shards"][1]))
    for shard in manifest["shards"]:
        nested = set(shard) | set(shard["files"]) | set(shard["sha256"])
        assert shard_words <= nested and set(shard) <= shard_words
    for key in ("model", "subsample", "data", "preprocessing"):
        documented = set(re.findall(r"`(\w+)`", spec[key][1]))
        assert set(manifest[key]) <= documented, key


def test_image_table_columns_are_exactly_the_spec(store_dir: Path) -> None:
    spec = list(_table("Image table"))
    table = json.loads((store_dir / "images.json").read_text())
    assert spec == table["columns"] == list(store_format.IMAGE_COLUMNS)
    assert all(list(row) == spec for row in table["rows"])
    assert list(store_format.ActivationStore(store_dir).images.columns) == spec


def test_patch_records_and_files_follow_the_spec(store_dir: Path) -> None:
    spec = _table("Patch records")
    assert list(spec) == list(store_format.PATCH_DTYPE.names)
    for name, (dtype, _) in spec.items():
        assert np.dtype(dtype.strip("`")) == store_format.PATCH_DTYPE[name]
    patterns = [re.compile(re.escape(p).replace("NNNNN", r"\d{5}") + "$") for p in _table("Files")]
    files = [p.relative_to(store_dir).as_posix() for p in store_dir.rglob("*") if p.is_file()]
    assert all(any(pat.match(f) for pat in patterns) for f in files), files
    assert all(any(pat.match(f) for f in files) for pat in patterns)
    acts = np.load(store_dir / "shards" / "00000.acts.npy", mmap_mode="r")
    assert acts.dtype == np.dtype("<u2")  # bfloat16 kept as raw bits, as the spec says
