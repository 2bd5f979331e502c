"""Shuffled-stream read rate and peak memory from a store larger than the memory given to it.

    python benchmarks/store_stream.py [--gib 2] [--d 2048] [--dtype bfloat16]
        [--batch-size 4096] [--buffer-patches 65536] [--rss-limit-mib 1024] [--path DIR]

Builds a synthetic store of about --gib GiB shard by shard (never all in memory), then, in a
fresh child process, streams one epoch with `ActivationStore.stream` and reads it once with
`iter_chunks`, reporting patches/s, MB/s and the child's peak RSS against the store size and
against --rss-limit-mib (the memory we "allow" it). Page cache: a store smaller than free RAM
may be served from cache after it is written; pass --drop-caches (root) for cold reads.
The SAE trainer's appetite for comparison (docs: H100 bf16 ≈ 1.0–1.5 M patches/s at d=2048;
2-core CPU ≈ 250 patches/s) is printed beside. Figures only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mammo_sae.activations import store as sf

CHILD = r"""
import json, sys, time
import torch
from mammo_sae.activations.store import ActivationStore

def peak_mib():  # VmHWM starts afresh at exec; ru_maxrss would inherit the parent's peak
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

path, batch, buffer = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
store = ActivationStore(path)
out = dict(rss_start=peak_mib())
for raw in (False, True):
    t = time.perf_counter(); n = 0
    for x in store.stream(batch, seed=0, epoch=0, buffer_patches=buffer, raw=raw):
        n += len(x)
    out[f"stream_raw{raw:d}_s"] = time.perf_counter() - t
out["n"] = n
out["rss_stream"] = peak_mib()
t = time.perf_counter(); m = 0
for acts, *_ in store.iter_chunks(16384):
    m += len(acts)
out.update(chunk_s=time.perf_counter() - t, m=m, rss_chunks=peak_mib())
print(json.dumps(out))
"""


def build(
    path: Path,
    gib: float,
    d: int,
    dtype: str,
    patches_per_image: int = 1392,
    shard_images: int = 64,
) -> int:
    """Write a synthetic store of ≈ gib GiB, one shard at a time; returns n_patches."""
    from mammo_sae.data.records import ImageRecord

    itemsize = sf.DISK_DTYPE[dtype].itemsize
    n_images = max(1, int(gib * 2**30 / (patches_per_image * d * itemsize)))
    settings = {
        "model": {"arch": "synthetic", "source": None, "sha256": None},
        "layer": "synthetic",
        "preprocessing": {},
        "dtype": dtype,
        "subsample": {"fraction": 1.0, "seed": 0},
        "augment": False,
        "level": "image",
        "split": "all",
        "data": {"source": None, "n_records": n_images},
        "shard_images": shard_images,
    }
    manifest = sf.new_manifest(settings, d=d, n_records=n_images)
    sf.write_json(path / sf.MANIFEST, manifest)
    rng = np.random.default_rng(0)
    grid = (48, 29) if patches_per_image == 1392 else (1, patches_per_image)
    for k in range(manifest["n_shards"]):
        lo, hi = k * shard_images, min(n_images, (k + 1) * shard_images)
        n = (hi - lo) * patches_per_image
        acts = sf.to_disk(rng.standard_normal((n, d), dtype=np.float32), dtype)
        meta = np.zeros(n, sf.PATCH_DTYPE)
        meta["image_index"] = np.repeat(np.arange(lo, hi), patches_per_image)
        meta["row"] = np.tile(np.repeat(np.arange(grid[0]), grid[1]), hi - lo)
        meta["col"] = np.tile(np.arange(grid[1]), grid[0] * (hi - lo))
        rows = [
            sf.image_row(
                i,
                ImageRecord(f"img{i}", f"p{i}", "training", None, {}),
                grid_hw=grid,
                patch_count=patches_per_image,
            )
            for i in range(lo, hi)
        ]
        sf.write_shard(
            path,
            k,
            acts,
            meta,
            np.zeros((hi - lo, d), np.float32),
            rows,
            dtype=dtype,
            image_start=lo,
        )
    sf.finalise(path, manifest, manifest["n_shards"])
    return n_images * patches_per_image


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--dtype", default="bfloat16", choices=sf.DTYPES)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--buffer-patches", type=int, default=65536)
    ap.add_argument("--rss-limit-mib", type=float, default=512)
    ap.add_argument("--path", type=Path, default=None, help="reuse/keep the store here")
    ap.add_argument("--drop-caches", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="store_stream_") as tmp:
        path = args.path or Path(tmp) / "store"
        if not (path / sf.MANIFEST).is_file():
            t = time.perf_counter()
            build(path, args.gib, args.d, args.dtype)
            print(f"built in {time.perf_counter() - t:.1f} s")
        store = sf.ActivationStore(path)
        size_mib = sum(f.stat().st_size for f in path.rglob("*.acts.npy")) / 2**20
        if args.drop_caches:
            os.sync()
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                CHILD,
                str(path),
                str(args.batch_size),
                str(args.buffer_patches),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(out.stdout)
    row_mb = args.d * sf.DISK_DTYPE[args.dtype].itemsize / 1e6
    buffer_mib = args.buffer_patches * row_mb * 1e6 / 2**20
    print(
        f"store: {store.n_patches:,} patches × d={args.d} {args.dtype} = {size_mib:,.0f} MiB; "
        f"batch {args.batch_size}, shuffle buffer {args.buffer_patches:,} patches ({buffer_mib:,.0f} MiB)"
    )
    s_rate, c_rate = r["n"] / r["stream_raw0_s"], r["m"] / r["chunk_s"]
    raw_rate = r["n"] / r["stream_raw1_s"]
    print(
        f"stream float32   : {s_rate:12,.0f} patches/s  {s_rate * row_mb:8,.0f} MB/s (store bytes)"
    )
    print(
        f"stream raw={args.dtype:9s}: {raw_rate:10,.0f} patches/s  {raw_rate * row_mb:8,.0f} MB/s"
    )
    print(f"iter_chunks      : {c_rate:12,.0f} patches/s  {c_rate * row_mb:8,.0f} MB/s")
    grown = r["rss_chunks"] - r["rss_start"]
    print(
        f"peak RSS: {r['rss_start']:.0f} MiB after imports, {r['rss_stream']:.0f} after the stream, "
        f"{r['rss_chunks']:.0f} after iter_chunks; growth {grown:.0f} MiB = {grown / buffer_mib:.1f}× "
        f"the buffer, {grown / size_mib:.2f}× the store; store / allowed memory = "
        f"{size_mib / args.rss_limit_mib:.1f}×; growth within the {args.rss_limit_mib:.0f} MiB "
        f"allowance: {grown <= args.rss_limit_mib} (process total {r['rss_chunks']:.0f} MiB, "
        f"of which {r['rss_start']:.0f} are the interpreter, torch and numpy)"
    )
    print(
        f"vs SAE trainer: H100 ≈ 1.2 M patches/s → raw stream covers {raw_rate / 1.2e6:.2f}×; "
        f"2-core CPU ≈ 250 patches/s → float32 stream covers {s_rate / 250:,.0f}×"
    )


if __name__ == "__main__":
    main()
