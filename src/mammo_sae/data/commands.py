"""CLI commands of the data layer: `mammo-sae data summary`, `preprocess` and `ingest`."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..config import opt, progress_opt
from ..errors import DataError
from ..io import dumps_json, write_json, writer_lock


@dataclass
class SummaryConfig:
    """Counts per split: rows, images, patients, positives per concept at row and image level,
    density and BI-RADS, boxes per concept (after clipping to the frame), box clipping stats."""

    data: Path | None = opt(
        None,
        help="data directory (vindr_detection_v1_folds.csv + images_png/, "
        "or finding_annotations.csv)",
    )
    csv: Path | None = opt(None, help="a folds-style CSV or the official finding_annotations.csv")
    splits: list[str] | None = opt(None, help="only these splits (comma separated)")
    on_missing: Literal["ignore", "error", "skip"] = opt(
        "ignore",
        help="image files: not checked (ignore), missing ones fail (error) or are left out (skip)",
    )
    out: Path | None = opt(None, help="also write the JSON here")


def run_summary(cfg: SummaryConfig) -> int:
    from .vindr import summarize_dataset

    if (cfg.data is None) == (cfg.csv is None):
        raise DataError("give exactly one of --data DIR or --csv FILE")
    summary = summarize_dataset(
        cfg.data or cfg.csv,  # type: ignore[arg-type]
        splits=cfg.splits or None,
        on_missing=cfg.on_missing,
    )
    if cfg.out is not None:
        write_json(cfg.out, summary)
    sys.stdout.write(dumps_json(summary))
    return 0


@dataclass
class PreprocessConfig:
    """Follows Mammo-CLIP: 5-px border crop, MONOCHROME1 inversion, min-max to uint8, breast-region
    crop, INTER_AREA resize; boxes mapped on both axes correctly. Resumable (finished images are
    skipped) and parallel over images."""

    dicom_root: Path = opt(
        help="VinDr DICOM tree: <root>/<study_id>/<image_id>.dicom (or <root>/images/...)"
    )
    csv: Path = opt(help="official finding_annotations.csv")
    out: Path = opt(help="output directory (images_png/ + vindr_detection_v1_folds.csv)")
    breast_csv: Path | None = opt(
        None, help="official breast-level_annotations.csv: the image list"
    )
    height: int = opt(1520, min=32, help="output PNG height")
    width: int = opt(912, min=32, help="output PNG width")
    workers: int = opt(1, min=0, help="parallel worker processes")
    on_missing: Literal["error", "skip"] = opt(
        "error", help="missing DICOM files: fail or skip them"
    )
    progress: bool = progress_opt()


def run_preprocess(cfg: PreprocessConfig) -> int:
    from .preprocess import preprocess_vindr

    if cfg.height < 16 or cfg.width < 16:
        raise DataError(f"output size {cfg.height}x{cfg.width} is too small")
    with writer_lock(cfg.out):
        result = preprocess_vindr(
            cfg.dicom_root,
            cfg.csv,
            cfg.out,
            breast_csv=cfg.breast_csv,
            out_hw=(cfg.height, cfg.width),
            workers=max(1, cfg.workers),
            on_missing=cfg.on_missing,
            progress=cfg.progress,
        )
    sys.stdout.write(dumps_json(result.as_dict()))
    return 0


@dataclass
class IngestConfig:
    """From headers alone: laterality (ImageLaterality, else Laterality), view (ViewPosition,
    else the view code sequence), size, manufacturer. Patient, study, series and image ids are
    hashed (sha256 of 'mammo-sae-id:' + the id, 20 hex digits); no raw identifier or file path
    is written. Pixels go through `preprocess`'s Mammo-CLIP steps (border crop, MONOCHROME1
    inversion, min-max to uint8, breast crop, resize). Density and BI-RADS stay empty (unknown).
    Finds .dcm, .dicom and extension-less DICOMs recursively. Resumable, parallel over images.

    --labels CSV: key column `image` (path relative to DICOM_DIR, with or without suffix, or the
    file name) or `sop_instance_uid`; 0/1 columns named as the findings (Mass,
    Suspicious_Calcification, ...); optional xmin,ymin,xmax,ymax (original DICOM pixels), split,
    finding_birads; one row per finding, every image at least one row."""

    dicom_dir: Path = opt(help="folder of DICOMs (searched recursively)")
    out: Path = opt(
        help="output data directory (images_png/ + vindr_detection_v1_folds.csv + ingest.json)"
    )
    labels: Path | None = opt(None, help="CSV of concept labels (and boxes) per image")
    height: int = opt(1520, min=32, help="output PNG height")
    width: int = opt(912, min=32, help="output PNG width")
    crop: bool = opt(
        True, help="breast crop as `preprocess` (--no-crop keeps the whole frame and warns)"
    )
    split: str | None = opt(
        None,
        help="put every image in this split (e.g. test); default: "
        "the labels CSV's split column, else a seeded hash of "
        "the hashed patient id",
    )
    test_fraction: float = opt(
        0.2, min=0.0, max=1.0, help="share of patients in 'test' when splits are assigned by hash"
    )
    seed: int = opt(0, help="seed of the split assignment")
    workers: int = opt(1, min=0, help="parallel worker processes")
    progress: bool = progress_opt()


def run_ingest(cfg: IngestConfig) -> int:
    from .ingest import ingest

    result = ingest(
        cfg.dicom_dir,
        cfg.out,
        labels=cfg.labels,
        out_hw=(cfg.height, cfg.width),
        crop=cfg.crop,
        split=cfg.split,
        test_fraction=cfg.test_fraction,
        seed=cfg.seed,
        workers=max(1, cfg.workers),
        progress=cfg.progress,
    )
    sys.stdout.write(dumps_json(result.as_dict()))
    return 0
