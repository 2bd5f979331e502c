"""Phantom generator: layout contract, determinism, exact boxes, confounder design, bad input."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage

from mammo_sae.cli import main
from mammo_sae.data.phantom import (
    CALC,
    MASS,
    PhantomConfig,
    generate,
    plan,
    render_image,
)
from mammo_sae.errors import DataError
from mammo_sae.metrics import auroc

# Written out from the reference (vindr-mammo-metadata.md §3.1), not imported from the module.
FOLDS_33 = [
    "patient_id",
    "series_id",
    "image_id",
    "laterality",
    "view",
    "height",
    "width",
    "breast_birads",
    "breast_density",
    "finding_categories",
    "finding_birads",
    "xmin",
    "ymin",
    "xmax",
    "ymax",
    "split",
    "resized_xmin",
    "resized_ymin",
    "resized_xmax",
    "resized_ymax",
    "fold",
    "Architectural_Distortion",
    "Asymmetry",
    "Focal_Asymmetry",
    "Global_Asymmetry",
    "Mass",
    "Nipple_Retraction",
    "No_Finding",
    "Skin_Retraction",
    "Skin_Thickening",
    "Suspicious_Calcification",
    "Suspicious_Lymph_Node",
    "density",
]
MARKER_COLUMNS = [
    "confounder",
    "confounder_xmin",
    "confounder_ymin",
    "confounder_xmax",
    "confounder_ymax",
]


def _csv(data_dir: Path) -> pd.DataFrame:
    return pd.read_csv(data_dir / "vindr_detection_v1_folds.csv", dtype={"finding_birads": str})


def _cfg(tmp_path: Path, **kw) -> PhantomConfig:
    base = dict(out=tmp_path / "ph", n_images=12, height=192, width=128, seed=3, workers=1)
    return PhantomConfig(**{**base, **kw})


def test_csv_columns_and_rows(tiny_phantom: Path) -> None:
    frame = _csv(tiny_phantom)
    assert list(frame.columns) == FOLDS_33 + MARKER_COLUMNS
    assert frame["image_id"].str.fullmatch(r"[0-9a-f]{32}\.png").all()
    assert frame["image_id"].nunique() == 40
    # One row per finding, one No Finding row for clean images, never both.
    per_image = frame.groupby("image_id")
    assert (per_image["No_Finding"].sum() <= 1).all()
    clean = frame[frame["No_Finding"] == 1]
    assert clean[["resized_xmin", "xmin"]].isna().all().all()
    assert (clean["finding_categories"] == "['No Finding']").all()
    boxed = frame[frame["No_Finding"] == 0]
    assert (boxed[["Mass", "Suspicious_Calcification"]].sum(axis=1) == 1).all()
    assert (
        boxed[["xmin", "ymin", "xmax", "ymax"]].to_numpy()
        == boxed[["resized_xmin", "resized_ymin", "resized_xmax", "resized_ymax"]].to_numpy()
    ).all()
    for col in [
        "Architectural_Distortion",
        "Asymmetry",
        "Skin_Thickening",
        "Suspicious_Lymph_Node",
    ]:
        assert (frame[col] == 0).all()
    assert set(frame["density"]) <= {0, 1, 2, 3}
    assert (
        frame["breast_density"] == frame["density"].map(dict(enumerate("ABCD"))).radd("DENSITY ")
    ).all()
    assert (frame["height"] == 256).all() and (frame["width"] == 160).all()


def test_columns_match_real_folds_csv_header() -> None:
    from conftest import need_shared

    path = need_shared("data", "vindr", "vindr_detection_v1_folds.csv")
    assert list(pd.read_csv(path, nrows=0).columns) == FOLDS_33


def test_images_are_8bit_with_dark_background(tiny_phantom: Path) -> None:
    frame = _csv(tiny_phantom).drop_duplicates("image_id")
    for _, row in frame.iterrows():
        image = Image.open(tiny_phantom / "images_png" / row["patient_id"] / row["image_id"])
        assert image.mode == "L" and image.size == (160, 256)
    pixels = np.asarray(image)
    # A plain threshold separates breast from background: most pixels are either dark or tissue.
    assert (pixels < 20).mean() > 0.1 and (pixels > 40).mean() > 0.4


def test_phantom_json(tiny_phantom: Path) -> None:
    import json

    meta = json.loads((tiny_phantom / "phantom.json").read_text())
    assert (meta["height"], meta["width"], meta["seed"]) == (256, 160, 0)
    assert meta["schema_version"] == 1 and meta["version"]
    assert meta["params"]["n_images"] == 40


def test_deterministic_and_parallel_identical(tmp_path: Path) -> None:
    a = _cfg(tmp_path, out=tmp_path / "a", workers=1)
    b = _cfg(tmp_path, out=tmp_path / "b", workers=2, n_images=12)
    generate(a, progress=False)
    generate(dataclasses.replace(b), progress=False)
    files_a = sorted(p.relative_to(a.out) for p in a.out.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b.out) for p in b.out.rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) == 12 + 2
    for rel in files_a:
        assert (a.out / rel).read_bytes() == (b.out / rel).read_bytes(), rel
    c = _cfg(tmp_path, out=tmp_path / "c", seed=4)
    generate(c, progress=False)
    assert (c.out / "vindr_detection_v1_folds.csv").read_bytes() != (
        a.out / "vindr_detection_v1_folds.csv"
    ).read_bytes()


def test_every_box_covers_its_finding_and_marker_is_outside_breast(tmp_path: Path) -> None:
    cfg = _cfg(
        tmp_path,
        n_images=24,
        height=256,
        width=160,
        mass_prevalence=1.0,
        calc_prevalence=1.0,
        confounder_concept="none",
    )
    n_findings = n_markers = 0
    for spec in plan(cfg):
        out = render_image(spec, cfg.height, cfg.width, cfg.seed, return_masks=True)
        assert len(out.finding_boxes) == len(spec.findings) == len(out.finding_masks)
        for finding, box, mask in zip(spec.findings, out.finding_boxes, out.finding_masks):
            assert box.concept == finding.concept
            rows, cols = np.nonzero(mask)
            # Tight: pixel-edge box equals the extent of the changed pixels.
            assert (box.x0, box.y0, box.x1, box.y1) == (
                cols.min(),
                rows.min(),
                cols.max() + 1,
                rows.max() + 1,
            )
            assert 0 <= box.x0 < box.x1 <= cfg.width and 0 <= box.y0 < box.y1 <= cfg.height
            assert out.breast_mask_hw[mask].all()
            n_findings += 1
        if spec.marker:
            box = out.marker_box
            assert box is not None and box.concept == "confounder"
            assert out.marker_mask.sum() == (box.x1 - box.x0) * (box.y1 - box.y0)
            assert not (out.marker_mask & out.breast_mask_hw).any()
            n_markers += 1
        else:
            assert out.marker_box is None
    assert n_findings >= 48 and n_markers > 0


def test_findings_change_only_pixels_inside_their_boxes(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, n_images=6, mass_prevalence=1.0, calc_prevalence=1.0)
    for spec in plan(cfg):
        with_findings = render_image(spec, cfg.height, cfg.width, cfg.seed).pixels_hw.astype(int)
        clean = render_image(
            dataclasses.replace(spec, findings=()), cfg.height, cfg.width, cfg.seed
        )
        changed = with_findings != clean.pixels_hw
        inside = np.zeros_like(changed)
        for box in render_image(spec, cfg.height, cfg.width, cfg.seed).finding_boxes:
            inside[int(box.y0) : int(box.y1), int(box.x0) : int(box.x1)] = True
        assert changed.any() and not (changed & ~inside).any()


def test_findings_and_marker_leave_min_and_max_unchanged(tmp_path: Path) -> None:
    """Per-image min-max normalisation must not become a global cue for findings or marker."""
    cfg = _cfg(
        tmp_path, n_images=12, mass_prevalence=1.0, calc_prevalence=1.0, confounder_concept="none"
    )
    for spec in plan(cfg):
        full = render_image(spec, cfg.height, cfg.width, cfg.seed).pixels_hw
        bare = render_image(
            dataclasses.replace(spec, findings=(), marker=False), cfg.height, cfg.width, cfg.seed
        ).pixels_hw
        assert (full.min(), full.max()) == (bare.min(), bare.max()) and full.min() == 0
        assert (full != bare).any()


def test_calcification_specks_stay_visible_at_256x160(tmp_path: Path) -> None:
    cfg = _cfg(
        tmp_path, n_images=16, height=256, width=160, mass_prevalence=0.0, calc_prevalence=1.0
    )
    for spec in plan(cfg):
        out = render_image(spec, cfg.height, cfg.width, cfg.seed, return_masks=True)
        for mask in out.finding_masks:
            labels, n = ndimage.label(mask)
            sizes = ndimage.sum(mask, labels, range(1, n + 1))
            assert n >= 2 and sizes.min() >= 2
            ring = (
                ndimage.binary_dilation(mask, iterations=3)
                & ~ndimage.binary_dilation(mask)
                & out.breast_mask_hw
            )
            assert out.pixels_hw[mask].mean() > out.pixels_hw[ring].mean() + 25


def test_confounder_follows_concept_in_training_only() -> None:
    cfg = PhantomConfig(out=Path("unused"), n_images=3000, confounder_strength=0.8)
    specs = plan(cfg)
    for split in ("training", "test"):
        part = [s for s in specs if s.split == split]
        marker = np.array([s.marker for s in part], dtype=float)
        for concept in (MASS, CALC):
            label = np.array([s.label(concept) for s in part], dtype=float)
            corr = np.corrcoef(marker, label)[0, 1]
            if split == "training" and concept == MASS:
                assert corr > 0.6, corr
            elif split == "test":
                assert abs(corr) < 0.03, (concept, corr)
    train = [s for s in specs if s.split == "training"]
    pos = [s.marker for s in train if s.label(MASS)]
    neg = [s.marker for s in train if not s.label(MASS)]
    assert abs(np.mean(pos) - 0.9) < 0.01 and abs(np.mean(neg) - 0.1) < 0.01
    test_rate = np.mean([s.marker for s in specs if s.split == "test"])
    assert abs(test_rate - np.mean([s.marker for s in train])) < 0.02


def test_patient_level_split_and_consistent_views(tiny_phantom: Path) -> None:
    frame = _csv(tiny_phantom)
    per_patient = frame.groupby("patient_id")
    for col in ("split", "fold", "laterality", "density", "breast_birads"):
        assert (per_patient[col].nunique() == 1).all(), col
    assert set(frame["split"]) == {"training", "test"} and set(frame["fold"]) <= {0, 1, 2, 3}
    images = frame.drop_duplicates("image_id")
    assert (
        images.groupby("patient_id")["view"].apply(sorted) == pd.Series([["CC", "MLO"]] * 20).values
    ).all()
    # Same findings (concept counts) in CC and MLO of a patient.
    counts = frame.groupby(["patient_id", "view"])[["Mass", "Suspicious_Calcification"]].sum()
    cc, mlo = counts.xs("CC", level="view"), counts.xs("MLO", level="view")
    assert (cc == mlo.loc[cc.index]).all().all()
    # Stratified prevalence keeps positives in both splits of a small dataset.
    for split in ("training", "test"):
        part = frame[frame["split"] == split]
        assert part["Mass"].sum() > 0 and part["Suspicious_Calcification"].sum() > 0


def test_mass_not_given_away_by_global_brightness(tmp_path: Path) -> None:
    cfg = _cfg(
        tmp_path,
        n_images=160,
        height=128,
        width=80,
        mass_prevalence=0.5,
        calc_prevalence=0.0,
        confounder_concept="none",
    )
    specs = plan(cfg)
    means, has_mass, density = [], [], []
    for spec in specs:
        pixels = render_image(spec, cfg.height, cfg.width, cfg.seed).pixels_hw
        means.append(pixels[pixels > 20].mean())
        has_mass.append(spec.label(MASS))
        density.append(spec.density)
    assert 0.3 < auroc(np.array(has_mass), np.array(means)) < 0.7
    from scipy.stats import spearmanr

    assert spearmanr(density, means).statistic > 0.5


def test_full_size_smoke() -> None:
    cfg = PhantomConfig(
        out=Path("unused"),
        n_images=2,
        height=1520,
        width=912,
        mass_prevalence=1.0,
        calc_prevalence=1.0,
        test_fraction=0.0,
    )
    spec = plan(cfg)[1]
    out = render_image(spec, 1520, 912, cfg.seed)
    assert out.pixels_hw.shape == (1520, 912) and out.pixels_hw.dtype == np.uint8
    assert len(out.finding_boxes) >= 2
    assert all(0 <= b.x0 < b.x1 <= 912 and 0 <= b.y0 < b.y1 <= 1520 for b in out.finding_boxes)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"n_images": 1}, "--n-images must be at least 2"),
        ({"n_images": 2}, "needs at least 2 patients"),
        ({"height": 16}, "--height/--width"),
        ({"mass_prevalence": 1.5}, "--mass-prevalence must be in [0, 1]"),
        ({"confounder_strength": -0.1}, "--confounder-strength"),
        ({"test_fraction": 1.0}, "--test-fraction"),
        ({"workers": -1}, "--workers"),
    ],
)
def test_bad_arguments(tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        generate(_cfg(tmp_path, **change), progress=False)
    assert not (tmp_path / "ph").exists()


def test_cli_exit_codes_and_existing_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli"
    args = [
        "phantom",
        "--out",
        str(out),
        "--n-images",
        "6",
        "--height",
        "128",
        "--width",
        "80",
        "--workers",
        "1",
    ]
    assert main(args) == 0
    assert '"cached": false' in capsys.readouterr().out
    assert main(args) == 0  # same settings: left as it is
    assert '"cached": true' in capsys.readouterr().out
    assert main(args + ["--seed", "9"]) == 2  # other settings: refuses without --overwrite
    assert "differs in: seed" in capsys.readouterr().err
    assert main(args + ["--seed", "9", "--overwrite"]) == 0
    assert main(["phantom", "--out", str(out), "--n-images", "0"]) == 2
    foreign = tmp_path / "real"
    foreign.mkdir()
    (foreign / "vindr_detection_v1_folds.csv").write_text("patient_id\n")
    assert main(["phantom", "--out", str(foreign)]) == 2
    assert "not a phantom" in capsys.readouterr().err


def test_figure(tiny_phantom: Path, tmp_path: Path) -> None:
    from mammo_sae.data.phantom import save_figure

    path = save_figure(tiny_phantom, tmp_path / "fig.png", n=4)
    assert Image.open(path).size[0] > 200


def test_reader_maps_confounder_columns(tiny_phantom: Path) -> None:
    vindr = pytest.importorskip("mammo_sae.data.vindr")
    if not hasattr(vindr, "load_records"):
        pytest.skip("mammo_sae.data.vindr.load_records not built yet")
    records = vindr.load_records(tiny_phantom)
    frame = _csv(tiny_phantom).drop_duplicates("image_id").set_index("image_id")
    assert len(records) == 40
    for rec in records:
        row = frame.loc[f"{rec.image_id}.png"]
        assert rec.labels["confounder"] == row["confounder"]
        assert len(rec.boxes_of("confounder")) == row["confounder"]
