"""Activation store: patch vectors of one encoder layer with provenance, on disk (spec v1).

Layout (see `docs/activation-store.md`, which this module follows):

    STORE/manifest.json              settings, shard list with checksums, `complete` flag
    STORE/images.json                image table (one row per extracted record)
    STORE/pooled.npy                 (n_images, d) float32 spatial mean of the FULL map
    STORE/shards/NNNNN.acts.npy      (n_patches_in_shard, d) vectors (float16 | float32 | bfloat16 bits)
    STORE/shards/NNNNN.patches.npy   structured (image_index i4, row i2, col i2, tissue f2)
    STORE/shards/NNNNN.pooled.npy    per-shard pooled rows (merged into pooled.npy)
    STORE/shards/NNNNN.json          shard record, written last: its presence marks the shard done

Shards are plain `.npy` so they memory-map with numpy alone; bfloat16 (which numpy lacks) is
stored as its raw uint16 bits and widened on read. Shard k always holds the same images
(a fixed block of `shard_images` consecutive records), whichever process wrote it, so a
resumed or multi-process extraction is identical to a single uninterrupted one.

Reading: `image_patches(i)` (memmapped), `iter_chunks()` (sequential), `stream()` (shuffled
batches from contiguous block reads through a bounded shuffle buffer; deterministic in
(seed, epoch, rank) and resumable at any batch), `load_all()` (whole store on a device).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MammoSaeError, StoreError
from ..io import (
    atomic_path,
    load_npy,
    portable_path,
    read_json,
    resolve_recorded,
    sha256_file,
    write_json,
)

SCHEMA_VERSION = 1
STORE_FORMAT = "mammo-sae-activation-store"
MANIFEST = "manifest.json"
IMAGES = "images.json"
POOLED = "pooled.npy"
SHARD_DIR = "shards"

DTYPES = ("float16", "bfloat16", "float32")
# On-disk numpy dtype per store dtype (bfloat16 is kept as its raw bits).
DISK_DTYPE = {"float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2"), "float32": np.dtype("<f4")}
PATCH_DTYPE = np.dtype([("image_index", "<i4"), ("row", "<i2"), ("col", "<i2"), ("tissue", "<f2")])

# Image-table columns, in order (the spec lists the same names).
IMAGE_COLUMNS = (
    "image_index",
    "image_id",
    "patient_id",
    "split",
    "path",
    "view",
    "laterality",
    "frame_hw",
    "series_id",
    "fold",
    "row_index",
    "labels",
    "image_labels",
    "boxes",
    "extra",
    "grid_h",
    "grid_w",
    "patch_offset",
    "patch_count",
    "shard",
    "ok",
    "error",
)


def shard_name(index: int) -> str:
    return f"{index:05d}"


def shard_files(index: int) -> dict[str, str]:
    """Relative paths of shard `index`'s files, keyed by role."""
    stem = f"{SHARD_DIR}/{shard_name(index)}"
    return {
        "acts": f"{stem}.acts.npy",
        "patches": f"{stem}.patches.npy",
        "pooled": f"{stem}.pooled.npy",
        "record": f"{stem}.json",
    }


def to_disk(acts_nd: Any, dtype: str) -> np.ndarray:
    """A torch tensor or numpy array → the on-disk numpy array of store dtype `dtype`."""
    import torch

    if dtype not in DTYPES:
        raise StoreError(f"unknown store dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    t = acts_nd if isinstance(acts_nd, torch.Tensor) else torch.from_numpy(np.asarray(acts_nd))
    t = t.detach().to("cpu")
    if dtype == "bfloat16":
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return t.to(getattr(torch, dtype)).contiguous().numpy()


def to_float32(disk_nd: np.ndarray, dtype: str) -> np.ndarray:
    """On-disk array (possibly a memmap slice) → a new float32 array."""
    if dtype == "bfloat16":  # widen in place: no uint32 temporary
        out = np.empty(disk_nd.shape, np.float32)
        bits = out.view(np.uint32)
        bits[...] = disk_nd
        bits <<= 16
        return out
    return np.asarray(disk_nd, dtype=np.float32)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())


def write_shard(
    root: Path,
    index: int,
    acts_pd: np.ndarray,
    patches_p: np.ndarray,
    pooled_nd: np.ndarray,
    image_rows: list[dict[str, Any]],
    *,
    dtype: str,
    image_start: int,
) -> dict[str, Any]:
    """Write one shard's files atomically, then its record (the completion marker).

    Any OSError (a full disk) surfaces as StoreError; files already renamed into place are
    harmless because a shard without its record is redone on resume.
    """
    files = shard_files(index)
    if acts_pd.dtype != DISK_DTYPE[dtype] or patches_p.dtype != PATCH_DTYPE:
        raise StoreError(
            f"shard {shard_name(index)}: arrays have dtypes {acts_pd.dtype}/"
            f"{patches_p.dtype}, expected {DISK_DTYPE[dtype]}/{PATCH_DTYPE}"
        )
    checksums: dict[str, str] = {}
    try:
        for role, array in (("acts", acts_pd), ("patches", patches_p), ("pooled", pooled_nd)):
            _save_npy(root / files[role], array)
            checksums[role] = sha256_file(root / files[role])
        record = {
            "schema_version": SCHEMA_VERSION,
            "index": index,
            "name": shard_name(index),
            "image_start": image_start,
            "image_stop": image_start + len(image_rows),
            "n_patches": int(len(acts_pd)),
            "d": int(acts_pd.shape[1]) if acts_pd.ndim == 2 else 0,
            "dtype": dtype,
            "files": {r: files[r] for r in ("acts", "patches", "pooled")},
            "sha256": checksums,
            "images": image_rows,
        }
        write_json(root / files["record"], record)
    except StoreError:
        raise
    except (OSError, MammoSaeError) as exc:  # atomic_path already removed the temporary file
        raise StoreError(
            f"could not write shard {shard_name(index)} of {root}: {exc}; "
            "finished shards are kept, fix the cause and rerun to resume"
        ) from exc
    return record


def read_shard_record(root: Path, index: int) -> dict[str, Any] | None:
    """The shard's record if the shard is complete (record + files of the right size), else None."""
    path = root / shard_files(index)["record"]
    if not path.is_file():
        return None
    try:
        record = read_json(path)
    except Exception:  # noqa: BLE001 - a torn record just means "redo this shard"
        return None
    for rel in record.get("files", {}).values():
        if not (root / rel).is_file():
            return None
    return record


def remove_stale_temporaries(root: Path, indices: Sequence[int]) -> None:
    """Delete temporary files a killed writer left behind for these shards."""
    shard_dir = root / SHARD_DIR
    if not shard_dir.is_dir():
        return
    for index in indices:
        for tmp in shard_dir.glob(f".{shard_name(index)}.*.tmp"):
            tmp.unlink(missing_ok=True)


def finalise(root: Path, manifest: dict[str, Any], n_shards: int) -> dict[str, Any]:
    """Merge complete shards into images.json + pooled.npy and mark the manifest complete."""
    records = []
    for index in range(n_shards):
        record = read_shard_record(root, index)
        if record is None:
            raise StoreError(
                f"{root}: shard {shard_name(index)} is missing or incomplete; "
                "rerun extract to finish it"
            )
        records.append(record)
    d = manifest["d"]
    rows: list[dict[str, Any]] = []
    pooled_parts = []
    shards = []
    patch_offset = 0
    for record in records:
        if record["d"] not in (0, d) or record["dtype"] != manifest["dtype"]:
            raise StoreError(
                f"{root}: shard {record['name']} has d={record['d']} dtype="
                f"{record['dtype']}, the store has d={d} dtype={manifest['dtype']}"
            )
        shard_patch_offset = patch_offset
        for row in record["images"]:
            row = dict(row, patch_offset=patch_offset, shard=record["index"])
            patch_offset += row["patch_count"]
            rows.append(row)
        pooled_parts.append(load_npy(root / record["files"]["pooled"]))
        shards.append(
            {
                "index": record["index"],
                "name": record["name"],
                "image_start": record["image_start"],
                "image_stop": record["image_stop"],
                "patch_offset": shard_patch_offset,
                "n_patches": record["n_patches"],
                "files": {r: record["files"][r] for r in ("acts", "patches")},
                "sha256": {r: record["sha256"][r] for r in ("acts", "patches")},
            }
        )
    for i, row in enumerate(rows):
        if row["image_index"] != i:
            raise StoreError(f"{root}: image table has a hole or duplicate at index {i}")
    pooled_nd = (
        np.concatenate(pooled_parts) if pooled_parts else np.zeros((0, d), np.float32)
    ).astype(np.float32)
    _save_npy(root / POOLED, pooled_nd)
    write_json(
        root / IMAGES,
        {
            "schema_version": SCHEMA_VERSION,
            "columns": list(IMAGE_COLUMNS),
            "rows": [{c: row.get(c) for c in IMAGE_COLUMNS} for row in rows],
        },
    )
    grids = {(r["grid_h"], r["grid_w"]) for r in rows if r["ok"]}
    manifest = dict(manifest)
    manifest.update(
        n_images=len(rows),
        n_patches=patch_offset,
        grid=list(next(iter(grids))) if len(grids) == 1 else None,
        failed_images=[r["image_id"] for r in rows if not r["ok"]],
        shards=shards,
        files={"images": IMAGES, "pooled": POOLED},
        sha256={"images": sha256_file(root / IMAGES), "pooled": sha256_file(root / POOLED)},
        complete=True,
    )
    write_json(root / MANIFEST, manifest)
    return manifest


# Manifest keys that define a store: a rerun whose values differ is refused.
SETTINGS_KEYS = (
    "model",
    "layer",
    "preprocessing",
    "dtype",
    "subsample",
    "augment",
    "level",
    "split",
    "data",
    "shard_images",
)
# ...except these, which may change without changing the content (files moved).
UNCOMPARED = ("model.source", "data.source")


def new_manifest(settings: dict[str, Any], *, d: int, n_records: int) -> dict[str, Any]:
    """The manifest written before the first shard (complete=False)."""
    from .. import __version__

    missing = [k for k in SETTINGS_KEYS if k not in settings]
    if missing:
        raise StoreError(f"store settings lack {missing}")
    shard_images = int(settings["shard_images"])
    return {
        "format": STORE_FORMAT,
        "schema_version": SCHEMA_VERSION,
        "package_version": __version__,
        "complete": False,
        **{k: settings[k] for k in SETTINGS_KEYS},
        "d": int(d),
        "n_records": int(n_records),
        "n_shards": -(-n_records // shard_images),
    }


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def settings_diff(existing: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Human-readable differences between an existing manifest's settings and wanted ones."""
    old = _flatten({k: existing.get(k) for k in (*SETTINGS_KEYS, "d")})
    new = _flatten({k: wanted.get(k) for k in (*SETTINGS_KEYS, "d")})
    return [
        f"{k}: store has {old.get(k)!r}, requested {new.get(k)!r}"
        for k in sorted(set(old) | set(new))
        if k not in UNCOMPARED and old.get(k) != new.get(k)
    ]


def image_row(
    image_index: int,
    record: Any,
    *,
    grid_hw: tuple[int, int],
    patch_count: int,
    image_labels: dict[str, int] | None = None,
    ok: bool = True,
    error: str | None = None,
    root: Path | None = None,
) -> dict[str, Any]:
    """One image-table row (patch_offset and shard are filled in by `finalise`). With the
    store's `root`, the image path is recorded by `portable_path` (relative to the store when
    the data lies beside it, as in a run directory)."""
    path = (
        None
        if record.path is None
        else (portable_path(record.path, root) if root is not None else str(record.path))
    )
    return {
        "image_index": int(image_index),
        "image_id": record.image_id,
        "patient_id": record.patient_id,
        "split": record.split,
        "path": path,
        "view": record.view,
        "laterality": record.laterality,
        "frame_hw": [int(v) for v in record.frame_hw],
        "series_id": record.series_id,
        "fold": record.fold,
        "row_index": record.row_index,
        "labels": dict(record.labels),
        "image_labels": dict(image_labels if image_labels is not None else record.labels),
        "boxes": [[b.concept, b.x0, b.y0, b.x1, b.y1] for b in record.boxes],
        "extra": dict(record.extra),
        "grid_h": int(grid_hw[0]),
        "grid_w": int(grid_hw[1]),
        "patch_offset": None,
        "patch_count": int(patch_count),
        "shard": None,
        "ok": bool(ok),
        "error": error,
    }


def write_store(
    path: str | os.PathLike[str],
    acts: Sequence[np.ndarray],
    *,
    grids: Sequence[tuple[int, int]] | None = None,
    positions: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
    pooled_nd: np.ndarray | None = None,
    records: Sequence[Any] | None = None,
    dtype: str = "float32",
    shard_images: int = 64,
    settings: dict[str, Any] | None = None,
) -> ActivationStore:
    """Build a complete store from in-memory per-image arrays (tests, synthetic data, imports).

    `acts[i]` is image i's (p_i, d) patch matrix; by default its patches are the full grid
    `grids[i]` (or 1 × p_i) in row-major order and `pooled_nd` is their mean. An image with
    no patches is stored like one extraction skipped (ok = false, pooled NaN).
    """
    from ..data.records import ImageRecord

    root = Path(path)
    if (root / MANIFEST).exists():
        raise StoreError(f"{root} already holds a store; choose another path")
    if not acts:
        raise StoreError("write_store: no images given")
    d = int(acts[0].shape[1])
    for i, a in enumerate(acts):
        if a.ndim != 2 or a.shape[1] != d:
            raise StoreError(f"write_store: image {i} has shape {a.shape}, expected (p, {d})")
        if not np.all(np.isfinite(a)):
            raise StoreError(f"write_store: image {i} has non-finite values")
    n = len(acts)
    grids = list(grids) if grids is not None else [(1, len(a)) for a in acts]
    if positions is None:
        positions = [(np.repeat(np.arange(h), w), np.tile(np.arange(w), h)) for h, w in grids]
    if records is None:
        records = [
            ImageRecord(
                image_id=f"img{i:05d}",
                patient_id=f"p{i:05d}",
                split="training",
                path=None,
                labels={},
            )
            for i in range(n)
        ]
    if pooled_nd is None:  # an image without patches has no mean: NaN, as a skipped image
        pooled_nd = np.stack(
            [a.astype(np.float64).mean(0) if len(a) else np.full(d, np.nan) for a in acts]
        ).astype(np.float32)
    if len(records) != n or len(grids) != n or len(positions) != n or pooled_nd.shape != (n, d):
        raise StoreError(
            "write_store: acts, grids, positions, records and pooled_nd disagree in length"
        )
    base = {
        "model": {"arch": "synthetic", "source": None, "sha256": None},
        "layer": "synthetic",
        "preprocessing": {},
        "dtype": dtype,
        "subsample": {"fraction": 1.0, "seed": 0},
        "augment": False,
        "level": "image",
        "split": "all",
        "data": {"source": None, "n_records": n},
        "shard_images": int(shard_images),
    }
    base.update(settings or {})
    manifest = new_manifest(base, d=d, n_records=n)
    write_json(root / MANIFEST, manifest)
    for k in range(manifest["n_shards"]):
        lo, hi = k * shard_images, min(n, (k + 1) * shard_images)
        metas = []
        for i in range(lo, hi):
            rows, cols = positions[i]
            meta = np.zeros(len(acts[i]), PATCH_DTYPE)
            meta["image_index"], meta["row"], meta["col"] = i, rows, cols
            meta["tissue"] = np.nan
            metas.append(meta)
        image_rows = [
            image_row(
                i,
                records[i],
                grid_hw=grids[i],
                patch_count=len(acts[i]),
                ok=len(acts[i]) > 0,
                error=None if len(acts[i]) else "no patch vectors",
            )
            for i in range(lo, hi)
        ]
        write_shard(
            root,
            k,
            to_disk(np.concatenate(acts[lo:hi]), dtype),
            np.concatenate(metas),
            pooled_nd[lo:hi].astype(np.float32),
            image_rows,
            dtype=dtype,
            image_start=lo,
        )
    finalise(root, manifest, manifest["n_shards"])
    return ActivationStore(root)


@dataclasses.dataclass
class _Shard:
    index: int
    patch_offset: int
    n_patches: int
    acts: np.ndarray  # memmap (n, d) disk dtype — random access by image
    patches: np.ndarray  # memmap structured PATCH_DTYPE
    acts_path: Path
    fd: int | None = None  # opened on first sequential read

    def read_rows(self, lo: int, hi: int, out: np.ndarray) -> None:
        """Read rows [lo, hi) into `out` with positional reads, not through the memmap, so a
        streaming pass over a store larger than RAM does not grow the process's resident set."""
        if self.fd is None:
            self.fd = os.open(self.acts_path, os.O_RDONLY)
        row_bytes = self.acts.shape[1] * self.acts.dtype.itemsize
        view = memoryview(out).cast("B")
        start = int(self.acts.offset) + lo * row_bytes
        done = 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], start + done)
            if n <= 0:
                raise StoreError(f"{self.acts_path}: truncated (wanted rows {lo}..{hi})")
            done += n

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class ActivationStore:
    """Read side of an activation store (memory-mapped; never loads it whole unless asked)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not self.path.exists():
            raise StoreError(f"activation store not found: {self.path}")
        if not manifest_path.is_file():
            raise StoreError(f"not an activation store (no {MANIFEST}): {self.path}")
        self.manifest: dict[str, Any] = read_json(manifest_path)
        m = self.manifest
        if m.get("format") != STORE_FORMAT:
            raise StoreError(
                f"{manifest_path}: format {m.get('format')!r}, expected {STORE_FORMAT!r}"
            )
        if m.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(
                f"{manifest_path}: schema_version {m.get('schema_version')!r}; "
                f"this mammo-sae reads version {SCHEMA_VERSION}"
            )
        if not m.get("complete"):
            raise StoreError(
                f"store {self.path} is incomplete (extraction interrupted); "
                "rerun the same extract command to resume it"
            )
        if m.get("dtype") not in DTYPES:
            raise StoreError(
                f"{manifest_path}: unknown dtype {m.get('dtype')!r}; valid: {', '.join(DTYPES)}"
            )
        self.d: int = int(m["d"])
        self.dtype: str = m["dtype"]
        self.n_images: int = int(m["n_images"])
        self.n_patches: int = int(m["n_patches"])
        self._shards = [self._open_shard(s) for s in m["shards"]]
        self._shard_offsets = np.array(
            [s.patch_offset for s in self._shards] + [self.n_patches], dtype=np.int64
        )
        if sum(s.n_patches for s in self._shards) != self.n_patches:
            raise StoreError(f"{manifest_path}: shard patch counts do not add up to n_patches")

    def _open_shard(self, entry: dict[str, Any]) -> _Shard:
        acts_path = self.path / entry["files"]["acts"]
        patches_path = self.path / entry["files"]["patches"]
        for p in (acts_path, patches_path):
            if not p.is_file():
                raise StoreError(f"store {self.path}: shard file missing: {p}")
        try:
            acts, patches = load_npy(acts_path, mmap=True), load_npy(patches_path, mmap=True)
        except MammoSaeError as exc:
            raise StoreError(
                f"store {self.path}: {exc}; `mammo-sae extract` with the same "
                "arguments rewrites nothing of a complete store: re-extract into "
                "a new --out"
            ) from exc
        n = int(entry["n_patches"])
        if acts.dtype != DISK_DTYPE[self.dtype] or acts.shape != (n, self.d):
            raise StoreError(
                f"shard {acts_path}: holds {acts.dtype} {acts.shape}, the manifest says "
                f"{DISK_DTYPE[self.dtype]} ({n}, {self.d}) (dimension/dtype mismatch)"
            )
        if patches.dtype != PATCH_DTYPE or patches.shape != (n,):
            raise StoreError(
                f"shard {patches_path}: holds {patches.dtype} {patches.shape}, "
                f"expected {PATCH_DTYPE} ({n},)"
            )
        return _Shard(int(entry["index"]), int(entry["patch_offset"]), n, acts, patches, acts_path)

    # ----------------------------------------------------------------- provenance
    @cached_property
    def manifest_sha256(self) -> str:
        return sha256_file(self.path / MANIFEST)

    def verify(self, progress: bool = False) -> None:
        """Recompute every checksum; raise StoreError naming the first corrupted file."""
        from tqdm import tqdm

        expected = [(self.manifest["files"][k], v) for k, v in self.manifest["sha256"].items()]
        for s in self.manifest["shards"]:
            expected += [(s["files"][role], s["sha256"][role]) for role in ("acts", "patches")]
        missing = [rel for rel, _ in expected if not (self.path / rel).is_file()]
        if missing:
            raise StoreError(f"store {self.path}: file missing: {missing[0]}")
        total = sum((self.path / rel).stat().st_size for rel, _ in expected)
        with tqdm(
            total=total, unit="B", unit_scale=True, desc="verify", disable=not progress
        ) as bar:
            for rel, sha in expected:
                if sha256_file(self.path / rel) != sha:
                    raise StoreError(
                        f"store {self.path}: checksum mismatch in {rel} (corrupted file)"
                    )
                bar.update((self.path / rel).stat().st_size)

    @cached_property
    def _image_rows(self) -> list[dict[str, Any]]:
        table = read_json(self.path / IMAGES)
        rows = table.get("rows") if isinstance(table, dict) else None
        if not isinstance(rows, list) or len(rows) != self.n_images:
            raise StoreError(f"{self.path / IMAGES}: expected {self.n_images} rows")
        return rows

    @cached_property
    def images(self) -> Any:
        """Image table as a pandas DataFrame (columns: IMAGE_COLUMNS), row i = image_index i."""
        import pandas as pd

        return pd.DataFrame(self._image_rows, columns=list(IMAGE_COLUMNS))

    @cached_property
    def pooled_nd(self) -> np.ndarray:
        pooled = load_npy(self.path / POOLED)
        if pooled.shape != (self.n_images, self.d):
            raise StoreError(
                f"{self.path / POOLED}: shape {pooled.shape}, expected {(self.n_images, self.d)}"
            )
        return pooled.astype(np.float32, copy=False)

    def records(self) -> list[Any]:
        """`ImageRecord`s rebuilt from the table (boxes in the extracted model-input frame)."""
        from ..data.records import Box, ImageRecord

        out = []
        for row in self._image_rows:
            out.append(
                ImageRecord(
                    image_id=row["image_id"],
                    patient_id=row["patient_id"],
                    split=row["split"],
                    path=resolve_recorded(row["path"], self.path) if row["path"] else None,
                    labels=dict(row["labels"]),
                    boxes=tuple(Box(b[0], *map(float, b[1:5])) for b in row["boxes"]),
                    view=row["view"],
                    laterality=row["laterality"],
                    frame_hw=tuple(row["frame_hw"]),
                    series_id=row["series_id"],
                    fold=row["fold"],
                    row_index=row["row_index"],
                    extra=dict(row["extra"]),
                )
            )
        return out

    @property
    def ok_mask(self) -> np.ndarray:
        """Boolean (n_images,): False for images that failed to load (skipped; pooled row NaN)."""
        return np.array([bool(r["ok"]) for r in self._image_rows], dtype=bool)

    def grid_hw(self, i: int) -> tuple[int, int]:
        row = self._image_rows[i]
        return int(row["grid_h"]), int(row["grid_w"])

    # ----------------------------------------------------------------- random access
    def _locate(self, i: int) -> tuple[_Shard, int, int]:
        if not 0 <= i < self.n_images:
            raise IndexError(f"image index {i} out of range [0, {self.n_images})")
        row = self._image_rows[i]
        shard = self._shards[row["shard"]]
        lo = int(row["patch_offset"]) - shard.patch_offset
        return shard, lo, lo + int(row["patch_count"])

    def image_patches(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(acts_pd, rows_p, cols_p) of image i; acts are a memmap view unless stored as bfloat16."""
        shard, lo, hi = self._locate(i)
        acts = shard.acts[lo:hi]
        if self.dtype == "bfloat16":
            acts = to_float32(acts, self.dtype)
        meta = shard.patches[lo:hi]
        return acts, np.asarray(meta["row"], np.int64), np.asarray(meta["col"], np.int64)

    def image_tissue(self, i: int) -> np.ndarray:
        """Breast-tissue fraction (0..1) under each stored patch of image i (NaN if unknown)."""
        shard, lo, hi = self._locate(i)
        return np.asarray(shard.patches[lo:hi]["tissue"], np.float32)

    def patch_tissue(self) -> np.ndarray:
        """Tissue fraction of every patch, in store order (n_patches,) float32."""
        return np.concatenate(
            [np.asarray(s.patches["tissue"], np.float32) for s in self._shards]
            or [np.zeros(0, np.float32)]
        )

    # ----------------------------------------------------------------- sequential
    def iter_chunks(
        self, chunk_patches: int = 65536
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """Store order: (acts_nd float32, image_index_n, row_n, col_n), ≤ chunk_patches each.

        Memory ≈ chunk_patches × d × (4 + itemsize) bytes, whatever the store size."""
        if chunk_patches < 1:
            raise StoreError(f"chunk_patches must be ≥ 1, got {chunk_patches}")
        for shard in self._shards:
            for lo in range(0, shard.n_patches, chunk_patches):
                hi = min(lo + chunk_patches, shard.n_patches)
                meta = np.asarray(shard.patches[lo:hi])
                block = np.empty((hi - lo, self.d), DISK_DTYPE[self.dtype])
                shard.read_rows(lo, hi, block)
                yield (
                    to_float32(block, self.dtype),
                    meta["image_index"].astype(np.int64),
                    meta["row"].astype(np.int64),
                    meta["col"].astype(np.int64),
                )

    def load_all(self, device: Any = "cpu", dtype: Any = None) -> Any:
        """The whole store as one (n_patches, d) tensor on `device` (when it fits)."""
        import torch

        dtype = dtype or torch.float32
        out = torch.empty((self.n_patches, self.d), dtype=dtype, device=device)
        for shard in self._shards:
            for lo in range(0, shard.n_patches, 1 << 16):
                hi = min(lo + (1 << 16), shard.n_patches)
                block = np.empty((hi - lo, self.d), DISK_DTYPE[self.dtype])
                shard.read_rows(lo, hi, block)
                block = _disk_to_torch(block, self.dtype)
                out[shard.patch_offset + lo : shard.patch_offset + hi] = block.to(device, dtype)
        return out

    # ----------------------------------------------------------------- shuffled stream
    def patches_per_rank(self, world_size: int = 1) -> int:
        return self.n_patches // world_size

    def batches_per_epoch(
        self, batch_size: int, world_size: int = 1, drop_last: bool = False
    ) -> int:
        per_rank = self.patches_per_rank(world_size)
        return per_rank // batch_size if drop_last else -(-per_rank // batch_size)

    def stream(
        self,
        batch_size: int,
        *,
        seed: int,
        epoch: int,
        start_batch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        buffer_patches: int = 2**20,
        drop_last: bool = False,
        block_patches: int | None = None,
        raw: bool = False,
    ) -> Iterator[Any]:
        """Shuffled float32 (B, d) batches of one epoch for `rank` of `world_size`.

        Contiguous blocks of `block_patches` are read in a seeded random order (each rank gets
        an equal, disjoint share of that order) into a buffer of `buffer_patches`; when it is
        full it is permuted, half is served (batch by batch, straight from the buffer) and half
        kept. Memory ≈ 1.5 × buffer_patches × d × itemsize whatever the store size. The order is a pure function of
        (seed, epoch, rank, world_size, batch_size, buffer_patches, block_patches); starting at
        `start_batch` replays the bookkeeping without reading skipped data, so a trainer resumes
        exactly. `raw=True` yields the store dtype (float16/bfloat16) without the float32 copy,
        for a trainer that converts on its device (half the host memory traffic).
        """
        _check_stream_args(batch_size, rank, world_size, buffer_patches, start_batch)
        block = block_patches or int(np.clip(buffer_patches // 16, 64, 1 << 16))
        n_batches = self.batches_per_epoch(batch_size, world_size, drop_last)
        total = min(self.patches_per_rank(world_size), n_batches * batch_size)
        skip = min(start_batch * batch_size, total)
        rng = np.random.default_rng([seed, epoch, rank, 0x5EED])
        capacity = max(buffer_patches, batch_size, 2)  # a cycle serves half: ≥ 1 row
        disk_dtype = DISK_DTYPE[self.dtype]

        def convert(block: np.ndarray) -> Any:
            return _disk_to_torch(block, self.dtype, raw=raw)

        buf_idx = np.empty(capacity, np.int64)  # global patch index of each buffered row
        # Data is only read once the skipped prefix is behind us (bookkeeping-only until then).
        buf_data = np.empty((capacity, self.d), disk_dtype) if skip == 0 else None
        n_in = 0
        served = 0  # patches passed on (skipped or yielded)
        carry = np.empty((0, self.d), disk_dtype)  # < batch_size rows awaiting a full batch

        def cycle(final: bool) -> Iterator[Any]:
            nonlocal n_in, buf_data, served, carry
            perm = rng.permutation(n_in)
            half = n_in if final else n_in // 2
            first = 0
            if buf_data is None and served + half > skip:
                buf_data = np.empty((capacity, self.d), disk_dtype)
                buf_data[:n_in] = self._gather(buf_idx[:n_in])
                first = skip - served
                served = skip
            take = min(half - first, total - served)
            served += take
            if buf_data is not None and take > 0:
                # Batches are gathered from the buffer one at a time (no copy of the served half).
                sel = perm[first : first + take]
                pos = 0
                if len(carry):  # complete the partial batch left by the previous cycle
                    pos = min(batch_size - len(carry), take)
                    carry = np.concatenate([carry, buf_data[sel[:pos]]])
                    if len(carry) == batch_size:
                        yield convert(carry)
                        carry = carry[:0]
                n_full = (take - pos) // batch_size
                for b in range(n_full):
                    yield convert(buf_data[sel[pos + b * batch_size : pos + (b + 1) * batch_size]])
                rest = sel[pos + n_full * batch_size :]
                if len(rest):
                    carry = buf_data[rest]
            kept = perm[half:]
            buf_idx[: len(kept)] = buf_idx[kept]
            if buf_data is not None:
                buf_data[: len(kept)] = buf_data[kept]
            n_in = len(kept)

        for shard, lo, hi in self._rank_pieces(seed, epoch, rank, world_size, block):
            pos = lo
            while pos < hi and served < total:
                take = min(hi - pos, capacity - n_in)
                buf_idx[n_in : n_in + take] = np.arange(pos, pos + take) + shard.patch_offset
                if buf_data is not None:
                    shard.read_rows(pos, pos + take, buf_data[n_in : n_in + take])
                n_in += take
                pos += take
                if n_in == capacity:
                    yield from cycle(final=False)
        if n_in and served < total:
            yield from cycle(final=True)
        if len(carry) and not drop_last:
            yield convert(carry)

    def _rank_pieces(
        self, seed: int, epoch: int, rank: int, world_size: int, block: int
    ) -> list[tuple[_Shard, int, int]]:
        """Contiguous (shard, lo, hi) reads of this rank: its share of a seeded block order."""
        blocks = [
            (s, lo, min(lo + block, s.n_patches))
            for s in self._shards
            for lo in range(0, s.n_patches, block)
        ]
        order = np.random.default_rng([seed, epoch, 0xB10C]).permutation(len(blocks))
        per_rank = self.patches_per_rank(world_size)
        start, stop = rank * per_rank, (rank + 1) * per_rank
        pieces, pos = [], 0
        for b in order:
            shard, lo, hi = blocks[b]
            a, z = max(start, pos), min(stop, pos + hi - lo)
            if a < z:
                pieces.append((shard, lo + a - pos, lo + z - pos))
            pos += hi - lo
            if pos >= stop:
                break
        return pieces

    def _gather(self, global_idx: np.ndarray) -> np.ndarray:
        """Rows at arbitrary global patch indices (sorted reads per shard), in the given order."""
        out = np.empty((len(global_idx), self.d), DISK_DTYPE[self.dtype])
        shard_of = np.searchsorted(self._shard_offsets, global_idx, side="right") - 1
        for k in np.unique(shard_of):
            sel = np.nonzero(shard_of == k)[0]
            local = global_idx[sel] - self._shards[k].patch_offset
            order = np.argsort(local)
            out[sel[order]] = self._shards[k].acts[local[order]]
        return out

    def close(self) -> None:
        """Close file handles of sequential reads (memmaps close with the object)."""
        for shard in self._shards:
            shard.close()

    def __del__(self) -> None:
        for shard in getattr(self, "_shards", ()):
            shard.close()

    def __repr__(self) -> str:
        return (
            f"ActivationStore({str(self.path)!r}, n_images={self.n_images}, "
            f"n_patches={self.n_patches}, d={self.d}, dtype={self.dtype})"
        )


def _check_stream_args(
    batch_size: int, rank: int, world_size: int, buffer_patches: int, start_batch: int
) -> None:
    if batch_size < 1 or buffer_patches < 1 or start_batch < 0:
        raise StoreError(
            f"stream: batch_size ({batch_size}) and buffer_patches ({buffer_patches}) "
            f"must be ≥ 1 and start_batch ({start_batch}) ≥ 0"
        )
    if not 0 <= rank < world_size:
        raise StoreError(f"stream: rank {rank} is not in [0, world_size={world_size})")


def _disk_to_torch(disk_nd: np.ndarray, dtype: str, raw: bool = False) -> Any:
    """On-disk rows → torch float32, or (raw) the store dtype without a copy."""
    import torch

    t = torch.from_numpy(
        np.ascontiguousarray(disk_nd).view(np.int16 if dtype == "bfloat16" else disk_nd.dtype)
    )
    if dtype == "bfloat16":
        t = t.view(torch.bfloat16)
    return t if raw else t.float()
