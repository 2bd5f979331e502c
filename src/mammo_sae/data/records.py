"""The record every stage passes around: one image (or one CSV row), its labels and boxes.

Coordinates are always in the **model-input frame** (pixels of the image the encoder sees,
x = column, y = row, origin top-left); `frame_hw` says which frame that is.
"""

from __future__ import annotations

import dataclasses
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..errors import DataError

# The 11 finding columns of the Mammo-CLIP folds CSV, in file order.
FINDING_CONCEPTS: tuple[str, ...] = (
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
)
# Multi-class targets available as labels too.
MULTICLASS_CONCEPTS: dict[str, int] = {"density": 4, "birads": 5}
# The phantom's planted background marker (not a finding; used to score confounding latents).
CONFOUNDER = "confounder"
SPLITS: tuple[str, ...] = ("training", "test")

Level = Literal["image", "row"]

# Unicode categories refused in ids: control, format (e.g. bidi overrides) and surrogate
# characters, and line/paragraph separators.
_BAD_ID_CATEGORIES = ("Cc", "Cf", "Cs", "Zl", "Zp")


# The 33 columns of the Mammo-CLIP folds CSV, in file order (preprocess, ingest and the phantom
# write them).
FOLDS_COLUMNS: tuple[str, ...] = (
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
    *FINDING_CONCEPTS,
    "density",
)


def id_problem(value: object) -> str | None:
    """Why `value` cannot be an id (patient, study or image) that names a file, or None.

    Ids come from CSVs and are joined into paths such as `images_png/<patient>/<image>.png`,
    so an id must be a plain name: not empty, no path separator ('/' or '\\'), no ':' (a
    drive or stream on Windows), not '.' or '..', no control characters.
    """
    if not isinstance(value, str):
        return f"not text ({type(value).__name__})"
    if not value:
        return "it is empty"
    if value in (".", ".."):
        return f"{value!r} names a folder, not a file"
    for sep in ("/", "\\", ":"):
        if sep in value:
            return f"it contains {sep!r} (a path, not a name)"
    for ch in value:
        if unicodedata.category(ch) in _BAD_ID_CATEGORIES:
            return f"it contains the control character U+{ord(ch):04X}"
    return None


def check_ids(values: Iterable[object], column: str, source: object) -> None:
    """Raise DataError naming the column and (0-based) row of the first id in `values` that
    `id_problem` refuses; every row is checked, so nothing is written before bad input shows."""
    problems: dict[object, str | None] = {}  # ids repeat (one per CSV row): check each once
    first: tuple[int, object, str] | None = None
    n_bad = 0
    for i, value in enumerate(values):
        if value not in problems:
            problems[value] = id_problem(value)
        problem = problems[value]
        if problem is not None:
            n_bad += 1
            first = first or (i, value, problem)
    if first is not None:
        i, value, problem = first
        raise DataError(
            f"{source}: column {column!r} row {i} has {value!r}, which cannot be an "
            f"id: {problem}; ids are names of files inside the data folder, not paths "
            f"({n_bad} bad row(s))"
        )


def is_attribute(concept: str) -> bool:
    """Whether a box's concept marks a per-image attribute rather than a finding: any concept
    that is not one of `FINDING_CONCEPTS` (e.g. the phantom's `confounder` marker)."""
    return concept not in FINDING_CONCEPTS


@dataclass(frozen=True)
class Box:
    """A ground-truth box of one concept, in model-input pixels (x0 < x1, y0 < y1)."""

    concept: str
    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def area(self) -> float:
        return max(0.0, self.x1 - self.x0) * max(0.0, self.y1 - self.y0)


@dataclass(frozen=True)
class ImageRecord:
    """One model input with its labels.

    At image level (the default) there is one record per image and each binary label is 1 if
    any CSV row of the image is positive. At row level there is one record per CSV row with
    that row's labels (what the reference evaluation does; images with several findings then
    appear several times). `boxes` always holds every box of the image, so localisation is
    scored against all of them at either level.
    """

    image_id: str  # without a file suffix
    patient_id: str
    split: str  # "training" | "test" (and "validation" when carved)
    path: Path | None  # PNG or DICOM file; None for in-memory data
    labels: dict[str, int]  # concept -> label (binary 0/1; density 0-3; birads 1-5)
    boxes: tuple[Box, ...] = ()
    view: str = ""  # CC | MLO
    laterality: str = ""  # L | R
    frame_hw: tuple[int, int] = (1520, 912)
    series_id: str = ""
    fold: int | None = None
    row_index: int | None = None  # CSV row at row level, None at image level
    extra: dict[str, float] = field(default_factory=dict)

    def label(self, concept: str) -> int:
        return self.labels[concept]

    def boxes_of(self, concept: str) -> tuple[Box, ...]:
        return tuple(b for b in self.boxes if b.concept == concept)

    def attribute_boxes(self) -> tuple[Box, ...]:
        """Boxes that mark a per-image attribute's region rather than a finding
        (`is_attribute`): the latent summaries measure how much of a latent's mass on such
        images falls inside them, and the atlas names latents that follow such an attribute."""
        return tuple(b for b in self.boxes if is_attribute(b.concept))

    def with_split(self, split: str) -> ImageRecord:
        return dataclasses.replace(self, split=split)
