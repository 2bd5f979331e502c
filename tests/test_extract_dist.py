"""torchrun extraction: 2 CPU processes (gloo) write disjoint shards that merge into a store
byte-identical to a single-process run; a failing rank stops every rank without a hang."""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from mammo_sae.activations.extract import ExtractConfig, extract
from mammo_sae.activations.store import ActivationStore
from mammo_sae.data.vindr import load_records

# 8 images in shards of 3 → 3 shards: rank 0 writes two, rank 1 one (uneven on purpose).
ARGS = dict(
    model="efficientnet-phantom",
    split="all",
    image_size="128x80",
    shard_images=3,
    batch_size=2,
    workers=0,
    max_images=8,
    dtype="float32",
    seed=0,
)


def _torchrun(data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "mammo_sae.cli",
        "extract",
        "--data",
        str(data),
        "--out",
        str(out),
    ]
    for k, v in ARGS.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(argv + list(extra), capture_output=True, text=True, env=env, timeout=300)


def test_two_ranks_equal_one(tiny_phantom: Path, tmp_path: Path) -> None:
    proc = _torchrun(tiny_phantom, tmp_path / "two")
    assert proc.returncode == 0, proc.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # same kernels as the workers (bit-identical convolutions)
    try:
        extract(ExtractConfig(data=tiny_phantom, out=tmp_path / "one", **ARGS), progress=False)
    finally:
        torch.set_num_threads(threads)
    two, one = ActivationStore(tmp_path / "two"), ActivationStore(tmp_path / "one")
    assert two.n_images == 8 and len(two.manifest["shards"]) == 3
    two.verify()
    for rel in ["manifest.json", "images.json", "pooled.npy"] + [
        f for s in one.manifest["shards"] for f in s["files"].values()
    ]:
        assert filecmp.cmp(tmp_path / "one" / rel, tmp_path / "two" / rel, shallow=False), rel


def test_a_failing_rank_stops_all_and_the_store_resumes(tiny_phantom: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_phantom, data)
    victim = load_records(data)[4]  # shard 1 → rank 1
    original = Path(victim.path).read_bytes()
    Path(victim.path).write_bytes(b"garbage")
    proc = _torchrun(data, tmp_path / "store")
    assert proc.returncode != 0
    assert victim.image_id in proc.stderr and "another extraction process failed" in proc.stderr
    assert (tmp_path / "store" / "shards" / "00000.json").is_file()  # rank 0's work is kept
    Path(victim.path).write_bytes(original)
    proc = _torchrun(data, tmp_path / "store")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ActivationStore(tmp_path / "store").n_images == 8
