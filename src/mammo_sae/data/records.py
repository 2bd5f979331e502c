"""The record every stage passes around: one image (or one CSV row), its labels and boxes.

Coordinates are always in the **model-input frame** (pixels of the image the encoder sees,
x = column, y = row, origin top-left); `frame_hw` says which frame that is.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

# The 11 finding columns of the Mammo-CLIP folds CSV, in file order.
FINDING_CONCEPTS: tuple[str, ...] = (
    "Architectural_Distortion", "Asymmetry", "Focal_Asymmetry", "Global_Asymmetry", "Mass",
    "Nipple_Retraction", "No_Finding", "Skin_Retraction", "Skin_Thickening",
    "Suspicious_Calcification", "Suspicious_Lymph_Node",
)
# Multi-class targets available as labels too.
MULTICLASS_CONCEPTS: dict[str, int] = {"density": 4, "birads": 5}
# The phantom's planted background marker (not a finding; used to score confounding latents).
CONFOUNDER = "confounder"
SPLITS: tuple[str, ...] = ("training", "test")

Level = Literal["image", "row"]


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

    image_id: str                      # without a file suffix
    patient_id: str
    split: str                         # "training" | "test" (and "validation" when carved)
    path: Path | None                  # PNG or DICOM file; None for in-memory data
    labels: dict[str, int]             # concept -> label (binary 0/1; density 0-3; birads 1-5)
    boxes: tuple[Box, ...] = ()
    view: str = ""                     # CC | MLO
    laterality: str = ""               # L | R
    frame_hw: tuple[int, int] = (1520, 912)
    series_id: str = ""
    fold: int | None = None
    row_index: int | None = None       # CSV row at row level, None at image level
    extra: dict[str, float] = field(default_factory=dict)

    def label(self, concept: str) -> int:
        return self.labels[concept]

    def boxes_of(self, concept: str) -> tuple[Box, ...]:
        return tuple(b for b in self.boxes if b.concept == concept)

    def with_split(self, split: str) -> "ImageRecord":
        return dataclasses.replace(self, split=split)
