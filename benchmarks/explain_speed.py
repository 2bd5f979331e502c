"""`mammo-sae explain` throughput (images/s) at 512x320 for the phantom backbone + a small SAE.

    python benchmarks/explain_speed.py           # CPU, 16 images, with and without heatmaps
    python benchmarks/explain_speed.py --device cuda --images 64 --h 16384

Measures `explain_images` end to end on PNGs written first (reading, Mammo-CLIP input, forward,
SAE encode, contributions, off-breast shares, thumbnails, explain.json and index.html), once
with a heatmap per top latent (matplotlib, up to 2 × --top PNGs per image) and once without.
Weights are random (He-initialised so activations do not vanish); speed does not depend on them.
Prints figures; asserts nothing. The load average is printed: on a shared machine numbers move.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from mammo_sae.analysis.explain import Explainer, explain_images
from mammo_sae.devices import resolve_device
from mammo_sae.models.checkpoints import save_model
from mammo_sae.models.classifier import ConceptClassifier
from mammo_sae.models.registry import create_encoder
from mammo_sae.sae.checkpoints import save_sae
from mammo_sae.sae.model import SAEConfig, SparseAutoencoder


def make_inputs(root: Path, n: int, hw: tuple[int, int]) -> list[Path]:
    """n grayscale PNGs at 1520x912 (the Mammo-CLIP frame), resized to hw by explain."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        img = np.zeros((1520, 912), np.uint8)
        img[100:1420, :600] = rng.integers(60, 200, size=(1320, 600), dtype=np.uint8)
        path = root / f"img{i:03d}.png"
        cv2.imwrite(str(path), img)
        paths.append(path)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--size", default="512x320")
    ap.add_argument("--h", type=int, default=2560, help="SAE latents (phantom demo: 2560)")
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    hw = tuple(int(v) for v in args.size.lower().split("x"))
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        encoder = create_encoder("efficientnet-phantom")
        for m in encoder.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        save_model(ConceptClassifier(encoder, 1, "Mass"), root / "clf")
        cfg = SAEConfig(architecture="relu-l1", d=encoder.out_channels, h=args.h, init="tied")
        save_sae(SparseAutoencoder(cfg, seed=0), root / "sae")
        (root / "png").mkdir()
        paths = make_inputs(root / "png", args.images, hw)  # type: ignore[arg-type]
        ex = Explainer.load(
            root / "clf",
            root / "sae",
            size_hw=hw,  # type: ignore[arg-type]
            device=device,
        )
        explain_images(ex, paths[:2], root / "warmup", top=args.top, progress=False)
        print(
            f"explain at {hw[0]}x{hw[1]}, efficientnet-phantom + SAE h={args.h}, "
            f"{args.images} images, batch {args.batch_size}, top {args.top}, device {device}, "
            f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}"
        )
        for heatmaps in (False, True):
            t0 = time.perf_counter()
            explain_images(
                ex,
                paths,
                root / f"out{int(heatmaps)}",
                top=args.top,
                batch_size=args.batch_size,
                heatmaps=heatmaps,
                progress=False,
            )
            dt = time.perf_counter() - t0
            n_png = len(list((root / f"out{int(heatmaps)}").rglob("latent_*.png")))
            print(
                f"  heatmaps={heatmaps!s:5}  {args.images / dt:6.2f} images/s  "
                f"({dt:.1f} s, {n_png} heatmap PNGs)"
            )


if __name__ == "__main__":
    main()
