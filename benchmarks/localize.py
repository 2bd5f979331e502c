"""Localisation cost per image at the VinDr frame (1520×912, 48×29 grid), printed, not asserted.

Two parts: (1) SAE encoding of one image's 1392 patch vectors at d = 2048, h = 16384 (a ReLU
SAE; every latent is computed even though 10 are kept), and (2) the per-latent work after it:
bilinear upsampling, the threshold, connected components, box scores. Run:
`.venv/bin/python benchmarks/localize.py`. Timings on a shared machine are noisy.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from scipy import ndimage

from mammo_sae.analysis.localize import average_precision, heatmap_boxes
from mammo_sae.analysis.maps import upsample

GRID, FRAME, D, H, N_LAT = (48, 29), (1520, 912), 2048, 16384, 10


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x_nd = torch.randn(GRID[0] * GRID[1], D)
    w_hd = torch.randn(H, D) / D**0.5
    b_h = torch.zeros(H) - 1.0

    def encode() -> torch.Tensor:
        with torch.no_grad():
            return torch.relu(x_nd @ w_hd.T + b_h)

    t_encode = best_of(encode)
    # Sparse, blobby latent maps like real ones: smoothed noise, zero below a level.
    maps = ndimage.gaussian_filter(rng.random((N_LAT, *GRID)), sigma=(0, 2, 2))
    maps = np.clip(maps - np.quantile(maps, 0.8), 0, None).astype(np.float32)
    heats: list[np.ndarray] = []
    t_up = best_of(lambda: heats.__setitem__(slice(None), list(upsample(maps, FRAME))))
    t_box = {}
    for rule in ("p95", "relmax:0.3"):
        boxes: list = []
        t_box[rule] = best_of(
            lambda boxes=boxes, rule=rule: boxes.__setitem__(
                slice(None), [heatmap_boxes(h, rule) for h in heats]
            )
        )
        n_boxes = sum(len(b) for b, _ in boxes)
        print(
            f"threshold {rule:>10}: {t_box[rule] / N_LAT * 1e3:7.1f} ms per latent-image "
            f"({n_boxes / N_LAT:.1f} boxes each)"
        )
    print(f"upsample {N_LAT} maps to {FRAME}: {t_up / N_LAT * 1e3:7.1f} ms per latent-image")
    print(f"encode 1 image ({x_nd.shape[0]} x {D} -> h = {H}): {t_encode * 1e3:7.1f} ms")

    # AP over a VinDr-sized evaluation: ~300 positive test images x 3 boxes each, 1 GT each.
    preds = [
        (np.sort(rng.uniform(0, 800, (3, 4)), axis=1)[:, [0, 1, 2, 3]], rng.random(3))
        for _ in range(300)
    ]
    gts = [np.array([[100.0, 100.0, 200.0, 220.0]]) for _ in range(300)]
    t_ap = best_of(lambda: average_precision(preds, gts, 0.25))
    per_image = t_encode + t_up + t_box["p95"]
    print(f"AP over 300 images x 3 boxes: {t_ap * 1e3:7.1f} ms")
    print(
        f"=> about {per_image:.2f} s per image for {N_LAT} latents "
        f"(encoding share {t_encode / per_image:.0%}); torch threads = {torch.get_num_threads()}"
    )


if __name__ == "__main__":
    main()
