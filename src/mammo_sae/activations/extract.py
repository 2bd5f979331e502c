"""Encoder layer → activation store: resumable, bounded in memory, torchrun-aware.

The records are cut into fixed blocks of `shard_images` (shard k = records
[k·S, (k+1)·S)); batches never straddle a shard, so a shard's bytes do not depend on which
process wrote it or on what ran before. Under torchrun, rank r writes shards k ≡ r (mod
world size) and rank 0 merges them. A shard is done when its record file exists (written
last, atomically); a rerun skips done shards, redoes the rest and then finalises.

Images are decoded (and their breast mask pooled to the feature grid) in DataLoader workers
while the main process runs the forward pass; shard files are written by a background
thread, so neither disk nor decoding stalls the accelerator.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import random
import sys
import warnings
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..config import check_bounds, device_opt, opt, parse_image_size, progress_opt
from ..devices import DistContext, resolve_device
from ..errors import DataError, MammoSaeError, StoreError, choices_message
from ..io import LOCK_NAME, portable_path, read_json, sha256_json, write_json, writer_lock
from . import store as store_format

SPLIT_CHOICES = ("training", "test", "all")
MIN_IMAGE_SIDE = 32


@dataclass
class ExtractConfig:
    """Hook one layer of an encoder and write every image's patch vectors to a store.

    Rerunning the same command resumes an interrupted extraction (finished shards are kept)
    and is a no-op on a complete store; a store made with other settings is refused. Run
    under `torchrun --nproc_per_node N -m mammo_sae.cli extract ...` to split the images over
    N processes. --augment applies the training augmentation (the reference did; off by
    default), seeded per image so a resumed run is identical.
    """

    data: Path = opt(help="data directory (folds CSV + images) or a CSV file")
    model: str = opt(
        help="checkpoint (classifier → its encoder, or image encoder) or an arch "
        "name for a seeded random-weight encoder"
    )
    out: Path = opt(help="store directory")
    layer: str = opt("final", help="layer tap: final | stem | blocks.N")
    split: Literal["training", "test", "all"] = opt("training", help="which split to extract")
    level: Literal["image", "row"] = opt(
        "image", help="one entry per image, or per CSV row (the reference's row-level duplicates)"
    )
    dtype: Literal["float16", "bfloat16", "float32"] = opt("float16", help="stored vector dtype")
    subsample: float = opt(
        1.0, gt=0.0, max=1.0, help="fraction of each image's patches kept (the reference: 0.25)"
    )
    seed: int = opt(0, help="seed of the per-image subsample, augmentation and random weights")
    augment: bool = opt(False, help="apply the training augmentation while extracting")
    image_size: list[int] | None = opt(
        None, help="resize inputs to HxW or H,W (e.g. 512x320); default: as stored"
    )
    batch_size: int = opt(8, min=1, help="images per forward pass")
    workers: int = opt(2, min=0, help="DataLoader worker processes decoding images")
    shard_images: int = opt(256, min=1, help="images per shard (the unit of resumption)")
    on_error: Literal["stop", "skip"] = opt(
        "stop",
        help="an image that fails to load: stop, or skip it (kept in the table with ok=false)",
    )
    max_images: int | None = opt(None, min=1, help="extract only the first N records")
    device: str = device_opt()
    autocast: bool = opt(False, help="bfloat16 autocast forward on CUDA (faster, not bit-faithful)")
    progress: bool = progress_opt()


# --------------------------------------------------------------------------- helpers


def parse_size(value: Any) -> tuple[int, int] | None:
    """--image-size as (H, W), at least MIN_IMAGE_SIDE a side (the encoders downsample 32×)."""
    return parse_image_size(value, min_side=MIN_IMAGE_SIDE)


def subsample_cells(n_cells: int, fraction: float, seed: int, key: str) -> np.ndarray:
    """Sorted cell indices (row-major) kept for one image: seeded by (seed, image key)."""
    if fraction >= 1.0:
        return np.arange(n_cells)
    k = min(n_cells, max(1, int(round(fraction * n_cells))))
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    return np.sort(rng.choice(n_cells, size=k, replace=False))


def tissue_grid(mask_hw: torch.Tensor | None, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Fraction of breast-mask pixels in each cell of the map's grid laid evenly over the input
    (static SAME padding makes the grid differ from ceil(H/stride), so cells are not exact
    stride windows); NaN when the mask is unknown."""
    if mask_hw is None:
        return torch.full(grid_hw, float("nan"))
    return torch.nn.functional.adaptive_avg_pool2d(mask_hw.float()[None, None], grid_hw)[0, 0]


def _image_key(record: Any) -> str:
    return f"{record.image_id}/{record.row_index}"


def _scale_record(record: Any, size_hw: tuple[int, int] | None) -> Any:
    """Record with boxes and frame in the extracted input frame (plain resize to size_hw)."""
    if size_hw is None or tuple(record.frame_hw) == tuple(size_hw):
        return record
    from ..data.images import scale_boxes

    return dataclasses.replace(
        record, boxes=scale_boxes(record.boxes, record.frame_hw, size_hw), frame_hw=tuple(size_hw)
    )


def _image_level_labels(records: Sequence[Any]) -> list[dict[str, int]]:
    """Per record, each label maxed over all records of the same image (any row positive)."""
    merged: dict[str, dict[str, int]] = {}
    for r in records:
        acc = merged.setdefault(r.image_id, {})
        for k, v in r.labels.items():
            acc[k] = max(acc.get(k, v), v)
    return [dict(merged[r.image_id]) for r in records]


def records_fingerprint(records: Sequence[Any]) -> str:
    return sha256_json(
        [
            [
                r.image_id,
                r.patient_id,
                r.split,
                r.row_index,
                r.labels,
                [[b.concept, b.x0, b.y0, b.x1, b.y1] for b in r.boxes],
                Path(r.path).name if r.path is not None else None,
            ]
            for r in records
        ]
    )


def _layer_info(encoder: torch.nn.Module, layer: str) -> tuple[int, int]:
    infos = getattr(encoder, "layer_info", None)
    if not infos or layer not in infos:
        raise MammoSaeError(choices_message("layer", layer, list(infos or [])))
    info = infos[layer]
    return int(info.stride), int(info.channels)


def _preprocessing(size_hw: tuple[int, int] | None) -> dict[str, Any]:
    from ..data import images

    return {
        "pipeline": "mammo_sae.data.images.RecordDataset (per-image min-max, then (x - mean) / std)",
        "mean": getattr(images, "MEAN", None),
        "std": getattr(images, "STD", None),
        "image_size": list(size_hw) if size_hw else None,
    }


# --------------------------------------------------------------------------- data


class _ExtractionItems(torch.utils.data.Dataset):
    """RecordDataset items plus the breast mask; a failing image yields its error, not a crash."""

    def __init__(
        self, records: Sequence[Any], size_hw: tuple[int, int] | None, augment: bool, seed: int
    ) -> None:
        from ..data.images import RecordDataset

        # One channel through the workers' queue and pinned memory: the encoder's three are
        # identical, so they are made on the device (a third of the bytes to move).
        self.inner = RecordDataset(list(records), size_hw=size_hw, augment=augment, channels=1)
        self.records = records
        self.augment, self.seed = augment, seed

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        key = _image_key(self.records[i])
        try:
            if self.augment:  # global RNGs seeded per image → reproducible augmentation
                s = zlib.crc32(f"{self.seed}/{key}".encode())
                random.seed(s)
                np.random.seed(s)
                torch.manual_seed(s)
            x_1hw, _ = self.inner[i]
            return {"i": i, "key": key, "x": x_1hw, "mask": self._mask(x_1hw), "error": None}
        except Exception as exc:  # noqa: BLE001 - reported with the image id, by policy
            return {
                "i": i,
                "key": key,
                "x": None,
                "mask": None,
                "error": f"{type(exc).__name__}: {exc}",
            }

    @staticmethod
    def _mask(x_1hw: torch.Tensor) -> torch.Tensor | None:
        """Breast mask on a ≥256-pixel subsampled copy: cell fractions need no more, and the
        full-resolution mask would cost a third of the worker's time per image."""
        try:
            from ..data.images import breast_mask

            step = max(1, min(x_1hw.shape[-2:]) // 256)
            small_hw = x_1hw[0, ::step, ::step].numpy()
            return torch.from_numpy(np.asarray(breast_mask(small_hw), dtype=np.uint8))
        except Exception:  # noqa: BLE001 - tissue is optional provenance; NaN marks "unknown"
            return None


def _collate(
    items: list[dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[tuple[list[int], torch.Tensor]]]:
    """(items without pixels, [(item positions, stacked x_b1hw)] per input shape). Stacking
    here, in the worker, hands the main process one tensor per batch; default_collate stacks
    straight into shared memory when it runs in a worker (torch.stack would need a second copy
    into shared memory when the batch is sent)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for pos, it in enumerate(items):
        if it["error"] is None:
            groups.setdefault(tuple(it["x"].shape), []).append(pos)
    stacked = [
        (positions, torch.utils.data.default_collate([items[p].pop("x") for p in positions]))
        for positions in groups.values()
    ]
    return items, stacked


def _shard_batches(
    shards: Sequence[int], n: int, shard_images: int, batch_size: int
) -> list[list[int]]:
    out = []
    for k in shards:
        lo, hi = k * shard_images, min(n, (k + 1) * shard_images)
        out += [list(range(s, min(s + batch_size, hi))) for s in range(lo, hi, batch_size)]
    return out


# --------------------------------------------------------------------------- extraction


def _validate(cfg: ExtractConfig) -> None:
    """The CLI checks the same bounds; this covers configs built in Python."""
    check_bounds(ExtractConfig, vars(cfg), lambda name: "--" + name.replace("_", "-"))
    if cfg.split not in SPLIT_CHOICES:
        raise MammoSaeError(choices_message("split", cfg.split, SPLIT_CHOICES))
    if cfg.dtype not in store_format.DTYPES:
        raise MammoSaeError(choices_message("dtype", cfg.dtype, store_format.DTYPES))


def _load_records(cfg: ExtractConfig) -> list[Any]:
    from ..data.vindr import load_records

    splits = None if cfg.split == "all" else [cfg.split]
    # Missing files: fail early under "stop"; under "skip" each one is reported by id below.
    on_missing = "error" if cfg.on_error == "stop" else "ignore"
    # Absolute image paths in the store: figures and reports built from another working
    # directory still find the mammograms.
    records = list(
        load_records(
            Path(cfg.data).resolve(), level=cfg.level, splits=splits, on_missing=on_missing
        )
    )
    if cfg.max_images is not None:
        records = records[: cfg.max_images]
    if not records:
        raise DataError(f"{cfg.data}: no records for split {cfg.split!r}")
    return records


def extract(
    cfg: ExtractConfig,
    *,
    records: Sequence[Any] | None = None,
    encoder: torch.nn.Module | None = None,
    model_info: dict[str, Any] | None = None,
    progress: bool = True,
) -> Path:
    """Run (or resume) an extraction; returns the store path. See ExtractConfig."""
    _validate(cfg)
    torch.set_flush_denormal(True)  # denormals in SE/Swish slow CPU convolutions ~6×
    # gloo even on GPUs: only tiny control messages travel between ranks.
    dist = DistContext.from_env(timeout=datetime.timedelta(hours=24))
    try:
        with contextlib.ExitStack() as stack:
            # Rank 0 holds the store's writer lock for all ranks; every rank learns if it failed.
            problem = None
            try:
                stack.enter_context(writer_lock(cfg.out, enabled=dist.rank == 0))
            except MammoSaeError as exc:
                problem = exc
            if not dist.all_ok(problem is None):
                raise problem or StoreError(f"rank 0 could not lock {cfg.out}")
            return _extract(cfg, dist, records, encoder, model_info, progress)
    finally:
        dist.close()


def _extract(
    cfg: ExtractConfig,
    dist: DistContext,
    records: Sequence[Any] | None,
    encoder: torch.nn.Module | None,
    model_info: dict[str, Any] | None,
    progress: bool,
) -> Path:
    root = Path(cfg.out)
    size_hw = parse_size(cfg.image_size)
    records = list(records) if records is not None else _load_records(cfg)
    image_labels = _image_level_labels(records)
    stored_records = [_scale_record(r, size_hw) for r in records]
    if encoder is None:
        from ..models.checkpoints import load_encoder

        encoder, model_info = load_encoder(cfg.model, seed=cfg.seed)
    model_info = dict(
        model_info
        or {
            "source": None,
            "kind": "given",
            "sha256": None,
            "init_seed": None,
            "arch": type(encoder).__name__,
        }
    )
    # The forward's precision changes the vectors, so it is part of the store's identity.
    autocast = (
        cfg.autocast and resolve_device(cfg.device, local_rank=dist.local_rank).type == "cuda"
    )
    model_info["forward_dtype"] = "bfloat16-autocast" if autocast else "float32"
    if model_info.get("source"):  # provenance that stays valid when a run directory moves
        model_info["source"] = portable_path(model_info["source"], root)
    stride, d = _layer_info(encoder, cfg.layer)
    settings = {
        "model": model_info,
        "layer": cfg.layer,
        "preprocessing": _preprocessing(size_hw),
        "dtype": cfg.dtype,
        "subsample": {"fraction": cfg.subsample, "seed": cfg.seed},
        "augment": cfg.augment,
        "level": cfg.level,
        "split": cfg.split,
        "data": {
            "source": portable_path(cfg.data, root),
            "n_records": len(records),
            "records_sha256": records_fingerprint(records),
        },
        "shard_images": cfg.shard_images,
    }
    manifest = store_format.new_manifest(settings, d=d, n_records=len(records))
    manifest["stride"] = stride

    manifest_path = root / store_format.MANIFEST
    # Every rank inspects the folder before any rank writes to it, then they agree.
    state, problem = "new", None
    try:
        state = _existing_state(root, manifest)
    except MammoSaeError as exc:
        problem = exc
    if not dist.all_ok(problem is None):
        raise problem or StoreError(f"another extraction process refused {root}")
    if state == "complete":
        if dist.rank == 0 and progress:
            print(f"{root}: store already complete; nothing to do", file=sys.stderr)
        return root
    if dist.rank == 0 and state == "new":
        try:
            write_json(manifest_path, manifest)
        except MammoSaeError as exc:
            problem = exc
    if not dist.all_ok(problem is None):
        raise problem or StoreError(f"could not create {manifest_path}")

    n_shards = manifest["n_shards"]
    mine = [k for k in range(n_shards) if k % dist.world_size == dist.rank]
    todo = [k for k in mine if store_format.read_shard_record(root, k) is None]
    store_format.remove_stale_temporaries(root, todo)
    error: BaseException | None = None
    try:
        if todo:
            _extract_shards(
                cfg, root, todo, stored_records, image_labels, encoder, d, dist, progress
            )
    except BaseException as exc:  # noqa: BLE001 - re-raised below, after telling the other ranks
        error = exc
    all_ok = dist.all_ok(error is None)
    if error is not None:
        raise error
    if not all_ok:
        raise StoreError(
            f"another extraction process failed; finished shards are kept in {root}; "
            "rerun to resume"
        )
    ok, final_error = True, None
    if dist.rank == 0:
        try:
            store_format.finalise(root, manifest, n_shards)
        except MammoSaeError as exc:
            ok, final_error = False, exc
    if not dist.all_ok(ok):
        raise final_error or StoreError(f"rank 0 could not finalise {root}")
    return root


def _existing_state(root: Path, manifest: dict[str, Any]) -> str:
    """ "new", "partial" or "complete"; refuses a folder or store that is not this extraction's."""
    manifest_path = root / store_format.MANIFEST
    if not manifest_path.is_file():
        if root.exists() and any(p.name != LOCK_NAME for p in root.iterdir()):
            raise StoreError(
                f"{root} exists, is not empty and has no {manifest_path.name}; "
                "refusing to write a store into it"
            )
        return "new"
    existing = read_json(manifest_path)
    if existing.get("format") != store_format.STORE_FORMAT:
        raise StoreError(f"{root} holds a {manifest_path.name} that is not an activation store")
    diff = store_format.settings_diff(existing, manifest)
    if diff:
        raise StoreError(
            f"{root} was extracted with other settings ({'; '.join(diff)}); "
            "use another --out or delete it"
        )
    return "complete" if existing.get("complete") else "partial"


@dataclass
class _ShardBuffer:
    index: int
    start: int
    remaining: int
    acts: list[np.ndarray] = dataclasses.field(default_factory=list)
    patches: list[np.ndarray] = dataclasses.field(default_factory=list)
    pooled: list[np.ndarray] = dataclasses.field(default_factory=list)
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def _extract_shards(
    cfg: ExtractConfig,
    root: Path,
    todo: list[int],
    records: list[Any],
    image_labels: list[dict[str, int]],
    encoder: torch.nn.Module,
    d: int,
    dist: DistContext,
    progress: bool,
) -> None:
    from tqdm import tqdm

    device = resolve_device(cfg.device, local_rank=dist.local_rank)
    if device.type == "cuda":
        # Pinned host memory, events and default streams belong to the current device.
        torch.cuda.set_device(device)
    encoder = encoder.eval().to(device)
    if _channels_last(cfg, device):
        encoder = encoder.to(memory_format=torch.channels_last)
    n = len(records)
    items = _ExtractionItems(records, parse_size(cfg.image_size), cfg.augment, cfg.seed)
    loader = torch.utils.data.DataLoader(
        items,
        batch_sampler=_shard_batches(todo, n, cfg.shard_images, cfg.batch_size),
        num_workers=cfg.workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if cfg.workers else None,
        persistent_workers=False,
    )
    buffers = {
        k: _ShardBuffer(
            k, k * cfg.shard_images, min(n, (k + 1) * cfg.shard_images) - k * cfg.shard_images
        )
        for k in todo
    }
    n_todo = sum(b.remaining for b in buffers.values())
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
    pending: list[Future[Any]] = []
    bar = tqdm(
        total=n_todo,
        unit="img",
        desc=f"extract {cfg.layer}",
        disable=not progress or dist.rank != 0,
        dynamic_ncols=True,
    )
    try:
        for batch in _forward_batches(loader, encoder, cfg, device):
            for item in batch:
                i = item["i"]
                k = i // cfg.shard_images
                buf = buffers[k]
                record = records[i]
                if item["error"] is not None:
                    if cfg.on_error == "stop":
                        raise DataError(
                            f"image {record.image_id} ({record.path}) failed to load: "
                            f"{item['error']}; rerun with --on-error skip to leave it out"
                        )
                    bar.write(f"skipped image {record.image_id}: {item['error']}")
                    buf.rows.append(
                        store_format.image_row(
                            i,
                            record,
                            grid_hw=(0, 0),
                            patch_count=0,
                            image_labels=image_labels[i],
                            ok=False,
                            error=item["error"],
                            root=root,
                        )
                    )
                    buf.pooled.append(np.full((1, d), np.nan, np.float32))
                else:
                    buf.acts.append(item["acts"])
                    buf.patches.append(item["patches"])
                    buf.pooled.append(item["pooled"][None])
                    buf.rows.append(
                        store_format.image_row(
                            i,
                            record,
                            grid_hw=item["grid_hw"],
                            patch_count=len(item["acts"]),
                            image_labels=image_labels[i],
                            root=root,
                        )
                    )
                buf.remaining -= 1
                bar.update(1)
                if buf.remaining == 0:
                    del buffers[k]
                    pending.append(writer.submit(_write_buffer, root, buf, cfg.dtype, d))
                    while len(pending) > 1:  # at most one shard queued behind the one writing
                        pending.pop(0).result()
        for fut in pending:
            fut.result()
    finally:
        bar.close()
        writer.shutdown(wait=True, cancel_futures=True)


def _write_buffer(root: Path, buf: _ShardBuffer, dtype: str, d: int) -> None:
    disk = store_format.DISK_DTYPE[dtype]
    acts = np.concatenate(buf.acts) if buf.acts else np.zeros((0, d), disk)
    patches = np.concatenate(buf.patches) if buf.patches else np.zeros(0, store_format.PATCH_DTYPE)
    store_format.write_shard(
        root,
        buf.index,
        acts,
        patches,
        np.concatenate(buf.pooled),
        buf.rows,
        dtype=dtype,
        image_start=buf.start,
    )


def _channels_last(cfg: ExtractConfig, device: torch.device) -> bool:
    """channels_last only under bf16 autocast: in fp32 it made B5 0.86x and B2 0.70x as fast at
    1520x912 on an H100 (benchmarks/encoder_speed.py, benchmarks/results/encoder_speed.txt)."""
    return device.type == "cuda" and cfg.autocast


def _forward_batches(
    loader: Any, encoder: torch.nn.Module, cfg: ExtractConfig, device: torch.device
) -> Iterator[list[dict[str, Any]]]:
    """Per loaded batch: items with `acts` (disk dtype), `patches`, `pooled`, `grid_hw` added.

    The host half of batch i (finiteness and range checks, the copy to host memory, provenance)
    runs after batch i+1's forward pass is queued, so on a GPU the forward passes run back to
    back instead of waiting for each batch's synchronisation and copy.
    """
    from ..data.images import expand_channels

    autocast = cfg.autocast and device.type == "cuda"
    memory_format = torch.channels_last if _channels_last(cfg, device) else torch.contiguous_format
    queued: tuple[list[dict[str, Any]], list[_MapOnDevice]] | None = None
    batches = iter(loader)
    while True:
        try:
            loaded = next(batches, None)
            if loaded is None:
                break
            items, stacked = loaded
            launched = []
            for positions, x_b1hw in stacked:
                x_b3hw = expand_channels(x_b1hw.to(device, non_blocking=True), memory_format)
                with (
                    torch.inference_mode(),
                    torch.autocast(device.type, torch.bfloat16, enabled=autocast),
                ):
                    map_bchw = encoder.forward_features(x_b3hw, [cfg.layer])[cfg.layer]
                launched.append(_MapOnDevice(map_bchw.float(), [items[p] for p in positions], cfg))
        except BaseException:
            # Loading or the forward of the next batch failed: hand over the finished one first,
            # so a shard it completes is still written (and its own errors come first).
            if queued is not None:
                done, queued = queued, None
                yield _finish_batch(*done)
            raise
        if queued is not None:
            yield _finish_batch(*queued)
        queued = (items, launched)
    if queued is not None:
        yield _finish_batch(*queued)


def _finish_batch(
    items: list[dict[str, Any]], launched: list[_MapOnDevice]
) -> list[dict[str, Any]]:
    for part in launched:
        part.finish()
    return items


FLOAT16_SMALLEST_NORMAL = 6.104e-5


def _check_float16_range(max_abs: float) -> None:
    if max_abs > 65504.0:
        raise StoreError(
            f"activations reach {max_abs:.3g}, beyond float16's range; "
            "use --dtype bfloat16 or float32"
        )
    if 0.0 < max_abs < FLOAT16_SMALLEST_NORMAL:
        raise StoreError(
            f"activations reach at most {max_abs:.3g}: float16 would store them as 0 or "
            "as subnormals with a few bits left; use --dtype bfloat16 or float32 (or "
            "check the checkpoint: a trained encoder's final map is of order 1)"
        )
    if 0.0 < max_abs < 1e-3:
        # A fixed text, so Python shows it once per run rather than once per batch.
        warnings.warn(
            "activations are tiny (max |x| < 1e-3); float16 rounds values below 6e-8 to "
            "zero and loses precision below 6e-5: consider --dtype bfloat16",
            stacklevel=2,
        )


class _MapOnDevice:
    """One group's feature map cut into the store's pieces: the device work and the (async, on
    CUDA into pinned memory) copies are started at construction, the host work in `finish`."""

    def __init__(
        self, map_bchw: torch.Tensor, group: list[dict[str, Any]], cfg: ExtractConfig
    ) -> None:
        b, c, h, w = map_bchw.shape
        self.group, self.cfg, self.grid_hw = group, cfg, (h, w)
        self.cells = [subsample_cells(h * w, cfg.subsample, cfg.seed, it["key"]) for it in group]
        self.counts = [len(cl) for cl in self.cells]
        pooled_bd = map_bchw.mean((2, 3))
        finite_b = torch.isfinite(pooled_bd).all(
            1
        )  # a NaN or inf anywhere in a map reaches its mean
        max_abs = map_bchw.abs().amax() if cfg.dtype == "float16" else pooled_bd.new_zeros(())
        # One pass per image: (C, cells) → (cells, C) transposed straight into the store dtype.
        flat_bcp = map_bchw.flatten(2)
        kept_nd = torch.empty(
            (sum(self.counts), c), dtype=getattr(torch, cfg.dtype), device=map_bchw.device
        )
        offset = 0
        for j, cl in enumerate(self.cells):
            src_cp = (
                flat_bcp[j]
                if len(cl) == h * w
                else flat_bcp[j][:, torch.from_numpy(cl).to(map_bchw.device)]
            )
            kept_nd[offset : offset + len(cl)].copy_(src_cp.T)
            offset += len(cl)
        self.on_host: list[torch.Tensor] | None = [
            _to_host(t) for t in (kept_nd, pooled_bd, finite_b, max_abs)
        ]
        self.ready = None
        if map_bchw.device.type == "cuda":
            self.ready = torch.cuda.Event()
            self.ready.record(torch.cuda.current_stream(map_bchw.device))

    def finish(self) -> None:
        if self.ready is not None:
            self.ready.synchronize()
        assert self.on_host is not None, "finish() called twice"
        kept_nd, pooled_bd, finite_b, max_abs = self.on_host
        self.on_host = None  # the pinned blocks go back to the allocator's cache after this
        group, cfg = self.group, self.cfg
        if not bool(finite_b.all()):
            bad = [it["key"] for it, fin in zip(group, finite_b.tolist()) if not fin]
            raise StoreError(f"non-finite activations for image(s) {bad}; check the checkpoint")
        if cfg.dtype == "float16":
            _check_float16_range(float(max_abs))
        # Out of pinned memory into ordinary arrays: the items live until their shard is written,
        # pinned blocks should not.
        disk_nd = store_format.to_disk(kept_nd, cfg.dtype)
        if self.ready is not None:
            disk_nd = disk_nd.copy()
        pooled = pooled_bd.numpy()
        h, w = self.grid_hw
        offset = 0
        for j, it in enumerate(group):
            cl = self.cells[j]
            tissue = tissue_grid(it["mask"], (h, w))
            patches = np.zeros(len(cl), store_format.PATCH_DTYPE)
            patches["image_index"] = it["i"]
            patches["row"], patches["col"] = cl // w, cl % w
            patches["tissue"] = tissue.reshape(-1).numpy()[cl]
            it.update(
                acts=disk_nd[offset : offset + self.counts[j]],
                patches=patches,
                pooled=pooled[j].astype(np.float32),
                grid_hw=(h, w),
            )
            offset += self.counts[j]


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A host copy of a device tensor, asynchronous on CUDA (pinned destination)."""
    if t.device.type != "cuda":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host
