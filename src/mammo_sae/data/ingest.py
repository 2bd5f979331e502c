"""A folder of the user's own DICOMs -> the tool's dataset layout, from the headers alone.

Writes what `load_records` reads (docs/data.md): `images_png/<patient>/<image>.png` made with
`preprocess`'s Mammo-CLIP steps (5-px border crop, MONOCHROME1 inversion, min-max to uint8,
breast crop, INTER_AREA resize), `vindr_detection_v1_folds.csv` and `ingest.json` (the frame).

Nothing identifying leaves the DICOM folder: patient, study, series and image ids are
`hashed_id(raw)` (sha256 of a fixed prefix + the id, truncated), file paths are not recorded,
and the PNGs carry no metadata. The same DICOM always gets the same ids, so a rerun resumes and a
user who knows a raw id can find its hashed one.

Headers read: PatientID, StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID, ImageLaterality
(else Laterality), ViewPosition (else the view code sequence), Rows, Columns, Manufacturer.
Density, BI-RADS and finding labels are not needed: density / BI-RADS cells stay empty (read as
unknown), finding columns come from `--labels` (else 0). Splits come from `--split`, the labels
CSV's `split` column, or a seeded hash of the hashed patient id (`--test-fraction`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from ..errors import DataError
from ..io import write_json, write_text_atomic
from .images import is_dicom
from .preprocess import (
    BORDER,
    CropGeometry,
    _fmt,
    convert_all,
    dicom_to_png,
    patient_fold,
)
from .records import FINDING_CONCEPTS, FOLDS_COLUMNS
from .vindr import FOLDS_CSV, IMAGES_DIR, INGEST_META, ORIGINAL_BOX_COLUMNS, _read_csv

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
HASH_PREFIX = "mammo-sae-id:"  # fixed: the same raw id gives the same hashed id in every run
HASH_HEX = 20  # 80 bits: no collisions in any realistic archive
STATE_DIR = ".ingest"
# View code sequence (DICOM CID 4014): SNOMED-RT and SNOMED CT codes and meanings -> view.
VIEW_CODES = {
    "R-10242": "CC",
    "399162004": "CC",
    "cranio-caudal": "CC",
    "R-10226": "MLO",
    "399368009": "MLO",
    "medio-lateral oblique": "MLO",
    "R-10224": "ML",
    "399260004": "ML",
    "medio-lateral": "ML",
    "R-10228": "LM",
    "399352003": "LM",
    "latero-medial": "LM",
    "R-1024A": "XCCL",
    "399192003": "XCCL",
    "cranio-caudal exaggerated laterally": "XCCL",
}
LABEL_KEYS = ("image", "sop_instance_uid")
RESIZED_BOX_COLUMNS = ("resized_xmin", "resized_ymin", "resized_xmax", "resized_ymax")
LABEL_EXTRA = ("split", "finding_birads", *ORIGINAL_BOX_COLUMNS)
UNCROPPED_WARNING = (
    "--no-crop: the PNGs are the whole DICOM frame (only the 5-px border is cut): "
    "background, film edges and burnt-in labels enter the model input, and the "
    "breast fills less of it than in Mammo-CLIP's training images"
)


def hashed_id(raw: str) -> str:
    """sha256 of HASH_PREFIX + the raw id, first HASH_HEX hex digits."""
    return hashlib.sha256((HASH_PREFIX + raw).encode("utf-8")).hexdigest()[:HASH_HEX]


@dataclass(frozen=True)
class Header:
    """What ingest takes from one DICOM's header (ids already hashed)."""

    rel: str  # path relative to the DICOM folder (never written out)
    sop_uid: str  # raw, only to match `--labels`; never written out
    image_id: str
    patient_id: str
    study_id: str
    series_id: str
    laterality: str  # L | R | "" (unknown)
    view: str  # CC | MLO | ... | "" (unknown)
    height: int
    width: int
    manufacturer: str


def find_dicoms(root: str | os.PathLike[str]) -> list[Path]:
    """Every DICOM under `root` (recursive, sorted): `.dcm`, `.dicom` or extension-less with the
    DICOM magic; hidden files and folders are skipped."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"DICOM folder not found: {root}")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not name.startswith(".") and is_dicom(path):
                found.append(path)
    return found


def _text(ds: Any, name: str) -> str:
    value = getattr(ds, name, None)
    return "" if value is None else str(value).strip()


def _view(ds: Any) -> str:
    view = _text(ds, "ViewPosition").upper()
    if view:
        return view
    for item in getattr(ds, "ViewCodeSequence", None) or ():
        for key in (_text(item, "CodeValue"), _text(item, "CodeMeaning").lower()):
            if key in VIEW_CODES:
                return VIEW_CODES[key]
    return ""


def _laterality(ds: Any) -> str:
    side = (_text(ds, "ImageLaterality") or _text(ds, "Laterality")).upper()
    return side if side in ("L", "R") else ""


def read_header(path: Path, root: Path) -> Header:
    """The header fields of one DICOM (pixels not read)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    rel = path.relative_to(root).as_posix()
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, AttributeError, KeyError, TypeError) as exc:
        raise DataError(f"cannot read DICOM header {path}: {type(exc).__name__}: {exc}") from exc
    rows, cols = getattr(ds, "Rows", None), getattr(ds, "Columns", None)
    if not rows or not cols:
        raise DataError(f"{path}: no Rows/Columns in the header (not an image?)")
    sop = _text(ds, "SOPInstanceUID")
    study = _text(ds, "StudyInstanceUID")
    patient = _text(ds, "PatientID") or study or rel  # every image needs a patient
    series = _text(ds, "SeriesInstanceUID")
    return Header(
        rel=rel,
        sop_uid=sop,
        image_id=hashed_id(sop or rel),
        patient_id=hashed_id(patient),
        study_id=hashed_id(study) if study else "",
        series_id=hashed_id(series) if series else "",
        laterality=_laterality(ds),
        view=_view(ds),
        height=int(rows),
        width=int(cols),
        manufacturer=_text(ds, "Manufacturer"),
    )


def _ingest_one(
    job: tuple[str, str, str, str, tuple[int, int], bool],
) -> tuple[str, dict | None, str | None]:
    """Worker: one DICOM -> PNG; its geometry (and the crop setting) goes to the state file."""
    image_id, dicom, png, state, out_hw, crop = job
    try:
        geom = {
            **asdict(dicom_to_png(Path(dicom), Path(png), image_id, out_hw, crop=crop)),
            "crop": crop,
        }
    except DataError as exc:
        return image_id, None, str(exc)
    write_json(state, geom)
    return image_id, geom, None


def assign_split(patient_hash: str, seed: int, test_fraction: float) -> str:
    """'test' for a seeded, patient-level share of about `test_fraction`, else 'training'."""
    u = int(hashlib.sha256(f"{seed}:{patient_hash}".encode()).hexdigest()[:8], 16) / 2**32
    return "test" if u < test_fraction else "training"


# ---------------------------------------------------------------------------- labels


def read_labels(path: Path, headers: Sequence[Header]) -> dict[str, pd.DataFrame]:
    """`--labels` CSV -> {image_id: its label rows}. Key column `image` (path relative to the DICOM
    folder, with or without suffix, or the file name) or `sop_instance_uid`; concept columns of
    FINDING_CONCEPTS (0/1, absent = 0); optional `xmin..ymax` (original DICOM pixels), `split`,
    `finding_birads`. Every image needs at least one row, and every row must match an image."""
    if not path.is_file():
        raise DataError(f"labels CSV not found: {path}")
    df = _read_csv(path)
    keys = [k for k in LABEL_KEYS if k in df.columns]
    if len(keys) != 1:
        raise DataError(
            f"{path}: needs exactly one key column of {list(LABEL_KEYS)}; found "
            f"columns {list(df.columns)}"
        )
    key = keys[0]
    unknown = [
        c for c in df.columns if c != key and c not in FINDING_CONCEPTS and c not in LABEL_EXTRA
    ]
    if unknown:
        raise DataError(
            f"{path}: unknown column(s) {unknown}; valid: {key}, "
            f"{', '.join(FINDING_CONCEPTS)}, {', '.join(LABEL_EXTRA)}"
        )
    concepts = [c for c in FINDING_CONCEPTS if c in df.columns]
    if not concepts:
        raise DataError(
            f"{path}: no concept column; give one or more of {', '.join(FINDING_CONCEPTS)}"
        )
    for c in concepts:
        bad = ~df[c].str.strip().isin(["0", "1"])
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(f"{path}: column {c!r} must be 0 or 1; row {i} has {df[c].iloc[i]!r}")
    box_cols = [c for c in ORIGINAL_BOX_COLUMNS if c in df.columns]
    if box_cols and len(box_cols) != 4:
        raise DataError(f"{path}: boxes need all of {list(ORIGINAL_BOX_COLUMNS)}; found {box_cols}")
    lookup: dict[str, str] = {}
    for h in headers:
        if key == "sop_instance_uid":
            if h.sop_uid:
                lookup[h.sop_uid] = h.image_id
            continue
        rel = Path(h.rel)
        for name in {h.rel, str(rel.with_suffix("")) if rel.suffix else h.rel, rel.name, rel.stem}:
            # A bare file name or stem shared by two files would be ambiguous: drop it.
            lookup[name] = h.image_id if lookup.get(name, h.image_id) == h.image_id else ""
    image_of = df[key].str.strip().map(lambda k: lookup.get(k, None))
    ambiguous = image_of == ""
    if ambiguous.any():
        i = int(np.flatnonzero(ambiguous.to_numpy())[0])
        raise DataError(
            f"{path}: row {i}: {key} {df[key].iloc[i]!r} names more than one DICOM; "
            "give the path relative to the DICOM folder"
        )
    unmatched = image_of.isna()
    if unmatched.any():
        i = int(np.flatnonzero(unmatched.to_numpy())[0])
        raise DataError(
            f"{path}: {int(unmatched.sum())} row(s) match no DICOM, e.g. row {i} "
            f"({key} {df[key].iloc[i]!r})"
        )
    df = df.assign(_image=image_of)
    missing = [h for h in headers if h.image_id not in set(df["_image"])]
    if missing:
        raise DataError(
            f"{path}: {len(missing)} DICOM(s) have no label row (give every image at "
            f"least one row; all-0 for a negative), e.g. {missing[0].rel}"
        )
    return {image_id: rows for image_id, rows in df.groupby("_image", sort=False)}


# ---------------------------------------------------------------------------- ingest


@dataclass
class IngestResult:
    out_dir: Path
    csv_path: Path
    images_found: int
    images_done: int
    images_skipped_existing: int
    duplicates: int
    rows: int
    box_rows: int
    splits: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out_dir"], d["csv_path"] = str(self.out_dir), str(self.csv_path)
        return d


def ingest(
    dicom_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    labels: str | os.PathLike[str] | None = None,
    out_hw: tuple[int, int] = (1520, 912),
    crop: bool = True,
    split: str | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
) -> IngestResult:
    """Headers -> hashed ids, pixels -> Mammo-CLIP PNGs, then the folds CSV and `ingest.json`."""
    root, out_dir = Path(dicom_dir), Path(out_dir)
    files = find_dicoms(root)
    if not files:
        raise DataError(
            f"no DICOM files under {root} (looked for .dcm, .dicom and extension-less "
            "files with the DICOM magic)"
        )
    headers: list[Header] = []
    seen: set[str] = set()
    duplicates = 0
    for path in tqdm(files, desc="headers", unit="file", disable=not progress):
        h = read_header(path, root)
        if h.image_id in seen:  # the same SOP instance twice (a copy): keep the first
            duplicates += 1
            continue
        seen.add(h.image_id)
        headers.append(h)
    if duplicates:
        log.warning(
            "%d DICOM file(s) repeat an image already found (same SOPInstanceUID); "
            "each image is ingested once",
            duplicates,
        )
    label_rows = read_labels(Path(labels), headers) if labels is not None else None
    if not crop:
        log.warning(UNCROPPED_WARNING)

    state_dir = out_dir / STATE_DIR
    geometry: dict[str, dict] = {}
    jobs = []
    skipped = 0
    for h in headers:
        path = root / h.rel
        png = out_dir / IMAGES_DIR / h.patient_id / f"{h.image_id}.png"
        state = state_dir / f"{h.image_id}.json"
        if png.is_file() and state.is_file():
            try:
                geom = json.loads(state.read_text(encoding="utf-8"))
                same = (geom.get("out_h"), geom.get("out_w"), geom.get("crop")) == (*out_hw, crop)
                if same:
                    geometry[h.image_id] = geom
                    skipped += 1
                    continue
            except json.JSONDecodeError:
                pass  # half-written by an older crash: redo the image
        jobs.append((h.image_id, str(path), str(png), str(state), tuple(out_hw), crop))
    geometry.update(
        convert_all(jobs, workers, _ingest_one, desc="ingest", verb="converted", progress=progress)
    )

    table = _folds_rows(
        headers, geometry, label_rows, split=split, test_fraction=test_fraction, seed=seed
    )
    csv_path = out_dir / FOLDS_CSV
    write_text_atomic(csv_path, table.to_csv(index=False))
    counts = table.drop_duplicates("image_id")["split"].value_counts()
    splits = {str(k): int(v) for k, v in counts.items()}
    result = IngestResult(
        out_dir,
        csv_path,
        len(files),
        len(jobs),
        skipped,
        duplicates,
        len(table),
        int(table["resized_xmin"].ne("").sum()),
        splits,
    )
    unknown = {
        "laterality": sum(not h.laterality for h in headers),
        "view": sum(not h.view for h in headers),
    }
    split_rule: Any = {"test_fraction": test_fraction, "seed": seed}
    if split:
        split_rule = "given"
    elif label_rows is not None and _has_split(label_rows):
        split_rule = "labels CSV"
    write_json(
        out_dir / INGEST_META,
        {
            "schema_version": SCHEMA_VERSION,
            **result.as_dict(),
            "height": out_hw[0],
            "width": out_hw[1],
            "border": BORDER,
            "crop": crop,
            "labelled": label_rows is not None,
            "split_rule": split_rule,
            "id_hash": {"algorithm": "sha256", "prefix": HASH_PREFIX, "hex_digits": HASH_HEX},
            "unknown": unknown,
            "manufacturers": dict(Counter(h.manufacturer or "unknown" for h in headers)),
        },
    )
    for what, n in unknown.items():
        if n:
            log.warning("%d image(s) have no %s in their header (left empty in the CSV)", n, what)
    return result


def _has_split(label_rows: dict[str, pd.DataFrame]) -> bool:
    return any("split" in rows.columns for rows in label_rows.values())


def _folds_rows(
    headers: Sequence[Header],
    geometry: dict[str, dict],
    label_rows: dict[str, pd.DataFrame] | None,
    *,
    split: str | None,
    test_fraction: float,
    seed: int,
) -> pd.DataFrame:
    """One folds-format row per label row (one per image without labels)."""
    out = []
    for h in headers:
        geom = geometry[h.image_id]
        crop_geom = CropGeometry(**{k: geom[k] for k in CropGeometry.__dataclass_fields__})
        rows = label_rows[h.image_id] if label_rows is not None else pd.DataFrame([{}])
        image_split = split or assign_split(h.patient_id, seed, test_fraction)
        for _, lab in rows.iterrows():
            given = str(lab.get("split", "") or "").strip()
            if given and not split:
                image_split = given
            concepts = {c: int(str(lab.get(c, "0")).strip() or 0) for c in FINDING_CONCEPTS}
            xyxy = [str(lab.get(c, "") or "").strip() for c in ORIGINAL_BOX_COLUMNS]
            resized = [""] * 4
            if all(xyxy):
                try:
                    box = [float(v) for v in xyxy]
                except ValueError as exc:
                    raise DataError(
                        f"labels CSV: box of image {h.rel} is not numeric: {xyxy}"
                    ) from exc
                resized = [_fmt(v) for v in crop_geom.map_box(*box)]
            else:
                xyxy = [""] * 4
            cats = [c.replace("_", " ") for c in FINDING_CONCEPTS if concepts[c]]
            out.append(
                {
                    "patient_id": h.patient_id,
                    "series_id": h.series_id,
                    "image_id": f"{h.image_id}.png",
                    "laterality": h.laterality,
                    "view": h.view,
                    "height": h.height,
                    "width": h.width,
                    "breast_birads": "",
                    "breast_density": "",
                    "finding_categories": repr(cats),
                    "finding_birads": str(lab.get("finding_birads", "") or ""),
                    **dict(zip(ORIGINAL_BOX_COLUMNS, xyxy, strict=True)),
                    "split": image_split,
                    **dict(zip(RESIZED_BOX_COLUMNS, resized, strict=True)),
                    "fold": str(patient_fold(h.patient_id)),
                    **{c: str(v) for c, v in concepts.items()},
                    "density": "",
                    "study_id": h.study_id,
                    "manufacturer": h.manufacturer,
                }
            )
    table = pd.DataFrame(out, columns=[*FOLDS_COLUMNS, "study_id", "manufacturer"])
    # An image's rows must share a split (the reader refuses otherwise): the last given one wins.
    table["split"] = table.groupby("image_id")["split"].transform("last")
    return table
