"""CLI commands of this subpackage: `mammo-sae extract`,
`mammo-sae store info|verify`."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from ..config import opt, progress_opt
from ..io import dumps_json
from .extract import ExtractConfig


@dataclass
class StoreInfoConfig:
    """Prints a store's manifest summary as JSON (images, patches, d, dtype, grid, model, layer,
    subsampling, skipped images, shards). Reads only the manifest: instant on any size."""

    store: Path = opt(help="activation store directory")


@dataclass
class StoreVerifyConfig:
    """Recomputes the SHA-256 of every file the manifest lists (shards, image table, pooled
    vectors) and fails, naming the file, on the first mismatch. Reads the whole store once:
    run it after copying a store or when a disk is suspect (training and analyses open stores
    without hashing them)."""

    store: Path = opt(help="activation store directory")
    progress: bool = progress_opt()


def run_extract(cfg: ExtractConfig) -> int:
    from .extract import extract
    from .store import ActivationStore

    path = extract(cfg, progress=cfg.progress)
    store = ActivationStore(path)
    failed = store.manifest.get("failed_images") or []
    print(
        f"{path}: {store.n_images} images, {store.n_patches} patches, d={store.d}, "
        f"{store.dtype}, grid={store.manifest.get('grid')}"
        + (f", {len(failed)} image(s) skipped" if failed else ""),
        file=sys.stderr,
    )
    return 0


def run_store_info(cfg: StoreInfoConfig) -> int:
    from .store import ActivationStore

    store = ActivationStore(cfg.store)
    m = store.manifest
    print(
        dumps_json(
            {
                "path": str(store.path),
                "n_images": store.n_images,
                "n_patches": store.n_patches,
                "d": store.d,
                "dtype": store.dtype,
                "grid": m.get("grid"),
                "layer": m.get("layer"),
                "model": m.get("model"),
                "split": m.get("split"),
                "level": m.get("level"),
                "subsample": m.get("subsample"),
                "augment": m.get("augment"),
                "failed_images": m.get("failed_images"),
                "n_shards": len(m.get("shards", [])),
                "manifest_sha256": store.manifest_sha256,
                "package_version": m.get("package_version"),
                "schema_version": m.get("schema_version"),
            }
        ),
        end="",
    )
    return 0


def run_store_verify(cfg: StoreVerifyConfig) -> int:
    from .store import ActivationStore

    store = ActivationStore(cfg.store)
    store.verify(progress=cfg.progress)
    print(
        f"{store.path}: every checksum matches ({len(store.manifest['shards'])} shards, "
        f"{store.n_patches} patches)",
        file=sys.stderr,
    )
    return 0
