"""CUDA correctness: the GPU paths give the CPU's answers (to float tolerance) and the Mammo-CLIP
parity holds on the GPU. Every test here is marked `gpu` and skipped without a CUDA device; run
them on a GPU host with `pytest -m gpu`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import need_shared

from mammo_sae.activations.extract import ExtractConfig, extract
from mammo_sae.activations.store import ActivationStore, write_store
from mammo_sae.analysis.summaries import compute_summaries
from mammo_sae.models.checkpoints import load_classifier
from mammo_sae.sae.checkpoints import load_sae
from mammo_sae.sae.model import SAEConfig, SparseAutoencoder
from mammo_sae.sae.train import SAETrainConfig, TensorSource, train_sae

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _no_tf32():
    """TF32 would change fp32 results by ~1e-3; correctness is checked in true fp32."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _rel(a: torch.Tensor | np.ndarray, b: np.ndarray) -> float:
    a = a.detach().float().cpu().numpy() if isinstance(a, torch.Tensor) else a
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def test_b2_classifier_parity_on_cuda() -> None:
    """The reference outputs of the B2 fixture hold on the GPU too (fp32, no TF32)."""
    refs = dict(np.load(need_shared("fixtures", "reference", "mammoclip_b2_small_refs.npz")))
    clf = load_classifier(
        need_shared(
            "fixtures",
            "reference",
            "upmc_breast_clip_det_b2_period_n_ft_seed_10_fold0_best_aucroc_ver084.pth",
        )
    )
    clf = clf.cuda().eval()
    with torch.inference_mode():
        raw = clf.features(torch.from_numpy(refs["x"]).cuda())
        logit = clf.logits_from_map(raw)
    errors = {
        "raw": _rel(raw, refs["clf_raw"]),
        "pooled": _rel(raw.mean(dim=(2, 3)), refs["clf_pooled"]),
        "logit": _rel(logit, refs["clf_binary_logit"]),
    }
    print("B2 on CUDA, error relative to max magnitude:", errors)
    # cuDNN's fp32 convolution algorithms sum in another order than the CPU's: measured on an
    # H100 (torch 2.11), raw 1.1e-5, pooled 6.3e-6, logit 3.3e-6. The CPU test holds 1e-5;
    # a dynamic-padding encoder is off by > 1e-3, so 5e-5 still separates right from wrong.
    assert max(errors.values()) < 5e-5, errors


def test_extraction_on_cuda_equals_cpu(tiny_phantom: Path, tmp_path: Path) -> None:
    def run(device: str) -> ActivationStore:
        cfg = ExtractConfig(
            data=tiny_phantom,
            model="efficientnet-phantom",
            out=tmp_path / device,
            split="all",
            image_size="128x80",
            dtype="float32",
            batch_size=4,
            workers=0,
            max_images=8,
            seed=0,
            device=device,
        )
        return ActivationStore(extract(cfg, progress=False))

    cpu, gpu = run("cpu"), run("cuda")
    assert cpu.n_images == gpu.n_images == 8
    assert _rel(gpu.pooled_nd, cpu.pooled_nd) < 1e-4
    for i in range(cpu.n_images):
        assert _rel(gpu.image_patches(i)[0], cpu.image_patches(i)[0]) < 1e-4


def _train(tmp: Path, device: str, x: torch.Tensor, **kw) -> dict[str, torch.Tensor]:
    base = dict(
        out=tmp / device,
        expansion=4,
        batch_size=128,
        epochs=4,
        lr=1e-3,
        l1_coeff=1e-3,
        progress=False,
        measure_matmul=False,
        eval_patches=512,
        log_every=5,
        resample_every=2,
        dead_window_patches=500,
        device=device,
        bf16=False,
        init="tied",
    )
    base.update(kw)
    out = train_sae(SAETrainConfig(**base), TensorSource(x))
    return {k: v.detach().cpu() for k, v in load_sae(out).state_dict().items()}


@pytest.mark.parametrize("arch", ["relu-l1", "topk"])
def test_sae_training_on_cuda_follows_cpu(tmp_path: Path, arch: str) -> None:
    """Same data, seed and fp32 maths: CUDA training (with resampling / AuxK) tracks the CPU run."""
    g = torch.Generator().manual_seed(0)
    x = 3 + 0.3 * torch.randn(2000, 32, generator=g)  # a common offset: some latents start dead
    cpu = _train(tmp_path / "a", "cpu", x, architecture=arch, k=4)
    gpu = _train(tmp_path / "b", "cuda", x, architecture=arch, k=4)
    for name in cpu:
        err = _rel(gpu[name], cpu[name].numpy())
        assert err < 1e-3, (name, err)


def test_bf16_training_on_cuda_learns(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    codes = torch.rand(4000, 128, generator=g) * (torch.rand(4000, 128, generator=g) < 0.03)
    x = codes @ torch.randn(128, 32, generator=g)
    out = train_sae(
        SAETrainConfig(
            out=tmp_path / "bf16",
            expansion=4,
            batch_size=256,
            epochs=30,
            lr=3e-3,
            l1_coeff=1e-4,
            progress=False,
            measure_matmul=True,
            eval_patches=2048,
            device="cuda",
            bf16=True,
            resample_every=5,
        ),
        TensorSource(x),
    )
    import json

    meta = json.loads((out / "cfg.json").read_text())
    assert meta["final_metrics"]["fvu"] < 0.2, meta["final_metrics"]


def test_store_resident_on_gpu_trains_like_cpu(tmp_path: Path) -> None:
    """The GPU-resident store loader feeds the same batches as on the CPU (its order is its own:
    a full permutation, not the streaming shuffle buffer)."""
    rng = np.random.default_rng(0)
    acts = [np.maximum(rng.normal(size=(50, 16)), 0).astype(np.float32) + 0.1 for _ in range(12)]
    write_store(tmp_path / "store", acts, grids=[(5, 10)] * 12, shard_images=5)
    weights = {}
    for device in ("cpu", "cuda"):
        out = train_sae(
            SAETrainConfig(
                store=tmp_path / "store",
                out=tmp_path / device,
                expansion=2,
                batch_size=64,
                epochs=3,
                lr=1e-3,
                progress=False,
                measure_matmul=False,
                eval_patches=256,
                device=device,
                bf16=False,
                data_in_memory="yes",
            )
        )
        weights[device] = load_sae(out).state_dict()
    for name, value in weights["cuda"].items():
        assert _rel(value.cpu(), weights["cpu"][name].cpu().numpy()) < 1e-4, name


def test_summaries_on_cuda_equal_cpu(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    acts = [np.abs(rng.normal(size=(12, 8))).astype(np.float32) for _ in range(10)]
    store = write_store(tmp_path / "store", acts, grids=[(3, 4)] * 10, shard_images=4)
    sae = SparseAutoencoder(
        SAEConfig(architecture="relu-l1", d=8, h=32, init="tied"), seed=0
    ).eval()
    cpu = compute_summaries(store, sae, batch_rows=20, progress=False)
    gpu = compute_summaries(store, sae.cuda(), batch_rows=20, progress=False)
    np.testing.assert_allclose(gpu.mean_nh.toarray(), cpu.mean_nh.toarray(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gpu.max_nh.toarray(), cpu.max_nh.toarray(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gpu.sse_n, cpu.sse_n, rtol=1e-4)
