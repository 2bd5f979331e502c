"""Can a small CNN learn the phantom's planted concepts from pixels? (sanity check, CPU)

Generates a phantom at 256x160, trains a 4-layer CNN for a few epochs on the training split
(multi-label Mass / Suspicious_Calcification), and prints test AUROCs next to two baselines
that must stay near 0.5: mean breast brightness, and the marker (independent in test).
Usage: python benchmarks/phantom_learnability.py [--n-images 800] [--epochs 6]
           [--confounder-concept none|Mass] [--confounder-strength 0.8]
Prints figures, asserts nothing; runtime ~1-3 min on 2 shared cores.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn

from mammo_sae.data.phantom import CSV_NAME, IMAGE_DIR, PhantomConfig, generate
from mammo_sae.metrics import auroc

CONCEPTS = ("Mass", "Suspicious_Calcification")


def load(data_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    frame = pd.read_csv(data_dir / CSV_NAME)
    images = frame.groupby("image_id", sort=False).agg(
        patient_id=("patient_id", "first"),
        split=("split", "first"),
        confounder=("confounder", "first"),
        **{c: (c, "max") for c in CONCEPTS},
    )
    x = np.stack(
        [
            np.asarray(Image.open(data_dir / IMAGE_DIR / r.patient_id / i), dtype=np.float32)
            for i, r in images.iterrows()
        ]
    )
    lo, hi = x.min(axis=(1, 2), keepdims=True), x.max(axis=(1, 2), keepdims=True)
    x = ((x - lo) / (hi - lo) - 0.3089279) / 0.25053555408335154  # Mammo-CLIP normalisation
    return (
        x[:, None],
        images[list(CONCEPTS)].to_numpy(np.float32),
        images["split"].to_numpy(),
        images["confounder"].to_numpy(),
    )


def small_cnn(pool: str) -> nn.Module:
    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [
            nn.Conv2d(c_in, c_out, 3, padding=1),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]

    return nn.Sequential(
        *block(1, 16),
        *block(16, 32),
        *block(32, 64),
        *block(64, 64),
        *block(64, 64),
        nn.Conv2d(64, len(CONCEPTS), 1),
        nn.AdaptiveMaxPool2d(1) if pool == "max" else nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-images", type=int, default=800)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--confounder-concept", default="none")
    parser.add_argument("--confounder-strength", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--pool",
        choices=["mean", "max"],
        default="mean",
        help="global pooling of the logit map (mean = like the package's classifier head)",
    )
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = PhantomConfig(
            out=Path(tmp),
            n_images=args.n_images,
            height=256,
            width=160,
            seed=args.seed,
            confounder_concept=args.confounder_concept,
            confounder_strength=args.confounder_strength,
            test_fraction=0.3,
        )
        generate(cfg, progress=False)
        x_n1hw, y_nc, split, marker = load(Path(tmp))
    train, test = split == "training", split == "test"
    print(
        f"images: {train.sum()} training / {test.sum()} test; positives (train) "
        f"{dict(zip(CONCEPTS, y_nc[train].sum(0).astype(int)))}"
    )
    brightness = x_n1hw.reshape(len(x_n1hw), -1).mean(1)
    for c, concept in enumerate(CONCEPTS):
        print(
            f"baseline test AUROC {concept}: mean brightness {auroc(y_nc[test, c], brightness[test]):.3f}, "
            f"marker {auroc(y_nc[test, c], marker[test].astype(float)):.3f}"
        )

    model = small_cnn(args.pool)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    xt, yt = torch.from_numpy(x_n1hw[train]), torch.from_numpy(y_nc[train])
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(xt))
        for i in range(0, len(xt), 16):
            idx = order[i : i + 16]
            loss = nn.functional.binary_cross_entropy_with_logits(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            scores = torch.sigmoid(model(torch.from_numpy(x_n1hw[test]))).numpy()
        aucs = ", ".join(
            f"{c} {auroc(y_nc[test, k], scores[:, k]):.3f}" for k, c in enumerate(CONCEPTS)
        )
        print(
            f"epoch {epoch + 1}: loss {loss.item():.3f}; test AUROC {aucs} ({time.perf_counter() - t0:.0f} s)"
        )


if __name__ == "__main__":
    main()
