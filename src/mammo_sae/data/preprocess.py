"""VinDr DICOM tree -> Mammo-CLIP PNG layout + a folds-style CSV with boxes in the PNG frame.

Image steps (Mammo-CLIP `preprocess_image_to_png_vindr.py`, re-implemented):
 1. stored pixels (pydicom), 2. crop 5 px from every border, 3. MONOCHROME1: x <- max - x,
 4. x <- uint8(255 * (x - min) / (max - min)) (truncation), 5. breast crop (`breast_window`),
 6. resize to 912 x 1520 (W x H) with `cv2.INTER_AREA`, 7. `images_png/<patient_id>/<image_id>.png`.

Boxes (original DICOM pixels, x = column) map with the *correct* axes:
 x' = clip(x - 5, 0, W - 10), y' = clip(y - 5, 0, H - 10), then
 resized_x = (x' - c0) * out_w / crop_w, resized_y = (y' - r0) * out_h / crop_h.
(The reference clamps x by H - 10 and y by W - 10, truncating 61 VinDr boxes; not copied.)
Boxes are not clipped to the PNG frame here; the reader clips and counts them.

Resumable: after an image's PNG is written, its crop geometry goes to `.preprocess/<image_id>.json`;
a rerun skips images that have both. Parallel over images (processes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from ..errors import DataError
from ..io import write_bytes_atomic, write_json, write_text_atomic
from .images import find_dicom_file, read_dicom
from .records import FINDING_CONCEPTS, FOLDS_COLUMNS, check_ids
from .vindr import (
    FOLDS_CSV,
    IMAGES_DIR,
    OFFICIAL_REQUIRED,
    _density_letters,
    _read_csv,
    _require_columns,
    parse_categories,
)

log = logging.getLogger(__name__)

BORDER = 5  # pixels cropped from every side before anything else
BACKGROUND_CUTOFF = 40  # uint8 level at or below which a pixel counts as background
STATE_DIR = ".preprocess"
SCHEMA_VERSION = 1
BREAST_REQUIRED = (
    "study_id",
    "image_id",
    "laterality",
    "view_position",
    "height",
    "width",
    "breast_birads",
    "breast_density",
    "split",
)


@dataclass(frozen=True)
class CropGeometry:
    """Where an image's PNG came from: original size, photometric, breast crop in the
    border-cropped frame (rows r0:r0+crop_h, columns c0:c0+crop_w), output size."""

    image_id: str
    height: int
    width: int
    photometric: str
    r0: int
    c0: int
    crop_h: int
    crop_w: int
    out_h: int
    out_w: int

    def map_box(
        self, xmin: float, ymin: float, xmax: float, ymax: float
    ) -> tuple[float, float, float, float]:
        """Original-pixel box -> PNG-frame box (correct clamps on both axes, no frame clipping)."""
        sx, sy = self.out_w / self.crop_w, self.out_h / self.crop_h

        def mx(x: float) -> float:
            return (min(max(x - BORDER, 0.0), self.width - 2 * BORDER) - self.c0) * sx

        def my(y: float) -> float:
            return (min(max(y - BORDER, 0.0), self.height - 2 * BORDER) - self.r0) * sy

        return mx(xmin), my(ymin), mx(xmax), my(ymax)


# ---------------------------------------------------------------------------- image steps


def _longest_run(marked: np.ndarray) -> tuple[int, int]:
    """[start, stop) of the longest run of True (the first one when tied)."""
    if not marked.any():
        return 0, 0
    padded = np.concatenate([[False], marked, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    starts, stops = edges[0::2], edges[1::2]
    best = int(np.argmax(stops - starts))
    return int(starts[best]), int(stops[best])


def breast_window(u8_hw: np.ndarray) -> tuple[int, int, int, int]:
    """(r0, r1, c0, c1) of Mammo-CLIP's `ExtractBreast` crop of a uint8 image.

    Pixels <= 40 are zeroed on a copy; over the central 80 % of rows, columns with non-zero
    standard deviation are marked and the longest run kept; then the same for rows over the
    central 80 % of the kept columns. Ties keep the first run (the reference keeps every
    position of tied runs, which is rare and ill-defined as a crop).
    """
    x = np.where(u8_hw > BACKGROUND_CUTOFF, u8_hw, 0).astype(np.float32)
    h = x.shape[0]
    band = x[h // 2 - int(0.4 * h) : h // 2 + int(0.4 * h)]
    c0, c1 = _longest_run(band.std(axis=0) > 0)
    if c1 <= c0:
        raise DataError("no breast found: the image is blank after the background cut-off")
    cols = x[:, c0:c1]
    w = cols.shape[1]
    cols = cols[:, w // 2 - int(0.4 * w) : w // 2 + int(0.4 * w)] if int(0.4 * w) > 0 else cols
    r0, r1 = _longest_run(cols.std(axis=1) > 0)
    if r1 <= r0:
        raise DataError("no breast found: no rows vary inside the breast columns")
    return r0, r1, c0, c1


def mammo_clip_u8(
    raw: np.ndarray, photometric: str, where: str | os.PathLike[str], *, crop: bool = True
) -> tuple[np.ndarray, int, int]:
    """Steps 2-5 on stored pixels: (uint8 image, r0, c0) with (r0, c0) the top-left corner of
    the kept window in the border-cropped frame. `crop=False` keeps the whole border-cropped
    frame (no breast crop)."""
    height, width = raw.shape
    if height <= 2 * BORDER + 1 or width <= 2 * BORDER + 1:
        raise DataError(f"{where}: image {raw.shape} too small for the {BORDER}-px border crop")
    x = raw[BORDER:-BORDER, BORDER:-BORDER].astype(np.float64)
    if photometric == "MONOCHROME1":
        x = x.max() - x
    x -= x.min()
    peak = x.max()
    if peak <= 0:
        raise DataError(f"{where}: constant image, nothing to preprocess")
    u8 = (x / peak * 255).astype(np.uint8)  # truncation, as the reference
    if not crop:
        return u8, 0, 0
    try:
        r0, r1, c0, c1 = breast_window(u8)
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from exc
    return u8[r0:r1, c0:c1], r0, c0


def dicom_to_png(
    dicom_path: Path, png_path: Path, image_id: str, out_hw: tuple[int, int], *, crop: bool = True
) -> CropGeometry:
    """Steps 1-7 for one image; writes the PNG atomically and returns its crop geometry."""
    raw, photometric = read_dicom(dicom_path, invert_monochrome1=False)
    height, width = raw.shape
    u8, r0, c0 = mammo_clip_u8(raw, photometric, dicom_path, crop=crop)
    out_h, out_w = out_hw
    png = cv2.resize(u8, (out_w, out_h), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".png", png)
    if not ok:
        raise DataError(f"could not encode PNG for {dicom_path}")
    write_bytes_atomic(png_path, buf.tobytes())
    return CropGeometry(
        image_id,
        int(height),
        int(width),
        photometric,
        r0,
        c0,
        u8.shape[0],
        u8.shape[1],
        out_h,
        out_w,
    )


def _process_one(
    job: tuple[str, str, str, str, tuple[int, int]],
) -> tuple[str, dict | None, str | None]:
    """Worker: (image_id, dicom, png, state) -> (image_id, geometry dict, error)."""
    image_id, dicom, png, state, out_hw = job
    try:
        geom = dicom_to_png(Path(dicom), Path(png), image_id, out_hw)
    except DataError as exc:
        return image_id, None, str(exc)
    write_json(state, asdict(geom))
    return image_id, asdict(geom), None


# ---------------------------------------------------------------------------- dataset


def find_dicom(dicom_root: Path, study_id: str, image_id: str) -> Path | None:
    """The image's DICOM under `dicom_root` (PhysioNet `images/` level or one level inside):
    `.dicom`, `.dcm` or extension-less."""
    for base in (dicom_root, dicom_root / "images"):
        p = find_dicom_file(base / study_id, image_id)
        if p is not None:
            return p
    return None


def patient_fold(patient_id: str, n_folds: int = 4) -> int:
    """Deterministic patient-level fold (Mammo-CLIP's own fold assignment is not reproducible)."""
    return int(hashlib.sha256(patient_id.encode()).hexdigest()[:8], 16) % n_folds


@dataclass
class PreprocessResult:
    out_dir: Path
    csv_path: Path
    images_total: int
    images_done: int
    images_skipped_existing: int
    images_missing: list[str]
    box_rows: int

    def as_dict(self) -> dict:
        d = asdict(self)
        d["out_dir"], d["csv_path"] = str(self.out_dir), str(self.csv_path)
        return d


def preprocess_vindr(
    dicom_root: str | os.PathLike[str],
    findings_csv: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    breast_csv: str | os.PathLike[str] | None = None,
    out_hw: tuple[int, int] = (1520, 912),
    workers: int = 1,
    on_missing: Literal["error", "skip"] = "error",
    progress: bool = True,
) -> PreprocessResult:
    """Convert every image of the CSVs; write `images_png/` and `vindr_detection_v1_folds.csv`."""
    dicom_root, out_dir = Path(dicom_root), Path(out_dir)
    findings_csv = Path(findings_csv)
    if not dicom_root.is_dir():
        raise DataError(f"DICOM root not found: {dicom_root}")
    if not findings_csv.is_file():
        raise DataError(f"findings CSV not found: {findings_csv}")
    findings = _read_csv(findings_csv)
    _require_columns(findings, OFFICIAL_REQUIRED, findings_csv, "official finding_annotations.csv")
    _check_id_columns(findings, findings_csv)
    images = findings.drop_duplicates("image_id")
    if breast_csv is not None:
        breast_csv = Path(breast_csv)
        if not breast_csv.is_file():
            raise DataError(f"breast-level CSV not found: {breast_csv}")
        breast = _read_csv(breast_csv)
        _require_columns(
            breast, BREAST_REQUIRED, breast_csv, "official breast-level_annotations.csv"
        )
        _check_id_columns(breast, breast_csv)
        images = breast.drop_duplicates("image_id")
        findings = _add_no_finding_rows(findings, images)
    if images.empty:
        raise DataError(f"no images listed in {breast_csv or findings_csv}")
    _check_values(findings, findings_csv)

    state_dir = out_dir / STATE_DIR
    geometry: dict[str, dict] = {}
    jobs, missing = [], []
    skipped = 0
    for study, image_id in zip(images["study_id"], images["image_id"]):
        png = out_dir / IMAGES_DIR / study / f"{image_id}.png"
        state = state_dir / f"{image_id}.json"
        if png.is_file() and state.is_file():
            try:
                geometry[image_id] = json.loads(state.read_text(encoding="utf-8"))
                skipped += 1
                continue
            except json.JSONDecodeError:
                pass  # half-written by an older crash: redo the image
        dicom = find_dicom(dicom_root, study, image_id)
        if dicom is None:
            missing.append(str(dicom_root / study / f"{image_id}.dicom"))
            continue
        jobs.append((image_id, str(dicom), str(png), str(state), tuple(out_hw)))
    if missing and on_missing == "error":
        shown = "\n  ".join(missing[:10]) + (
            f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
        )
        raise DataError(
            f"{len(missing)} DICOM file(s) missing under {dicom_root} "
            f"(--on-missing skip drops them):\n  {shown}"
        )

    geometry.update(
        convert_all(
            jobs, workers, _process_one, desc="preprocess", verb="preprocessed", progress=progress
        )
    )

    table = _folds_rows(findings, geometry, findings_csv)
    csv_path = out_dir / FOLDS_CSV
    write_text_atomic(csv_path, table.to_csv(index=False))
    result = PreprocessResult(
        out_dir,
        csv_path,
        len(images),
        len(jobs),
        skipped,
        [Path(m).stem for m in missing],
        int(table["resized_xmin"].ne("").sum()),
    )
    write_json(
        out_dir / "preprocess.json",
        {
            "schema_version": SCHEMA_VERSION,
            **result.as_dict(),
            "height": out_hw[0],
            "width": out_hw[1],
            "border": BORDER,
        },
    )
    return result


def _check_id_columns(df: pd.DataFrame, path: Path) -> None:
    """Ids become output paths (`images_png/<study_id>/<image_id>.png`,
    `.preprocess/<image_id>.json`): every row is checked before anything is written."""
    for column in ("study_id", "image_id"):
        check_ids(df[column], column, path)


def _check_values(findings: pd.DataFrame, path: Path) -> None:
    """The values `_folds_rows` parses after the images are converted (box coordinates, density),
    checked for every row first: a bad last row must stop the run before any PNG is written."""
    text = findings[["xmin", "ymin", "xmax", "ymax"]].apply(lambda col: col.str.strip())
    numbers = text.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    bad = text.ne("").to_numpy() & ~np.isfinite(numbers)
    if bad.any():
        i, j = (int(v[0]) for v in np.nonzero(bad))
        column = text.columns[j]
        raise DataError(
            f"{path}: row {i} has {column} = {text.iat[i, j]!r}, not a number "
            "(box coordinates are numbers or empty); nothing was written"
        )
    _density_letters(findings, path)


def convert_all(
    jobs: list,
    workers: int,
    fn: Callable[[Any], tuple[str, dict | None, str | None]],
    *,
    desc: str,
    verb: str,
    progress: bool,
) -> dict[str, dict]:
    """Run the image conversions `fn(job) -> (image_id, geometry, error)` with a progress bar;
    {image_id: geometry}. Any failure stops with every message, after the others finished (their
    PNGs are kept, so a rerun resumes)."""
    geometry: dict[str, dict] = {}
    failures = []
    bar = tqdm(total=len(jobs), desc=desc, unit="img", disable=not progress)
    for image_id, geom, error in _run_jobs(jobs, workers, fn):
        bar.update()
        if error is not None:
            failures.append(error)
        else:
            geometry[image_id] = geom  # type: ignore[assignment]
    bar.close()
    if failures:
        raise DataError(
            f"{len(failures)} image(s) could not be {verb} (finished ones are kept; "
            "a rerun resumes):\n  " + "\n  ".join(failures[:10])
        )
    return geometry


def _run_jobs(
    jobs: list, workers: int, fn: Callable[[Any], tuple[str, dict | None, str | None]]
) -> Iterable[tuple[str, dict | None, str | None]]:
    """`fn` over the jobs, in this process or in `workers` processes (`fn` must be picklable)."""
    if workers <= 1 or len(jobs) <= 1:
        yield from map(fn, jobs)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(fn, job) for job in jobs]
        for fut in as_completed(futures):
            yield fut.result()


def _add_no_finding_rows(findings: pd.DataFrame, images: pd.DataFrame) -> pd.DataFrame:
    """Images of the breast-level CSV without any finding row get a `['No Finding']` row."""
    absent = images[~images["image_id"].isin(set(findings["image_id"]))]
    if absent.empty:
        return findings
    extra = absent.copy()
    extra["finding_categories"] = "['No Finding']"
    for col in ("finding_birads", "xmin", "ymin", "xmax", "ymax"):
        extra[col] = ""
    return pd.concat(
        [findings, extra[[c for c in findings.columns if c in extra.columns]]], ignore_index=True
    ).fillna("")


def _fmt(v: float) -> str:
    return f"{v:.7g}"


def _folds_rows(findings: pd.DataFrame, geometry: dict[str, dict], source: Path) -> pd.DataFrame:
    """Folds-style rows for every finding row whose image was converted."""
    rows = findings[findings["image_id"].isin(set(geometry))].reset_index(drop=True)
    out = pd.DataFrame(
        {
            "patient_id": rows["study_id"],
            "series_id": rows.get("series_id", ""),
            "image_id": rows["image_id"] + ".png",
            "laterality": rows["laterality"],
            "view": rows["view_position"],
            "height": rows["height"],
            "width": rows["width"],
            "breast_birads": rows["breast_birads"],
            "breast_density": rows["breast_density"],
            "finding_categories": rows["finding_categories"],
            "finding_birads": rows.get("finding_birads", ""),
            "xmin": rows["xmin"],
            "ymin": rows["ymin"],
            "xmax": rows["xmax"],
            "ymax": rows["ymax"],
            "split": rows["split"],
        }
    )
    resized = np.full((len(rows), 4), "", dtype=object)
    for i, (image_id, *xyxy) in enumerate(
        zip(rows["image_id"], rows["xmin"], rows["ymin"], rows["xmax"], rows["ymax"])
    ):
        if all(v.strip() for v in xyxy):
            geom = CropGeometry(**geometry[image_id])
            resized[i] = [_fmt(v) for v in geom.map_box(*(float(v) for v in xyxy))]
    for j, name in enumerate(("resized_xmin", "resized_ymin", "resized_xmax", "resized_ymax")):
        out[name] = resized[:, j]
    out["fold"] = [str(patient_fold(p)) for p in rows["study_id"]]
    cats = [set(parse_categories(t)) for t in rows["finding_categories"]]
    for concept in FINDING_CONCEPTS:
        out[concept] = ["1" if concept in c else "0" for c in cats]
    out["density"] = _density_letters(rows, source).astype(str)
    return out[list(FOLDS_COLUMNS)]
