"""Full top-k sweep (2 modes × 12 k, bootstrap CIs) from cached latent summaries vs full decode.

Synthetic data at the paper's scale: 4,000 test images, h = 16384 latents, d = 2048, each
image's mean latent vector ~1 % dense (the released SAE fires < 1000 latents on VinDr). The
fast path (pooled identity, `intervene.sweep`) runs for `--models` models; the exact path
(`intervene.exact_decode_logits`: encode, mask, decode every patch, mean, head) is timed on a
few images with few patches and extrapolated linearly to 4,000 images × 1392 patches (the
48×29 map of a 1520×912 input), since its cost is matmuls linear in the patch count.

    .venv/bin/python benchmarks/intervene_sweep.py [--n-boot 1000] [--models 4]

Timings on a shared CPU are noisy; they are printed, never asserted.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.sparse as sp
import torch

from mammo_sae.analysis.intervene import (
    DEFAULT_KS,
    LinearHead,
    entry_rank,
    exact_decode_logits,
    normalise_ks,
    pooled_logits,
    sae_readout,
    sweep,
    union_masks,
)
from mammo_sae.sae.model import SAEConfig, SparseAutoencoder


class _MemStore:
    def __init__(self, acts: list[np.ndarray]) -> None:
        self.acts = acts

    def image_patches(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        p = len(self.acts[i])
        return self.acts[i], np.zeros(p, np.int64), np.arange(p)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--h", type=int, default=16384)
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--density", type=float, default=0.01)
    ap.add_argument("--models", type=int, default=4)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--exact-images", type=int, default=2)
    ap.add_argument(
        "--exact-patches", type=int, default=64, help="patches per image in the exact sample"
    )
    ap.add_argument("--patches-per-image", type=int, default=1392, help="for the extrapolation")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rng = np.random.default_rng(0)
    n, h, d = args.images, args.h, args.d
    ks = normalise_ks(DEFAULT_KS, h)

    sae = SparseAutoencoder(SAEConfig(architecture="relu-l1", d=d, h=h, init="tied"), seed=0).eval()
    v_sample = None
    fast_times = []
    for m in range(args.models):
        mean_nh = sp.random(
            n, h, density=args.density, format="csr", random_state=m, dtype=np.float32
        )
        y = (rng.random(n) < 0.05).astype(int)
        head = LinearHead(w_d=rng.normal(size=d), b=0.0)
        rankings = [rng.permutation(h), rng.permutation(h)]
        t0 = time.perf_counter()
        v, c = sae_readout(sae, head)
        res = sweep(
            y, rankings, len(v), pooled_logits(mean_nh, v, c), ks, n_boot=args.n_boot, seed=0
        )
        fast_times.append(time.perf_counter() - t0)
        v_sample = (head, rankings)
        assert len(res.rows()) == 2 * len(ks)

    # Exact path on a small sample, extrapolated.
    head, rankings = v_sample
    masks = union_masks(entry_rank(rankings, h), ks)
    acts = [
        np.abs(rng.normal(size=(args.exact_patches, d))).astype(np.float32)
        for _ in range(args.exact_images)
    ]
    t0 = time.perf_counter()
    exact_decode_logits(_MemStore(acts), sae, head, range(args.exact_images), masks)
    t_exact = time.perf_counter() - t0
    per_patch = t_exact / (args.exact_images * args.exact_patches)
    extrapolated = per_patch * n * args.patches_per_image

    total_fast = sum(fast_times)
    print(f"torch threads {torch.get_num_threads()}; shared CPU: timings are noisy")
    print(
        f"fast sweep (pooled identity), {n} images × h={h}, {2 * len(ks)} curves, "
        f"{args.n_boot} bootstrap resamples:"
    )
    for m, t in enumerate(fast_times):
        print(f"  model {m}: {t:.2f} s")
    print(f"  {args.models} models: {total_fast:.2f} s (target < 5 s)")
    print(
        f"exact decode: {t_exact:.2f} s for {args.exact_images} images × {args.exact_patches} patches "
        f"({per_patch * 1e3:.1f} ms/patch for {2 * len(ks)} masked decodes)"
    )
    print(
        f"  extrapolated to {n} images × {args.patches_per_image} patches: "
        f"{extrapolated:.0f} s = {extrapolated / 3600:.1f} h per model (metrics excluded)"
    )
    print(f"speedup per model: {extrapolated / (total_fast / args.models):.0f}×")


if __name__ == "__main__":
    main()
