"""A scaled-down fake of the real paper setup's directory layout (VinDr-Mammo PNGs + the
Mammo-CLIP downstream checkpoint archive), for running `configs/vindr-mammoclip-b5.yaml` in CI.

    ROOT/data/vindr/vindr_detection_v1_folds.csv        real rows, verbatim (boxes in the 912x1520 frame)
    ROOT/data/vindr/images_png/<patient_id>/<image_id>.png   tiny synthetic 8-bit PNGs
    ROOT/checkpoints/Downstream_evalualtion_b5_fold0/classification/Models/Classifier/
        {fine_tune,linear_probe}/{mass,calcification}/upmc_breast_clip_det_b5_period_n_{ft,lp}_...pth

The CSV rows are a real subset of `vindr_detection_v1_folds.csv` (both splits, Mass and
Suspicious_Calcification positives, all rows of each chosen image), so the loader sees the real
33-column format. The PNGs are smaller than the 912x1520 frame the CSV's boxes live in, on purpose:
the pipeline must rescale boxes itself (as it does for `data.image_size`). Each finding box gets a
bright blob (Mass) or dots (calcification) so the heatmap stages have something to find.

The four checkpoints are the B2 reference fixture (random weights, real downstream `.pth` layout)
re-saved with perturbed weights: the two linear-probe files share one encoder (the frozen
pretrained backbone) with their own heads; each finetuned file has its own encoder. The file names
are the B5 ones the config expects; the loader infers the architecture from the weights.

Run `python tests/fake_vindr.py OUT --fixture PTH` to build one by hand.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from mammo_sae.io import load_torch_weights

FOLDS_CSV = "vindr_detection_v1_folds.csv"
FRAME_HW = (1520, 912)  # the frame of the CSV's `resized_*` boxes
ARCHIVE = "Downstream_evalualtion_b5_fold0"  # sic, as released (Mammo-CLIP issue #31)
CLASSIFIER_DIR = Path("classification/Models/Classifier")
# (variant folder, label folder) -> file name, per the released archive (reference §5.2).
CHECKPOINT_FILES = {
    (
        "linear_probe",
        "mass",
    ): "upmc_breast_clip_det_b5_period_n_lp_seed_10_fold0_best_aucroc_ver084.pth",
    (
        "linear_probe",
        "calcification",
    ): "upmc_breast_clip_det_b5_period_n_lp_seed_10_fold0_best_aucroc_ver084.pth",
    # sic: a binary label under a density-style name in the release.
    (
        "fine_tune",
        "mass",
    ): "upmc_breast_clip_det_b5_period_n_ft_seed_10_fold0_best_acc_cancer_ver084.pth",
    (
        "fine_tune",
        "calcification",
    ): "upmc_breast_clip_det_b5_period_n_ft_seed_10_fold0_best_aucroc_ver084.pth",
}
# Images per (split, has Mass, has calcification): both splits, both concepts, some with both.
IMAGES_PER_GROUP = {
    ("training", 1, 0): 6,
    ("training", 0, 1): 5,
    ("training", 1, 1): 2,
    ("training", 0, 0): 11,
    ("test", 1, 0): 4,
    ("test", 0, 1): 3,
    ("test", 1, 1): 1,
    ("test", 0, 0): 8,
}


def select_rows(source_csv: Path, seed: int = 0) -> pd.DataFrame:
    """All rows of a seeded choice of images covering every (split, Mass, calcification) group."""
    df = pd.read_csv(source_csv, dtype=str, keep_default_na=False)  # verbatim strings
    per_image = df.assign(
        mass=df["Mass"].astype(int), calc=df["Suspicious_Calcification"].astype(int)
    )
    per_image = per_image.groupby("image_id").agg(
        split=("split", "first"), mass=("mass", "max"), calc=("calc", "max")
    )
    rng = np.random.default_rng(seed)
    chosen: list[str] = []
    for (split, mass, calc), n in IMAGES_PER_GROUP.items():
        ids = sorted(
            per_image.index[
                (per_image.split == split) & (per_image.mass == mass) & (per_image.calc == calc)
            ]
        )
        if len(ids) < n:
            raise ValueError(
                f"{source_csv}: only {len(ids)} images for {split} Mass={mass} calc={calc}"
            )
        chosen.extend(rng.choice(ids, size=n, replace=False).tolist())
    return df[df["image_id"].isin(set(chosen))].reset_index(drop=True)


def _image_rng(image_id: str) -> np.random.Generator:
    return np.random.default_rng(int(hashlib.sha256(image_id.encode()).hexdigest()[:8], 16))


def render_image(rows: pd.DataFrame, size_hw: tuple[int, int]) -> np.ndarray:
    """A uint8 breast-like image with a bright blob in every Mass box and dots in every
    calcification box (boxes rescaled from the 912x1520 frame)."""
    h, w = size_hw
    rng = _image_rng(str(rows["image_id"].iloc[0]))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    left = rows["laterality"].iloc[0] == "R"  # chest wall on the image's left for R
    cx = 0.0 if left else w - 1.0
    breast = ((xx - cx) / (0.95 * w)) ** 2 + ((yy - h / 2) / (0.48 * h)) ** 2 <= 1.0
    img = np.where(breast, 90 + 40 * rng.random((h, w)), 0.0).astype(np.float32)
    sy, sx = h / FRAME_HW[0], w / FRAME_HW[1]
    for _, row in rows.iterrows():
        try:
            x0, y0, x1, y1 = (float(row[f"resized_{k}"]) for k in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError:  # rows without a box
            continue
        if not np.isfinite([x0, y0, x1, y1]).all():
            continue
        bx0, by0, bx1, by1 = x0 * sx, y0 * sy, x1 * sx, y1 * sy
        if row["Mass"] == "1":
            r = max(2.0, 0.5 * min(bx1 - bx0, by1 - by0))
            blob = np.exp(-(((xx - (bx0 + bx1) / 2) ** 2 + (yy - (by0 + by1) / 2) ** 2) / (r * r)))
            img += 120 * blob
        if row["Suspicious_Calcification"] == "1":
            for _ in range(6):
                px = int(np.clip(rng.uniform(bx0, bx1), 0, w - 1))
                py = int(np.clip(rng.uniform(by0, by1), 0, h - 1))
                img[max(0, py - 1) : py + 1, max(0, px - 1) : px + 1] = 255
    return np.clip(img, 0, 255).astype(np.uint8)


def write_data(
    root: Path, source_csv: Path, size_hw: tuple[int, int] = (256, 160), seed: int = 0
) -> Path:
    """`root` gets the folds CSV (real rows) and `images_png/<patient_id>/<image_id>.png`."""
    rows = select_rows(source_csv, seed)
    root.mkdir(parents=True, exist_ok=True)
    rows.to_csv(root / FOLDS_CSV, index=False)
    for image_id, image_rows in rows.groupby("image_id", sort=False):
        path = (
            root / "images_png" / image_rows["patient_id"].iloc[0] / str(image_id)
        )  # id ends in .png
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(render_image(image_rows, size_hw)).save(path)
    return root


def _perturbed(t: torch.Tensor, gen: torch.Generator, scale: float) -> torch.Tensor:
    spread = t.std() if t.numel() > 1 else t.abs().mean() + 0.1  # a 1-element bias has no std
    return t + scale * spread * torch.randn(t.shape, generator=gen, dtype=t.dtype)


def write_checkpoints(
    archive_parent: Path, fixture: Path, seed: int = 0
) -> dict[tuple[str, str], Path]:
    """The four downstream `.pth` files under `archive_parent/Downstream_evalualtion_b5_fold0/...`,
    in the real layout (`model` state dict, `predictions` ndarray, `epoch`, `auroc` numpy float)."""
    base = load_torch_weights(fixture, "a Mammo-CLIP classifier")
    gen = torch.Generator().manual_seed(seed)
    head_keys = [k for k in base["model"] if k.startswith("classifier.")]
    # A late encoder layer is enough to make the encoders differ without breaking calibration.
    encoder_keys = ["image_encoder._conv_head.weight"]
    pretrained_encoder = {k: _perturbed(base["model"][k], gen, 0.1) for k in encoder_keys}
    out: dict[tuple[str, str], Path] = {}
    for (variant, label), name in CHECKPOINT_FILES.items():
        sd = dict(base["model"])  # same key order as the release
        encoder = (
            pretrained_encoder
            if variant == "linear_probe"
            else {k: _perturbed(base["model"][k], gen, 0.2) for k in encoder_keys}
        )
        sd.update(encoder)
        sd.update({k: _perturbed(base["model"][k], gen, 0.5) for k in head_keys})
        state = type(base["model"])(sd)
        predictions = np.asarray(base["predictions"]).copy()
        path = archive_parent / ARCHIVE / CLASSIFIER_DIR / variant / label / name
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "model": state,
                "predictions": predictions,
                "epoch": int(base["epoch"]),
                "auroc": np.float64(base["auroc"]),
            },
            path,
        )
        out[(variant, label)] = path
    return out


def build_fake_vindr(
    root: Path,
    source_csv: Path,
    fixture: Path,
    *,
    size_hw: tuple[int, int] = (256, 160),
    seed: int = 0,
) -> Path:
    """`root/data/vindr` and `root/checkpoints/Downstream_evalualtion_b5_fold0`: the layout the
    paper config's relative paths expect when run from `root`."""
    write_data(root / "data" / "vindr", source_csv, size_hw, seed)
    write_checkpoints(root / "checkpoints", fixture, seed)
    return root


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--csv", type=Path, default=Path("../shared/data/vindr") / FOLDS_CSV)
    p.add_argument("--fixture", type=Path, required=True, help="B2 downstream .pth fixture")
    args = p.parse_args()
    print(build_fake_vindr(args.out, args.csv, args.fixture))


if __name__ == "__main__":
    main()
