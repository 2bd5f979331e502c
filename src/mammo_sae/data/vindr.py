"""VinDr-Mammo CSVs -> `ImageRecord`s, and the `data summary` counts.

Two input formats share one code path (both are parsed into a column table first):

* the Mammo-CLIP **folds CSV** `vindr_detection_v1_folds.csv` (33 columns, one row per annotated
  finding, boxes `resized_*` in the 912x1520 PNG frame, images under
  `images_png/<patient_id>/<image_id>.png`). The phantom writes the same file, plus the columns
  `confounder, confounder_{xmin,ymin,xmax,ymax}` and a `phantom.json` holding its frame size.
* the official **`finding_annotations.csv`**: labels come from `finding_categories`, boxes stay in
  original DICOM pixels (the PNG frame needs each image's breast crop, known only after
  `mammo-sae preprocess`), so every record's `frame_hw` is its DICOM (height, width) and its path is
  `images/<study_id>/<image_id>.dicom` next to the CSV.

Labels exist at **image level** (default: one record per image, a binary label is 1 if any row of
the image is 1) and **row level** (one record per CSV row, as the reference evaluation does).
Either way `boxes` holds every box of the image: one `Box` per (box, concept) of a row, so a row
listing two categories gives two boxes; deduplicated, clipped to the frame, degenerate ones dropped
(see `BoxStats`).
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from ..errors import DataError, choices_message
from .records import CONFOUNDER, FINDING_CONCEPTS, Box, ImageRecord, Level, check_ids

log = logging.getLogger(__name__)

FOLDS_CSV = "vindr_detection_v1_folds.csv"
OFFICIAL_FINDINGS_CSV = "finding_annotations.csv"
OFFICIAL_BREAST_CSV = "breast-level_annotations.csv"
IMAGES_DIR = "images_png"  # folds / phantom layout
OFFICIAL_IMAGES_DIR = "images"  # PhysioNet layout: images/<study_id>/<image_id>.dicom
PHANTOM_META = "phantom.json"  # written by the phantom generator: {"height", "width", ...}
PREPROCESS_META = "preprocess.json"  # written by `mammo-sae preprocess`: {"height", "width", ...}
INGEST_META = "ingest.json"  # written by `mammo-sae ingest`: {"height", "width", ...}
UNKNOWN_LABEL = -1  # density / BI-RADS of an empty cell (`ingest` leaves them empty)
DEFAULT_FRAME_HW: tuple[int, int] = (1520, 912)
SUMMARY_SCHEMA_VERSION = 1

BOX_COLUMNS = ("resized_xmin", "resized_ymin", "resized_xmax", "resized_ymax")
ORIGINAL_BOX_COLUMNS = ("xmin", "ymin", "xmax", "ymax")
CONFOUNDER_BOX_COLUMNS = tuple(f"{CONFOUNDER}_{k}" for k in ("xmin", "ymin", "xmax", "ymax"))
FOLDS_REQUIRED = (
    "patient_id",
    "image_id",
    "laterality",
    "view",
    "breast_birads",
    "split",
    *BOX_COLUMNS,
    *FINDING_CONCEPTS,
    "density",
)
OFFICIAL_REQUIRED = (
    "study_id",
    "image_id",
    "laterality",
    "view_position",
    "height",
    "width",
    "breast_birads",
    "breast_density",
    "finding_categories",
    *ORIGINAL_BOX_COLUMNS,
    "split",
)

OnMissing = Literal["error", "skip", "ignore"]


@dataclass
class BoxStats:
    """What happened to the CSV's boxes on the way into records (counted per row and concept)."""

    box_rows: int = 0  # CSV rows carrying a complete box
    concept_boxes: int = 0  # (row, concept) boxes before clipping/dedup
    clipped: int = 0  # boxes that left the frame and were clipped to it
    dropped_degenerate: int = 0  # empty after clipping (or inverted in the CSV)
    dropped_unlabelled: int = 0  # box rows without any positive finding column
    incomplete: int = 0  # rows with some but not all box coordinates
    duplicates: int = 0  # same concept and coordinates as another row of the image
    kept: int = 0  # boxes in the records (unique per image)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class LoadResult:
    records: list[ImageRecord]
    box_stats: BoxStats
    missing_images: list[Path] = field(default_factory=list)  # skipped with on_missing="skip"
    csv_path: Path | None = None
    csv_format: str = ""


@dataclass
class _Table:
    """The CSV parsed into numpy columns, one entry per CSV row; format-independent."""

    csv_path: Path
    csv_format: str  # "folds" | "official"
    image_id: np.ndarray  # str, without suffix
    patient_id: np.ndarray
    series_id: np.ndarray
    split: np.ndarray
    laterality: np.ndarray
    view: np.ndarray
    fold: np.ndarray  # int, -1 if unknown
    labels: dict[str, np.ndarray]  # concept -> int array (binary, density, birads)
    box_xyxy: np.ndarray  # (n, 4) float, NaN where the row has no box
    frame_hw: np.ndarray  # (n, 2) int
    paths: np.ndarray  # str
    confounder_xyxy: np.ndarray | None = None


# ---------------------------------------------------------------------------- public API


def load_records(
    source: str | os.PathLike[str],
    *,
    level: Level = "image",
    splits: Sequence[str] | None = None,
    on_missing: OnMissing = "error",
    frame_hw: tuple[int, int] | None = None,
) -> list[ImageRecord]:
    """Records of a data directory (`vindr_detection_v1_folds.csv` + `images_png/`, or the
    official `finding_annotations.csv` + `images/`) or of a CSV file.

    level: "image" (default, label = any row positive) or "row" (one record per CSV row).
    on_missing: image files that do not exist raise ("error"), are dropped with a warning
    ("skip"), or are not checked at all ("ignore", for counting only).
    frame_hw: model-input frame of the folds-style boxes; default `phantom.json`'s size when the
    data directory has one (or `preprocess.json`'s), else 1520x912.
    """
    return load_records_with_stats(
        source, level=level, splits=splits, on_missing=on_missing, frame_hw=frame_hw
    ).records


def load_records_with_stats(
    source: str | os.PathLike[str],
    *,
    level: Level = "image",
    splits: Sequence[str] | None = None,
    on_missing: OnMissing = "error",
    frame_hw: tuple[int, int] | None = None,
) -> LoadResult:
    """`load_records`, also returning the box clipping counts and the skipped image files."""
    if level not in ("image", "row"):
        raise DataError(choices_message("level", level, ["image", "row"]))
    if on_missing not in ("error", "skip", "ignore"):
        raise DataError(
            choices_message("on_missing value", on_missing, ["error", "skip", "ignore"])
        )
    table = _read_table(resolve_csv(source), frame_hw)
    keep = _split_mask(table, splits)
    records, stats = _build_records(table, keep, level)
    missing: list[Path] = []
    if on_missing != "ignore":
        records, missing = _check_files(records, on_missing)
    if not records:
        raise DataError(
            f"no records left in {table.csv_path} after filtering "
            f"(splits={list(splits) if splits else 'all'}, "
            f"{len(missing)} missing image file(s) skipped)"
        )
    if stats.clipped or stats.dropped_degenerate or stats.incomplete:
        log.info("boxes of %s: %s", table.csv_path, stats.as_dict())
    return LoadResult(records, stats, missing, table.csv_path, table.csv_format)


def box_stats(
    source: str | os.PathLike[str],
    *,
    splits: Sequence[str] | None = None,
    frame_hw: tuple[int, int] | None = None,
) -> BoxStats:
    """How many boxes of `source` were clipped to the frame, dropped, deduplicated, kept."""
    return load_records_with_stats(
        source, splits=splits, on_missing="ignore", frame_hw=frame_hw
    ).box_stats


def resolve_csv(source: str | os.PathLike[str]) -> Path:
    """The CSV behind `source`: the file itself, or the folds / official CSV inside a directory."""
    path = Path(source)
    if path.is_dir():
        for name in (FOLDS_CSV, OFFICIAL_FINDINGS_CSV):
            if (path / name).is_file():
                return path / name
        raise DataError(
            f"{path} has neither {FOLDS_CSV} nor {OFFICIAL_FINDINGS_CSV}; pass a data "
            "directory in the Mammo-CLIP layout (or made by `mammo-sae phantom` / "
            "`mammo-sae preprocess`) or a CSV file"
        )
    if not path.is_file():
        raise DataError(f"dataset not found: {path}")
    return path


def concept_names(records: Sequence[ImageRecord]) -> list[str]:
    """Binary concepts the records carry (the 11 findings, plus `confounder` for the phantom)."""
    if not records:
        return []
    return [c for c in records[0].labels if c not in ("density", "birads")]


def validate_concepts(concepts: Iterable[str], records: Sequence[ImageRecord]) -> None:
    """Raise DataError naming the first concept the records do not have, listing valid ones."""
    valid = list(records[0].labels) if records else []
    for concept in concepts:
        if concept not in valid:
            raise DataError(choices_message("concept", concept, valid))


def filter_splits(records: Sequence[ImageRecord], splits: Sequence[str]) -> list[ImageRecord]:
    """Records of the given splits; unknown split names raise with the valid ones listed."""
    if isinstance(splits, str):
        splits = [splits]
    valid = sorted({r.split for r in records})
    for s in splits:
        if s not in valid:
            raise DataError(choices_message("split", s, valid))
    wanted = set(splits)
    out = [r for r in records if r.split in wanted]
    if not out:
        raise DataError(f"no records in splits {list(splits)}")
    return out


# ---------------------------------------------------------------------------- summary


def summarize_dataset(
    records_or_source: Sequence[ImageRecord] | str | os.PathLike[str],
    *,
    splits: Sequence[str] | None = None,
    frame_hw: tuple[int, int] | None = None,
    on_missing: OnMissing = "ignore",
) -> dict[str, Any]:
    """Per split (and `all`): rows, images, patients, series, positives per concept at row and
    image level, density and BI-RADS distributions, boxes per concept (unique, after clipping).

    Given a source, both levels are counted from the CSV; image files are checked only with
    `on_missing="error"` (raise, listing them) or `"skip"` (count without them). Given records,
    row-level counts need row-level records; image-level records give `null` there.
    """
    stats: BoxStats | None = None
    missing: list[Path] = []
    source_name = None
    csv_format = None
    if isinstance(records_or_source, (str, os.PathLike)):
        table = _read_table(resolve_csv(records_or_source), frame_hw)
        keep = _split_mask(table, splits)
        row_records, stats = _build_records(table, keep, "row")
        source_name, csv_format = str(table.csv_path), table.csv_format
        if on_missing != "ignore":
            row_records, missing = _check_files(row_records, on_missing)
    else:
        row_records = list(records_or_source)
        if splits:
            row_records = filter_splits(row_records, splits)
    if not row_records:
        raise DataError("nothing to summarise: no records")
    is_row_level = row_records[0].row_index is not None
    split_names = sorted({r.split for r in row_records})
    out: dict[str, Any] = {
        "schema_version": SUMMARY_SCHEMA_VERSION,
        "source": source_name,
        "csv_format": csv_format,
        "splits": {},
    }
    for name in [*split_names, "all"]:
        subset = row_records if name == "all" else [r for r in row_records if r.split == name]
        out["splits"][name] = _summarize_subset(subset, is_row_level)
    if stats is not None:
        out["box_stats"] = stats.as_dict()
    if missing:
        out["missing_images"] = {"count": len(missing), "first": [str(p) for p in missing[:10]]}
    return out


def _summarize_subset(records: list[ImageRecord], is_row_level: bool) -> dict[str, Any]:
    keys = list(records[0].labels)
    concepts = concept_names(records)
    labels_rk = np.array([[r.labels[k] for k in keys] for r in records], dtype=np.int64)
    codes, unique_ids = pd.factorize(np.array([r.image_id for r in records], dtype=object))
    first = np.full(len(unique_ids), -1, dtype=np.int64)
    first[codes[::-1]] = np.arange(len(codes))[::-1]
    # Every image has a row, so the start value never survives; not 0: an unknown (-1) stays -1.
    labels_ik = np.full((len(unique_ids), len(keys)), UNKNOWN_LABEL, dtype=np.int64)
    np.maximum.at(labels_ik, codes, labels_rk)  # image label = any row positive
    images = [records[i] for i in first]

    def positives(matrix: np.ndarray) -> dict[str, int]:
        return {c: int(matrix[:, keys.index(c)].sum()) for c in concepts}

    def distribution(matrix: np.ndarray, key: str) -> dict[str, int]:
        values, counts = np.unique(matrix[:, keys.index(key)], return_counts=True)
        return {str(v): int(n) for v, n in zip(values, counts)}

    row = labels_rk if is_row_level else None
    boxes = Counter(b.concept for img in images for b in img.boxes)
    return {
        "rows": len(records)
        if is_row_level
        else int(sum(r.extra.get("n_rows", 1) for r in records)),
        "images": len(images),
        "patients": len({r.patient_id for r in images}),
        "series": len({r.series_id for r in images if r.series_id}),
        "positives": {
            "row": positives(row) if row is not None else None,
            "image": positives(labels_ik),
        },
        "density": {
            "row": distribution(row, "density") if row is not None else None,
            "image": distribution(labels_ik, "density"),
        },
        "birads": {
            "row": distribution(row, "birads") if row is not None else None,
            "image": distribution(labels_ik, "birads"),
        },
        "boxes": {c: boxes[c] for c in sorted(boxes)},
        "images_with_boxes": sum(1 for img in images if img.boxes),
    }


# ---------------------------------------------------------------------------- parsing


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        # dtype=str: finding_birads mixes strings and blanks; keep "" for empty cells.
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as exc:
        raise DataError(f"cannot read CSV {path}: {exc}") from exc


def _require_columns(df: pd.DataFrame, required: Iterable[str], path: Path, kind: str) -> None:
    present = [str(c) for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if not missing:
        return
    lowered = {c.lower().replace(" ", "_"): c for c in present}
    parts = []
    for name in missing:
        guess = lowered.get(name.lower()) or next(
            iter(difflib.get_close_matches(name, present, n=1, cutoff=0.75)), None
        )
        parts.append(f"{name!r} (found {guess!r}: renamed?)" if guess else repr(name))
    raise DataError(
        f"{path} is not a valid {kind}: missing column(s) {', '.join(parts)}; "
        f"found columns: {', '.join(present)}"
    )


def _read_table(csv_path: Path, frame_hw: tuple[int, int] | None) -> _Table:
    if frame_hw is not None and (len(frame_hw) != 2 or min(int(v) for v in frame_hw) < 1):
        raise DataError(f"frame_hw must be (height, width) in pixels, got {frame_hw!r}")
    df = _read_csv(csv_path)
    cols = set(df.columns)
    if "finding_categories" in cols and "study_id" in cols and "resized_xmin" not in cols:
        if frame_hw is not None:
            raise DataError(
                f"{csv_path}: frame_hw cannot be set for the official CSV, whose boxes "
                "are in each image's original DICOM pixels; run `mammo-sae preprocess`"
            )
        return _official_table(df, csv_path)
    if "study_id" in cols and "finding_categories" not in cols:
        raise DataError(
            f"{csv_path} looks like {OFFICIAL_BREAST_CSV} (no findings); pass "
            f"{OFFICIAL_FINDINGS_CSV} or {FOLDS_CSV}"
        )
    return _folds_table(df, csv_path, frame_hw)


def _frame_from_meta(data_dir: Path) -> tuple[int, int] | None:
    """The frame size a generator recorded beside its CSV, if any."""
    meta = next(
        (
            data_dir / n
            for n in (PHANTOM_META, PREPROCESS_META, INGEST_META)
            if (data_dir / n).is_file()
        ),
        None,
    )
    if meta is None:
        return None
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
        return int(data["height"]), int(data["width"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{meta}: expected JSON with integer 'height' and 'width' ({exc})") from exc


def _int_column(df: pd.DataFrame, name: str, path: Path, lo: int, hi: int) -> np.ndarray:
    values = pd.to_numeric(df[name], errors="coerce").to_numpy(dtype=float)
    bad = ~np.isfinite(values) | (values < lo) | (values > hi) | (values != np.round(values))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{path}: column {name!r} must hold integers {lo}..{hi}; row {i} has "
            f"{df[name].iloc[i]!r} ({int(bad.sum())} bad row(s))"
        )
    return values.astype(np.int64)


MISSING_WORDS = ("", "nan", "na", "n/a", "none", "null", "#n/a", "-")


def _float_columns(df: pd.DataFrame, names: Sequence[str], path: Path) -> np.ndarray:
    """Numeric columns; empty cells and the usual missing-value words are NaN (rows without a
    box), any other text is an error."""
    out = []
    for n in names:
        values = pd.to_numeric(df[n], errors="coerce")
        words = df[n].astype(str).str.strip().str.lower()
        text = values.isna() & df[n].notna() & ~words.isin(MISSING_WORDS)
        if text.any():
            i = int(np.flatnonzero(text.to_numpy())[0])
            raise DataError(
                f"{path}: column {n!r} must hold numbers or be empty; row {i} has "
                f"{df[n].iloc[i]!r} ({int(text.sum())} bad row(s))"
            )
        out.append(values.to_numpy(dtype=float))
    return np.stack(out, axis=1)


def _birads(df: pd.DataFrame, path: Path, *, allow_empty: bool = False) -> np.ndarray:
    # "BI-RADS 4" in VinDr; a bare digit is accepted too; empty = unknown where allowed.
    empty = (
        (df["breast_birads"].str.strip() == "").to_numpy()
        if allow_empty
        else np.zeros(len(df), dtype=bool)
    )
    digits = (
        df["breast_birads"].str.extract(r"(\d)\s*$", expand=False).where(~empty, str(UNKNOWN_LABEL))
    )
    bad = ~empty & (digits.isna().to_numpy() | ~digits.isin(list("12345")).to_numpy())
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{path}: column 'breast_birads' must be 'BI-RADS 1'..'BI-RADS 5'; row {i} "
            f"has {df['breast_birads'].iloc[i]!r}"
        )
    return digits.astype(int).to_numpy()


def _density_letters(df: pd.DataFrame, path: Path) -> np.ndarray:
    letters = df["breast_density"].str.extract(r"([ABCD])\s*$", expand=False)
    if letters.isna().any():
        i = int(np.flatnonzero(letters.isna().to_numpy())[0])
        raise DataError(
            f"{path}: column 'breast_density' must be 'DENSITY A'..'DENSITY D'; row {i} "
            f"has {df['breast_density'].iloc[i]!r}"
        )
    return letters.map({"A": 0, "B": 1, "C": 2, "D": 3}).to_numpy(dtype=np.int64)


def _nonempty(df: pd.DataFrame, name: str, path: Path) -> np.ndarray:
    values = df[name].to_numpy(dtype=object)
    empty = df[name].str.len().to_numpy() == 0
    if empty.any():
        raise DataError(f"{path}: column {name!r} is empty in row {int(np.flatnonzero(empty)[0])}")
    return values


def _ids(df: pd.DataFrame, name: str, path: Path) -> np.ndarray:
    """An id column (joined into image paths), every row checked by `check_ids`."""
    values = df[name].to_numpy(dtype=object)
    check_ids(values, name, path)
    return values


def _folds_table(df: pd.DataFrame, csv_path: Path, frame_hw: tuple[int, int] | None) -> _Table:
    _require_columns(df, FOLDS_REQUIRED, csv_path, "folds CSV")
    n = len(df)
    if frame_hw is None:
        frame_hw = _frame_from_meta(csv_path.parent) or DEFAULT_FRAME_HW
    image_id = df["image_id"].str.replace(r"\.png$", "", regex=True).to_numpy(dtype=object)
    patient_id = _ids(df, "patient_id", csv_path)
    check_ids(image_id, "image_id", csv_path)  # as joined into the path: without ".png"
    labels = {c: _int_column(df, c, csv_path, 0, 1) for c in FINDING_CONCEPTS}
    confounder_xyxy = None
    if CONFOUNDER in df.columns:
        _require_columns(df, CONFOUNDER_BOX_COLUMNS, csv_path, "phantom CSV with a confounder")
        labels[CONFOUNDER] = _int_column(df, CONFOUNDER, csv_path, 0, 1)
        confounder_xyxy = _float_columns(df, CONFOUNDER_BOX_COLUMNS, csv_path)
    # Empty density / BI-RADS cells (datasets made by `ingest`) read as UNKNOWN_LABEL.
    density = df["density"].where(df["density"].str.strip() != "", str(UNKNOWN_LABEL))
    labels["density"] = _int_column(
        df.assign(density=density), "density", csv_path, UNKNOWN_LABEL, 3
    )
    labels["birads"] = _birads(df, csv_path, allow_empty=True)
    fold = (
        pd.to_numeric(df["fold"], errors="coerce").fillna(-1).to_numpy(dtype=np.int64)
        if "fold" in df.columns
        else np.full(n, -1, dtype=np.int64)
    )
    images_dir = csv_path.parent / IMAGES_DIR
    paths = np.array(
        [os.path.join(images_dir, p, i + ".png") for p, i in zip(patient_id, image_id)],
        dtype=object,
    )
    return _Table(
        csv_path=csv_path,
        csv_format="folds",
        image_id=image_id,
        patient_id=patient_id,
        series_id=_optional_str(df, "series_id"),
        split=_nonempty(df, "split", csv_path),
        laterality=df["laterality"].to_numpy(dtype=object),
        view=df["view"].to_numpy(dtype=object),
        fold=fold,
        labels=labels,
        box_xyxy=_float_columns(df, BOX_COLUMNS, csv_path),
        frame_hw=np.tile(np.asarray(frame_hw, dtype=np.int64), (n, 1)),
        paths=paths,
        confounder_xyxy=confounder_xyxy,
    )


def _optional_str(df: pd.DataFrame, name: str) -> np.ndarray:
    return (
        df[name].to_numpy(dtype=object)
        if name in df.columns
        else np.full(len(df), "", dtype=object)
    )


_CATEGORY_RE = re.compile(r"'([^']*)'|\"([^\"]*)\"")


def parse_categories(text: str) -> list[str]:
    """`"['Suspicious Calcification', 'Mass']"` -> ["Suspicious_Calcification", "Mass"]."""
    return [(a or b).strip().replace(" ", "_") for a, b in _CATEGORY_RE.findall(text)]


def _official_table(df: pd.DataFrame, csv_path: Path) -> _Table:
    _require_columns(df, OFFICIAL_REQUIRED, csv_path, f"official {OFFICIAL_FINDINGS_CSV}")
    n = len(df)
    labels = {c: np.zeros(n, dtype=np.int64) for c in FINDING_CONCEPTS}
    index = {c: i for i, c in enumerate(FINDING_CONCEPTS)}
    # Few distinct category strings (~40): parse each once.
    for text, rows in df.groupby("finding_categories", sort=False).indices.items():
        cats = parse_categories(text)
        unknown = [c for c in cats if c not in index]
        if not cats or unknown:
            raise DataError(
                f"{csv_path}: row {int(rows[0])} has finding_categories {text!r}; "
                f"valid categories: {', '.join(c.replace('_', ' ') for c in FINDING_CONCEPTS)}"
            )
        for c in cats:
            labels[c][rows] = 1
    labels["density"] = _density_letters(df, csv_path)
    labels["birads"] = _birads(df, csv_path)
    study = _ids(df, "study_id", csv_path)
    image_id = _ids(df, "image_id", csv_path)
    images_dir = csv_path.parent / OFFICIAL_IMAGES_DIR
    paths = np.array(
        [_official_dicom(images_dir, s, i) for s, i in zip(study, image_id)], dtype=object
    )
    frame = np.stack(
        [
            _int_column(df, "height", csv_path, 1, 1 << 20),
            _int_column(df, "width", csv_path, 1, 1 << 20),
        ],
        axis=1,
    )
    return _Table(
        csv_path=csv_path,
        csv_format="official",
        image_id=image_id,
        patient_id=study,
        series_id=_optional_str(df, "series_id"),
        split=_nonempty(df, "split", csv_path),
        laterality=df["laterality"].to_numpy(dtype=object),
        view=df["view_position"].to_numpy(dtype=object),
        fold=np.full(n, -1, dtype=np.int64),
        labels=labels,
        box_xyxy=_float_columns(df, ORIGINAL_BOX_COLUMNS, csv_path),
        frame_hw=frame,
        paths=paths,
    )


def _official_dicom(images_dir: Path, study: str, image_id: str) -> str:
    """`images/<study>/<image>.dicom`, or the `.dcm` / extension-less file when only that exists
    (no file at all: the `.dicom` name, for the missing-file report)."""
    from .images import find_dicom_file  # not at import time: it pulls in torch and cv2

    default = os.path.join(images_dir, study, image_id + ".dicom")
    if os.path.isfile(default) or not images_dir.is_dir():
        return default
    found = find_dicom_file(images_dir / study, image_id)
    return str(found) if found is not None else default


def _split_mask(table: _Table, splits: Sequence[str] | None) -> np.ndarray:
    if splits is None:
        return np.ones(len(table.split), dtype=bool)
    if isinstance(splits, str):
        splits = [splits]
    valid = sorted(set(table.split.tolist()))
    for s in splits:
        if s not in valid:
            raise DataError(choices_message("split", s, valid))
    return np.isin(table.split, list(splits))


# ---------------------------------------------------------------------------- records


def _clip_box(
    concept: str, xyxy: np.ndarray, frame_hw: tuple[int, int], stats: BoxStats
) -> Box | None:
    h, w = frame_hw
    x0, y0, x1, y1 = (float(v) for v in xyxy)
    cx0, cx1 = min(max(x0, 0.0), w), min(max(x1, 0.0), w)
    cy0, cy1 = min(max(y0, 0.0), h), min(max(y1, 0.0), h)
    if cx1 <= cx0 or cy1 <= cy0:
        stats.dropped_degenerate += 1
        return None
    if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
        stats.clipped += 1
    return Box(concept, cx0, cy0, cx1, cy1)


def _image_boxes(
    table: _Table, codes: np.ndarray, rows: np.ndarray, stats: BoxStats
) -> dict[int, list[Box]]:
    """Boxes of every image touched by `rows` (all rows of the image), keyed by image code."""
    concepts = [c for c in FINDING_CONCEPTS if c != "No_Finding"]
    by_image: dict[int, list[Box]] = {}
    seen: set[tuple[int, Box]] = set()
    xyxy = table.box_xyxy
    finite = np.isfinite(xyxy)
    complete = finite.all(axis=1)
    stats.incomplete += int((finite.any(axis=1) & ~complete)[rows].sum())

    def add(code: int, box: Box | None) -> None:
        if box is None:
            return
        if (code, box) in seen:
            stats.duplicates += 1
            return
        seen.add((code, box))
        by_image.setdefault(code, []).append(box)

    for i in rows[complete[rows]]:
        stats.box_rows += 1
        frame = (int(table.frame_hw[i, 0]), int(table.frame_hw[i, 1]))
        row_concepts = [c for c in concepts if table.labels[c][i]]
        if not row_concepts:
            stats.dropped_unlabelled += 1
        for c in row_concepts:
            stats.concept_boxes += 1
            add(int(codes[i]), _clip_box(c, xyxy[i], frame, stats))
    if table.confounder_xyxy is not None:
        conf = table.confounder_xyxy
        has = np.isfinite(conf).all(axis=1) & (table.labels[CONFOUNDER] == 1)
        for i in rows[has[rows]]:
            stats.concept_boxes += 1
            frame = (int(table.frame_hw[i, 0]), int(table.frame_hw[i, 1]))
            add(int(codes[i]), _clip_box(CONFOUNDER, conf[i], frame, stats))
    stats.kept = sum(len(v) for v in by_image.values())
    return by_image


def _build_records(
    table: _Table, keep: np.ndarray, level: Level
) -> tuple[list[ImageRecord], BoxStats]:
    codes, unique_ids = pd.factorize(table.image_id)
    n_images = len(unique_ids)
    # An image's rows must agree on who and where it is.
    first_row = np.full(n_images, -1, dtype=np.int64)
    first_row[codes[::-1]] = np.arange(len(codes))[::-1]
    for name in ("split", "patient_id"):
        col = getattr(table, name)
        differs = col != col[first_row[codes]]
        if differs.any():
            i = int(np.flatnonzero(differs)[0])
            raise DataError(
                f"{table.csv_path}: image {table.image_id[i]} has rows with different "
                f"{name} ({col[first_row[codes[i]]]!r} vs {col[i]!r}, row {i})"
            )
    rows = np.flatnonzero(keep)
    # Boxes and image labels come from all rows of a kept image (a split never divides an image).
    stats = BoxStats()
    boxes = _image_boxes(table, codes, rows, stats)
    concept_names_ = list(table.labels)
    label_matrix = np.stack([table.labels[c] for c in concept_names_], axis=1)  # (rows, concepts)

    def make(i: int, labels_row: np.ndarray, row_index: int | None, n_rows: int) -> ImageRecord:
        fold = int(table.fold[i])
        return ImageRecord(
            image_id=str(table.image_id[i]),
            patient_id=str(table.patient_id[i]),
            split=str(table.split[i]),
            path=Path(table.paths[i]),
            labels=dict(zip(concept_names_, labels_row.tolist())),
            boxes=tuple(boxes.get(int(codes[i]), ())),
            view=str(table.view[i]),
            laterality=str(table.laterality[i]),
            frame_hw=(int(table.frame_hw[i, 0]), int(table.frame_hw[i, 1])),
            series_id=str(table.series_id[i]),
            fold=fold if fold >= 0 else None,
            row_index=row_index,
            extra={} if row_index is not None else {"n_rows": float(n_rows)},
        )

    if level == "row":
        return [make(int(i), label_matrix[i], int(i), 1) for i in rows], stats
    # Image level: max over each image's rows (density/BI-RADS are per breast, so constant).
    image_labels = np.full((n_images, label_matrix.shape[1]), UNKNOWN_LABEL, dtype=np.int64)
    np.maximum.at(image_labels, codes, label_matrix)
    n_rows = np.bincount(codes, minlength=n_images)
    kept_codes = pd.unique(codes[rows])
    return [
        make(int(first_row[c]), image_labels[c], None, int(n_rows[c])) for c in kept_codes
    ], stats


def _check_files(
    records: list[ImageRecord], on_missing: OnMissing
) -> tuple[list[ImageRecord], list[Path]]:
    exists: dict[str, bool] = {}
    missing: list[Path] = []
    kept: list[ImageRecord] = []
    for r in records:
        key = str(r.path)
        if key not in exists:
            exists[key] = os.path.isfile(key)
            if not exists[key]:
                missing.append(Path(key))
        if exists[key]:
            kept.append(r)
    if missing and on_missing == "error":
        shown = "\n  ".join(map(str, missing[:10]))
        more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise DataError(
            f"{len(missing)} image file(s) missing (`extract --on-error skip` and `data summary "
            f"--on-missing skip` can leave them out; classifier training and evaluation "
            f"need every image):\n  {shown}{more}"
        )
    if missing:
        log.warning(
            "skipped %d record(s) whose image file is missing, e.g. %s",
            len(records) - len(kept),
            missing[0],
        )
    return kept, missing
