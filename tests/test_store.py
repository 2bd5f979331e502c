"""Activation store reader: round trip, checksums, shuffled stream (determinism, resume,
ranks), bounded memory. Stores are built from arrays with `write_store` (no encoder needed)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mammo_sae.activations.store import ActivationStore, write_store
from mammo_sae.data.records import Box, ImageRecord
from mammo_sae.errors import MammoSaeError, StoreError

GRID = (3, 4)


def _indexed_acts(n_images: int, d: int, seed: int = 0) -> list[np.ndarray]:
    """Per-image (12, d) vectors whose column 0 is the global patch index (exact in float16)."""
    rng = np.random.default_rng(seed)
    p = GRID[0] * GRID[1]
    out = []
    for i in range(n_images):
        a = rng.normal(size=(p, d)).astype(np.float32)
        a[:, 0] = np.arange(i * p, (i + 1) * p)
        out.append(a)
    return out


@pytest.fixture(scope="module")
def stores(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[ActivationStore, list[np.ndarray]]]:
    root = tmp_path_factory.mktemp("stores")
    acts = _indexed_acts(23, 8)
    records = [
        ImageRecord(
            image_id=f"im{i}",
            patient_id=f"pt{i // 2}",
            split="training",
            path=None,
            labels={"Mass": i % 2},
            boxes=(Box("Mass", 1.0, 2.0, 3.5, 4.0),) if i % 2 else (),
        )
        for i in range(23)
    ]
    out = {}
    for dtype in ("float32", "float16", "bfloat16"):
        out[dtype] = (
            write_store(
                root / dtype, acts, grids=[GRID] * 23, records=records, dtype=dtype, shard_images=5
            ),
            acts,
        )
    return out


@pytest.mark.parametrize("dtype,tol", [("float32", 0.0), ("float16", 1e-3), ("bfloat16", 1e-2)])
def test_round_trip(stores, dtype: str, tol: float) -> None:
    store, acts = stores[dtype]
    assert (store.n_images, store.n_patches, store.d, store.dtype) == (23, 23 * 12, 8, dtype)
    a, rows, cols = store.image_patches(7)
    np.testing.assert_allclose(a, acts[7], rtol=tol, atol=tol)
    assert rows.tolist() == [0] * 4 + [1] * 4 + [2] * 4 and cols.tolist() == [0, 1, 2, 3] * 3
    chunks = list(store.iter_chunks(chunk_patches=7))
    allv = np.concatenate([c[0] for c in chunks])
    np.testing.assert_allclose(allv, np.concatenate(acts), rtol=tol, atol=tol)
    assert np.concatenate([c[1] for c in chunks]).tolist() == np.repeat(np.arange(23), 12).tolist()
    np.testing.assert_allclose(store.pooled_nd, np.stack([x.mean(0) for x in acts]), atol=1e-6)
    full = store.load_all("cpu")
    np.testing.assert_allclose(full.numpy(), np.concatenate(acts), rtol=tol, atol=tol)
    table = store.images
    assert table["patch_offset"].tolist() == list(range(0, 23 * 12, 12))
    assert table["grid_h"].unique().tolist() == [3] and store.grid_hw(4) == GRID
    recs = store.records()
    assert recs[3].boxes == (Box("Mass", 1.0, 2.0, 3.5, 4.0),) and recs[3].labels == {"Mass": 1}
    assert np.isnan(store.image_tissue(0)).all() and len(store.patch_tissue()) == store.n_patches
    store.verify()


def _ids(batches: list[torch.Tensor]) -> list[int]:
    return torch.cat(batches)[:, 0].round().long().tolist()


def test_raw_stream_skips_the_float32_copy(stores) -> None:
    store, _ = stores["bfloat16"]
    kw = dict(seed=3, epoch=0, buffer_patches=40)
    raw = list(store.stream(10, raw=True, **kw))
    assert raw[0].dtype == torch.bfloat16
    assert all(torch.equal(r.float(), f) for r, f in zip(raw, store.stream(10, **kw)))


def test_stream_is_a_deterministic_shuffle_of_one_epoch(stores) -> None:
    store, _ = stores["float16"]
    kw = dict(seed=3, buffer_patches=40, block_patches=8)
    a = list(store.stream(10, epoch=0, **kw))
    assert len(a) == store.batches_per_epoch(10) == 28
    assert [len(b) for b in a] == [10] * 27 + [6] and a[0].dtype == torch.float32
    ids = _ids(a)
    assert sorted(ids) == list(range(store.n_patches))  # each patch once
    assert ids != list(range(store.n_patches))  # ...and shuffled
    assert ids == _ids(list(store.stream(10, epoch=0, **kw)))  # same args, same order
    assert ids != _ids(list(store.stream(10, epoch=1, **kw)))  # new epoch, new order
    dropped = list(store.stream(10, epoch=0, drop_last=True, **kw))
    assert len(dropped) == store.batches_per_epoch(10, drop_last=True) == 27


@pytest.mark.parametrize("start", [1, 5, 13, 27, 28])
def test_stream_resumes_exactly(stores, start: int) -> None:
    store, _ = stores["bfloat16"]
    kw = dict(seed=5, epoch=2, buffer_patches=32, block_patches=8)
    full = list(store.stream(10, **kw))
    tail = list(store.stream(10, start_batch=start, **kw))
    assert len(tail) == len(full) - start
    for x, y in zip(full[start:], tail):
        assert torch.equal(x, y)


def test_stream_ranks_are_disjoint_and_even(stores) -> None:
    store, _ = stores["float32"]
    per_rank = [
        list(store.stream(16, seed=1, epoch=0, rank=r, world_size=3, buffer_patches=50))
        for r in range(3)
    ]
    assert len({len(b) for b in per_rank}) == 1 == len({store.batches_per_epoch(16, 3)})
    ids = [set(_ids(b)) for b in per_rank]
    assert all(len(s) == store.n_patches // 3 for s in ids)
    assert not (ids[0] & ids[1]) and not (ids[1] & ids[2]) and not (ids[0] & ids[2])
    with pytest.raises(StoreError, match="rank 3"):
        next(store.stream(16, seed=1, epoch=0, rank=3, world_size=3))


def test_verify_names_the_corrupted_shard(tmp_path: Path) -> None:
    store = write_store(tmp_path / "s", _indexed_acts(10, 4), grids=[GRID] * 10, shard_images=4)
    victim = tmp_path / "s" / store.manifest["shards"][1]["files"]["acts"]
    raw = bytearray(victim.read_bytes())
    raw[-3] ^= 0xFF  # flip bits inside the data, keep the header valid
    victim.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=r"00001\.acts\.npy"):
        ActivationStore(tmp_path / "s").verify()


def test_store_info_and_verify_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mammo_sae.cli import main

    store = write_store(tmp_path / "s", _indexed_acts(6, 4), grids=[GRID] * 6, shard_images=4)
    assert main(["store", "info", "--store", str(tmp_path / "s")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["n_images"], info["n_patches"], info["d"], info["n_shards"]) == (6, 72, 4, 2)
    assert main(["store", "verify", "--store", str(tmp_path / "s"), "--no-progress"]) == 0
    victim = tmp_path / "s" / store.manifest["shards"][0]["files"]["patches"]
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 0x01
    victim.write_bytes(bytes(raw))
    assert main(["store", "verify", "--store", str(tmp_path / "s"), "--no-progress"]) == 2
    assert "checksum mismatch in shards/00000.patches.npy" in capsys.readouterr().err
    assert main(["store", "info", "--store", str(tmp_path / "nothing")]) == 2
    assert "activation store not found" in capsys.readouterr().err


def test_dimension_and_dtype_mismatch_refused(tmp_path: Path) -> None:
    write_store(tmp_path / "s", _indexed_acts(6, 4), grids=[GRID] * 6, shard_images=3)
    manifest_path = tmp_path / "s" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps(dict(manifest, d=5)))
    with pytest.raises(StoreError, match="dimension/dtype mismatch"):
        ActivationStore(tmp_path / "s")
    manifest_path.write_text(json.dumps(dict(manifest, dtype="float16")))
    with pytest.raises(StoreError, match="dimension/dtype mismatch"):
        ActivationStore(tmp_path / "s")
    manifest_path.write_text(json.dumps(dict(manifest, complete=False)))
    with pytest.raises(StoreError, match="incomplete"):
        ActivationStore(tmp_path / "s")
    with pytest.raises(MammoSaeError, match="no manifest.json"):
        ActivationStore(tmp_path)


def test_write_store_rejects_bad_input(tmp_path: Path) -> None:
    acts = _indexed_acts(2, 4)
    acts[1][0, 1] = np.nan
    with pytest.raises(StoreError, match="non-finite"):
        write_store(tmp_path / "a", acts)
    with pytest.raises(StoreError, match="shape"):
        write_store(tmp_path / "b", [np.zeros((3, 4), np.float32), np.zeros((3, 5), np.float32)])


def test_stream_memory_is_bounded_by_the_buffer(tmp_path: Path) -> None:
    """A 48 MB store streamed with a 1 MB buffer: resident memory grows by far less than the
    store (reads bypass the memmap, so the page cache is not charged to the process)."""
    n, d = 96 * 1024, 128  # float32 → 48 MiB
    acts = np.random.default_rng(0).normal(size=(n, d)).astype(np.float32)
    write_store(tmp_path / "big", [acts[i : i + 4096] for i in range(0, n, 4096)], shard_images=4)
    del acts
    script = textwrap.dedent("""
        import sys
        from mammo_sae.activations.store import ActivationStore

        def peak_mib():  # VmHWM starts afresh at exec (ru_maxrss would inherit the parent's)
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024

        store = ActivationStore(sys.argv[1])
        next(store.stream(1024, seed=0, epoch=0, buffer_patches=2048))  # warm up imports
        before = peak_mib()
        seen = 0
        for batch in store.stream(1024, seed=0, epoch=0, buffer_patches=2048):
            seen += len(batch)
        for chunk in store.iter_chunks(4096):
            seen += len(chunk[0])
        print(seen, peak_mib() - before)
    """)
    res = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "big")],
        capture_output=True,
        text=True,
        check=True,
    )
    seen, grown_mib = res.stdout.split()
    assert int(seen) == 2 * n
    assert float(grown_mib) < 16, f"RSS grew by {grown_mib} MiB streaming a 48 MiB store"


# --------------------------------------------------------------------------- properties


@st.composite
def _stream_case(draw: st.DrawFn) -> dict:
    counts = draw(st.lists(st.integers(0, 7), min_size=1, max_size=12))  # 0: a skipped image
    world = draw(st.integers(1, 3))
    return dict(
        counts=counts,
        shard_images=draw(st.integers(1, 5)),
        world=world,
        batch=draw(st.integers(1, 9)),
        buffer=draw(st.integers(1, 30)),
        block=draw(st.integers(1, 10)),
        seed=draw(st.integers(0, 3)),
        drop_last=draw(st.booleans()),
        start=draw(st.integers(0, 12)),
    )


@settings(max_examples=60, deadline=None)
@given(_stream_case())
def test_stream_partitions_any_store_and_resumes_anywhere(case: dict) -> None:
    """Whatever the shapes (empty images, shards of one image, buffers smaller than a batch,
    more ranks than patches): each rank's epoch is batches_per_epoch batches of full size
    (the last may be short), the ranks' patches are disjoint and each patch comes once with
    its own vector, and a stream started at any batch replays the tail exactly."""
    counts = case["counts"]
    offsets = np.concatenate([[0], np.cumsum(counts)])
    acts = [
        np.stack(
            [
                np.arange(offsets[i], offsets[i + 1], dtype=np.float32),
                np.full(counts[i], float(i), np.float32),
            ],
            axis=1,
        ).reshape(counts[i], 2)
        for i in range(len(counts))
    ]
    if sum(counts) == 0:
        return
    with tempfile.TemporaryDirectory() as tmp:
        store = write_store(Path(tmp) / "s", acts, shard_images=case["shard_images"])
        assert store.n_patches == sum(counts)
        image_of = np.repeat(np.arange(len(counts)), counts)
        seen: set[int] = set()
        for rank in range(case["world"]):
            kw = dict(
                seed=case["seed"],
                epoch=1,
                rank=rank,
                world_size=case["world"],
                buffer_patches=case["buffer"],
                block_patches=case["block"],
                drop_last=case["drop_last"],
            )
            batches = list(store.stream(case["batch"], **kw))
            assert len(batches) == store.batches_per_epoch(
                case["batch"], case["world"], case["drop_last"]
            )
            assert all(len(b) == case["batch"] for b in batches[:-1])
            ids = _ids(batches) if batches else []
            expected = store.patches_per_rank(case["world"])
            if case["drop_last"]:
                expected -= expected % case["batch"]
            assert len(ids) == len(set(ids)) == expected
            assert not seen & set(ids)
            seen |= set(ids)
            if batches:  # column 1 names the image: the vector travelled with its patch
                both = torch.cat(batches).numpy()
                assert np.array_equal(both[:, 1], image_of[both[:, 0].astype(int)])
            start = min(case["start"], len(batches))
            tail = list(store.stream(case["batch"], start_batch=start, **kw))
            assert len(tail) == len(batches) - start
            assert all(torch.equal(x, y) for x, y in zip(batches[start:], tail))
        store.close()


@settings(max_examples=40, deadline=None)
@given(
    role=st.sampled_from(["acts", "patches", "images", "pooled"]),
    shard=st.integers(0, 2),
    where=st.floats(0.0, 1.0, exclude_max=True, allow_subnormal=False),
    bit=st.integers(0, 7),
)
def test_any_flipped_bit_in_a_shard_is_caught_and_named(
    role: str, shard: int, where: float, bit: int
) -> None:
    """Header or data, any shard file or store-level table: opening or verifying the store
    fails and names the file (a silent wrong read is the failure this guards against)."""
    with tempfile.TemporaryDirectory() as tmp:
        store = write_store(Path(tmp) / "s", _indexed_acts(7, 3), grids=[GRID] * 7, shard_images=3)
        files = (
            store.manifest["files"]
            if role in ("images", "pooled")
            else store.manifest["shards"][shard]["files"]
        )
        rel = files[role]
        store.close()
        del store
        victim = Path(tmp) / "s" / rel
        raw = bytearray(victim.read_bytes())
        raw[int(where * len(raw))] ^= 1 << bit
        victim.write_bytes(bytes(raw))
        with pytest.raises(MammoSaeError, match=re.escape(Path(rel).name)):
            ActivationStore(Path(tmp) / "s").verify()
