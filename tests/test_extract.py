"""Extraction: values equal the encoder's map, subsampling, resume after a kill, disk full,
refusal of mismatched stores, failing images. A random-weight `efficientnet-phantom` at
128x80 on 8 phantom images keeps every run to a few CPU seconds."""

from __future__ import annotations

import dataclasses
import errno
import filecmp
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mammo_sae.activations import store as store_format
from mammo_sae.activations.extract import ExtractConfig, extract, subsample_cells
from mammo_sae.activations.store import ActivationStore
from mammo_sae.data.images import RecordDataset
from mammo_sae.data.vindr import load_records
from mammo_sae.errors import DataError, StoreError
from mammo_sae.io import LOCK_NAME
from mammo_sae.models.checkpoints import load_encoder

ARCH = "efficientnet-phantom"
N_IMAGES = 8


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions run ~10x faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_dir(tiny_phantom: Path) -> Path:
    return tiny_phantom


def _cfg(data: Path, out: Path, **kw) -> ExtractConfig:
    base = dict(
        data=data,
        model=ARCH,
        out=out,
        split="all",
        image_size="128x80",
        dtype="float32",
        shard_images=2,
        batch_size=2,
        workers=0,
        max_images=N_IMAGES,
        seed=0,
    )
    base.update(kw)
    return ExtractConfig(**base)


@pytest.fixture(scope="module")
def reference(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted single-process extraction that other tests compare against."""
    return extract(_cfg(data_dir, tmp_path_factory.mktemp("ref") / "store"), progress=False)


def assert_same_store(a: Path, b: Path) -> None:
    """Shards, tables and manifests byte-identical (the settings carry no paths of `out`); the
    writer lock file (who wrote it last) is not part of the store."""
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name != LOCK_NAME)
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.name != LOCK_NAME)
    assert files_a == files_b
    for rel in files_a:
        assert filecmp.cmp(a / rel, b / rel, shallow=False), f"{rel} differs"


def test_store_holds_the_encoders_map(reference: Path, data_dir: Path) -> None:
    store = ActivationStore(reference)
    store.verify()
    encoder, _ = load_encoder(ARCH, seed=0)
    encoder.eval()
    records = load_records(data_dir)[:N_IMAGES]
    x_b3hw = torch.stack([RecordDataset(records, size_hw=(128, 80))[i][0] for i in (0, 5)])
    with torch.inference_mode():
        map_bchw = encoder.forward_features(x_b3hw, ["final"])["final"]
    h, w = map_bchw.shape[-2:]
    assert store.manifest["grid"] == [h, w] and store.d == map_bchw.shape[1]
    for j, i in enumerate((0, 5)):
        acts, rows, cols = store.image_patches(i)
        expected = map_bchw[j].permute(1, 2, 0).reshape(h * w, -1).numpy()
        np.testing.assert_allclose(acts, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
        assert rows.tolist() == np.repeat(np.arange(h), w).tolist()
        pooled = map_bchw[j].mean((1, 2)).numpy()
        np.testing.assert_allclose(
            store.pooled_nd[i], pooled, rtol=1e-4, atol=1e-4 * np.abs(pooled).max()
        )
    assert [r.image_id for r in store.records()] == [r.image_id for r in records]
    tissue = store.patch_tissue()
    assert np.all((tissue >= 0) & (tissue <= 1)) and 0 < tissue.mean() < 1
    assert store.manifest["model"]["kind"] == "random_init" and store.manifest["complete"]


def test_subsample_is_per_image_seeded_and_pooled_stays_full(
    reference: Path, data_dir: Path, tmp_path: Path
) -> None:
    path = extract(
        _cfg(data_dir, tmp_path / "sub", subsample=0.25, dtype="bfloat16"), progress=False
    )
    sub, full = ActivationStore(path), ActivationStore(reference)
    h, w = full.manifest["grid"]
    assert sub.manifest["subsample"] == {"fraction": 0.25, "seed": 0}
    assert set(sub.images["patch_count"]) == {round(0.25 * h * w)}
    assert np.array_equal(sub.pooled_nd, full.pooled_nd)  # full-map mean, float32, either way
    for i in (1, 6):
        acts, rows, cols = sub.image_patches(i)
        cells = rows * w + cols
        key = f"{sub.images.image_id[i]}/None"
        assert cells.tolist() == subsample_cells(h * w, 0.25, 0, key).tolist()
        expected = full.image_patches(i)[0][cells]
        np.testing.assert_allclose(acts, expected, rtol=1e-2, atol=1e-2 * np.abs(expected).max())


def test_augmentation_is_seeded_per_image(reference: Path, data_dir: Path, tmp_path: Path) -> None:
    a = ActivationStore(
        extract(_cfg(data_dir, tmp_path / "a", augment=True, max_images=4), progress=False)
    )
    b = ActivationStore(
        extract(
            _cfg(
                data_dir, tmp_path / "b", augment=True, max_images=4, shard_images=3, batch_size=1
            ),
            progress=False,
        )
    )
    plain = ActivationStore(reference)
    scale = np.abs(plain.pooled_nd).max()  # random weights give tiny maps: compare relatively
    np.testing.assert_allclose(
        a.pooled_nd, b.pooled_nd, rtol=1e-4, atol=1e-4 * scale
    )  # other batching
    changed = [
        np.abs(a.image_patches(i)[0] - plain.image_patches(i)[0]).max() > 1e-2 * scale
        for i in range(4)
    ]
    assert any(changed) and a.manifest["augment"] is True


def test_row_level_keeps_each_csv_row_with_image_labels(data_dir: Path, tmp_path: Path) -> None:
    rows = load_records(data_dir, level="row")
    assert len(rows) > len(load_records(data_dir))  # the fixture has multi-row images
    n = len(rows)
    store = ActivationStore(
        extract(
            _cfg(
                data_dir,
                tmp_path / "rows",
                level="row",
                max_images=n,
                subsample=0.1,
                shard_images=16,
                batch_size=8,
            ),
            progress=False,
        )
    )
    table = store.images
    assert store.n_images == n and table.row_index.tolist() == [r.row_index for r in rows]
    for image_id, group in table.groupby("image_id"):
        merged = {k: max(lab[k] for lab in group.labels) for k in group.labels.iloc[0]}
        assert all(il == merged for il in group.image_labels), image_id


def test_rerun_is_noop_and_other_settings_are_refused(reference: Path, data_dir: Path) -> None:
    def times() -> dict[Path, int]:
        return {p: p.stat().st_mtime_ns for p in reference.rglob("*") if p.name != LOCK_NAME}

    before = times()
    extract(_cfg(data_dir, reference), progress=False)
    assert before == times()
    with pytest.raises(StoreError, match=r"dtype: store has 'float32', requested 'float16'"):
        extract(_cfg(data_dir, reference, dtype="float16"), progress=False)
    with pytest.raises(StoreError, match=r"layer: store has 'final', requested 'blocks.2'.*"):
        extract(_cfg(data_dir, reference, layer="blocks.2"), progress=False)
    with pytest.raises(StoreError, match=r"model.init_seed"):
        extract(_cfg(data_dir, reference, seed=1), progress=False)
    with pytest.raises(StoreError, match=r"data.n_records"):
        extract(_cfg(data_dir, reference, max_images=N_IMAGES - 1), progress=False)


KILLER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from mammo_sae.activations import store
    from mammo_sae.activations.extract import ExtractConfig, extract

    original = store._save_npy
    def save_then_die(path, array):
        original(path, array)                        # shard 2's acts land under their final name
        if path.name == "00002.acts.npy":
            (path.parent / ".00002.patches.npy.x.tmp").write_bytes(b"half a file")
            os.kill(os.getpid(), signal.SIGKILL)     # ...and the process dies before the record
    store._save_npy = save_then_die
    extract(ExtractConfig(data=Path(sys.argv[1]), model="efficientnet-phantom", out=Path(sys.argv[2]),
                          split="all", image_size="128x80", dtype="float32", shard_images=2,
                          batch_size=2, workers=1, max_images=8, seed=0), progress=False)
""")


def test_killed_extraction_resumes_to_an_identical_store(
    reference: Path, data_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "killed"
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, str(data_dir), str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == -9, proc.stderr
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    assert (out / "shards" / "00001.json").is_file() and not (
        out / "shards" / "00002.json"
    ).exists()
    with pytest.raises(StoreError, match="incomplete"):
        ActivationStore(out)
    extract(_cfg(data_dir, out), progress=False)
    assert not list(out.rglob("*.tmp"))
    assert_same_store(reference, out)


def test_disk_full_gives_a_clean_error_and_a_resumable_store(
    reference: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_array = np.lib.format.write_array

    def fill_disk(f, array, **kw):
        if "00001.patches" in getattr(f, "name", ""):  # half written, then ENOSPC
            f.write(b"\x93NUMPY partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_array(f, array, **kw)

    monkeypatch.setattr(np.lib.format, "write_array", fill_disk)
    out = tmp_path / "full"
    with pytest.raises(StoreError, match=r"shard 00001.*No space left on device.*rerun to resume"):
        extract(_cfg(data_dir, out), progress=False)
    assert not list(out.rglob("*.tmp"))  # no half-written file left behind
    assert not (out / "shards" / "00001.patches.npy").exists()
    assert not (out / "shards" / "00001.json").exists()
    monkeypatch.setattr(np.lib.format, "write_array", write_array)
    extract(_cfg(data_dir, out), progress=False)
    assert_same_store(reference, out)


def test_failing_image_is_reported_by_id(data_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    victim = load_records(data)[3]
    Path(victim.path).write_bytes(b"not a png")
    with pytest.raises(DataError, match=victim.image_id):
        extract(_cfg(data, tmp_path / "stop"), progress=False)
    store = ActivationStore(extract(_cfg(data, tmp_path / "skip", on_error="skip"), progress=False))
    assert store.manifest["failed_images"] == [victim.image_id]
    assert store.ok_mask.tolist() == [i != 3 for i in range(N_IMAGES)]
    assert store.images.patch_count[3] == 0 and "cannot read image" in store.images.error[3]
    assert np.isnan(store.pooled_nd[3]).all() and np.isfinite(store.pooled_nd[store.ok_mask]).all()


def _with_image_id(data_dir: Path, out: Path, index: int, new_id: str) -> Path:
    """A copy of the dataset whose `index`-th image has CSV image_id `new_id`, plus a PNG where
    that id points (so an unchecked reader would open it)."""
    import pandas as pd

    shutil.copytree(data_dir, out)
    victim = load_records(out)[index]
    csv = out / "vindr_detection_v1_folds.csv"
    df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    df.loc[df["image_id"] == f"{victim.image_id}.png", "image_id"] = f"{new_id}.png"
    df.to_csv(csv, index=False)
    target = Path(os.path.normpath(out / "images_png" / victim.patient_id / f"{new_id}.png"))
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(victim.path, target)
    return out


def test_ids_that_are_paths_are_refused(data_dir: Path, tmp_path: Path) -> None:
    data = _with_image_id(data_dir, tmp_path / "d1" / "data", 1, "../../../outside")
    assert (tmp_path / "d1" / "outside.png").is_file()
    with pytest.raises(DataError, match=r"column 'image_id' row \d+ has '\.\./\.\./\.\./outside'"):
        extract(_cfg(data, tmp_path / "store"), progress=False)
    assert not (tmp_path / "store").exists()


def test_written_files_honour_the_umask(data_dir: Path, tmp_path: Path) -> None:
    from mammo_sae.models.checkpoints import save_model

    old = os.umask(0o022)
    try:
        store = extract(_cfg(data_dir, tmp_path / "store", max_images=2), progress=False)
        encoder, _ = load_encoder(ARCH, seed=0)
        model = save_model(encoder, tmp_path / "model")
    finally:
        os.umask(old)
    files = [p for root in (store, model) for p in root.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} >= {".json", ".npy", ".safetensors"}
    modes = {str(p): oct(p.stat().st_mode & 0o777) for p in files}
    assert modes == {str(p): "0o644" for p in files}


def test_bad_arguments_are_refused(data_dir: Path, tmp_path: Path) -> None:
    from mammo_sae.errors import MammoSaeError

    for kw, msg in [
        ({"subsample": 0.0}, "subsample"),
        ({"image_size": "12by8"}, "HxW"),
        ({"model": "resnet50"}, "efficientnet-phantom"),
        ({"layer": "head"}, "layer"),
    ]:
        with pytest.raises(MammoSaeError, match=msg):
            extract(_cfg(data_dir, tmp_path / "x", **kw), progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not empty"):
        extract(_cfg(data_dir, tmp_path / "busy"), progress=False)


def test_cli_extract(data_dir: Path, tmp_path: Path) -> None:
    from mammo_sae.cli import main

    cfg = dataclasses.asdict(_cfg(data_dir, tmp_path / "cli", max_images=2, dtype="bfloat16"))
    argv = ["extract"]
    for k, v in cfg.items():
        if v is not None and not isinstance(v, bool):
            argv += [f"--{k.replace('_', '-')}", str(v)]
    assert main(argv) == 0
    assert ActivationStore(tmp_path / "cli").n_images == 2
    assert main(argv[:-2] + ["--max-images", "3"]) == 2  # other settings → exit 2


def test_checkpoint_model_uses_the_classifiers_encoder(
    reference: Path, data_dir: Path, tmp_path: Path
) -> None:
    from mammo_sae.models.checkpoints import checkpoint_sha256, save_model
    from mammo_sae.models.classifier import ConceptClassifier

    encoder, _ = load_encoder(ARCH, seed=0)  # the reference store's weights
    clf_dir = save_model(ConceptClassifier(encoder, 1), tmp_path / "clf")
    enc_dir = save_model(encoder, tmp_path / "enc")
    for ckpt, kind in ((clf_dir, "classifier"), (enc_dir, "image_encoder")):
        store = ActivationStore(
            extract(_cfg(data_dir, tmp_path / kind, model=str(ckpt), max_images=2), progress=False)
        )
        assert store.manifest["model"]["kind"] == kind
        assert store.manifest["model"]["sha256"] == checkpoint_sha256(ckpt)
        # Same weights, same images; only float summation order may differ (batch composition).
        expected = ActivationStore(reference).pooled_nd[:2]
        np.testing.assert_allclose(
            store.pooled_nd, expected, rtol=0, atol=1e-5 * np.abs(expected).max()
        )


class _Corrupting(torch.nn.Module):
    """The phantom encoder with its final map scaled by `scale` or, with `nan_first`, a NaN in the
    first image of every batch: what a broken or mismatched checkpoint can produce."""

    def __init__(self, scale: float = 1.0, nan_first: bool = False) -> None:
        super().__init__()
        self.inner, _ = load_encoder(ARCH, seed=0)
        self.layer_info = self.inner.layer_info
        self.scale, self.nan_first = scale, nan_first

    def forward_features(self, x, layers):
        maps = self.inner.forward_features(x, layers)
        out = maps["final"] * self.scale
        if self.nan_first:
            out = out.clone()
            out[0, 0, 0, 0] = float("nan")
        return {**maps, "final": out}


def test_non_finite_activations_name_the_images(data_dir: Path, tmp_path: Path) -> None:
    cfg = _cfg(data_dir, tmp_path / "nan", max_images=4)
    with pytest.raises(StoreError, match=r"non-finite activations for image\(s\) \['[^,\]]+'\]"):
        extract(cfg, encoder=_Corrupting(nan_first=True), progress=False)
    assert not list((tmp_path / "nan").glob("shards/*.npy")), (
        "no shard written from a poisoned batch"
    )


def test_float16_overflow_is_refused_with_the_fix(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="beyond float16's range; use --dtype bfloat16"):
        extract(
            _cfg(data_dir, tmp_path / "big", max_images=2, dtype="float16"),
            encoder=_Corrupting(scale=1e20),
            progress=False,
        )
    # The same maps fit bfloat16.
    store = ActivationStore(
        extract(
            _cfg(data_dir, tmp_path / "bf", max_images=2, dtype="bfloat16"),
            encoder=_Corrupting(scale=1e20),
            progress=False,
        )
    )
    assert np.isfinite(store.pooled_nd).all()


def test_float16_underflow_is_refused_not_stored_as_zeros(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="float16 would store them as 0"):
        extract(
            _cfg(data_dir, tmp_path / "tiny", max_images=2, dtype="float16"),
            encoder=_Corrupting(scale=1e-20),
            progress=False,
        )
    assert not list((tmp_path / "tiny").glob("shards/*.npy"))


class _FailsOnCall(torch.nn.Module):
    """The phantom encoder that raises on its `fail_at`-th forward (a CUDA OOM, a crashed worker)."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.inner, _ = load_encoder(ARCH, seed=0)
        self.layer_info = self.inner.layer_info
        self.calls, self.fail_at = 0, fail_at

    def forward_features(self, x, layers):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("out of memory (simulated)")
        return self.inner.forward_features(x, layers)


def test_a_failing_forward_still_writes_the_batch_before_it(data_dir: Path, tmp_path: Path) -> None:
    """Host work lags the forward by one batch; when the next forward fails, the finished batch
    (here: all of shard 0) must still reach the store, so a rerun does not redo it."""
    cfg = _cfg(data_dir, tmp_path / "oom", max_images=4)  # 2 shards of 2 images, batch 2
    with pytest.raises(RuntimeError, match="simulated"):
        extract(cfg, encoder=_FailsOnCall(fail_at=2), progress=False)
    done = sorted(p.name for p in (tmp_path / "oom" / "shards").glob("*.json"))
    assert done == [f"{store_format.shard_name(0)}.json"], done


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(1, 3000),
    fraction=st.floats(1e-4, 1.0, allow_subnormal=False),
    seed=st.integers(0, 2**31),
    key=st.text(max_size=20),
)
def test_subsample_cells_is_a_seeded_sorted_subset_of_the_recorded_size(n, fraction, seed, key):
    cells = subsample_cells(n, fraction, seed, key)
    expected = n if fraction >= 1.0 else min(n, max(1, round(fraction * n)))
    assert len(cells) == expected  # ≥ 1 kept: no image loses all its patches
    assert np.all(np.diff(cells) > 0) and cells[0] >= 0 and cells[-1] < n
    assert np.array_equal(cells, subsample_cells(n, fraction, seed, key))  # resume-safe
