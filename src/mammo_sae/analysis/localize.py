"""Localisation: latent heatmaps → thresholded masks → boxes → dataset-level VOC AP at an IoU.

The paper's Table 2 (see docs/localization.md). For each chosen latent and each image of the
evaluated set:

1. heatmap = the latent's patch map upsampled bilinearly (or `upsample="nearest"`) to the
   model-input frame, each cell's value at its receptive-field centre (`maps.upsample`;
   `align="even"`: the released code's `align_corners=False`);
2. mask = heatmap > threshold, the threshold being a fraction of the heatmap's maximum
   (`relmax:0.3`: the default, chosen on training AP by the localisation study, and the
   released code's rule) or a percentile of it (`p95`, the paper's text) or absolute (`abs:X`);
   `threshold_on="grid"` thresholds the native cell map instead, before upsampling;
3. one box per connected region of the mask (8-connected, holes filled: exactly OpenCV's
   external contours + `boundingRect`; on the grid, the span of the region's cells), kept if
   w·h ≥ `min_box_area` px and, with `min_mass`, if it holds that share of the mask's heat
   (`BoxRule` gathers these settings);
4. each box scored by the mean (or max) heatmap value inside it;
5. all boxes of all images pooled per latent and scored against the concept's ground-truth boxes
   with VOC all-point AP at IoU ≥ `iou_threshold` (Mammo-CLIP's detector evaluation).

Boxes are `(n, 4)` float arrays `[x0, y0, x1, y1]` in model-input pixels, x = column, with
exclusive ends (a one-pixel box is `[c, r, c + 1, r + 1]`); IoU is continuous (no `+1`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import ndimage

from ..errors import DataError, MammoSaeError
from ..protocols import LatentEncoder, PatchStore, SAELike
from . import DEFAULT_THRESHOLD, PAPER_THRESHOLD

Match = Literal["voc", "coco"]
BoxScore = Literal["mean", "max"]
ImageSet = Literal["positive", "all"]

SCHEMA_VERSION = 1


# --------------------------------------------------------------------------- thresholds


@dataclass(frozen=True)
class ThresholdRule:
    """How a heatmap becomes a mask (see `threshold_mask`)."""

    kind: Literal["percentile", "relmax", "abs"]
    value: float

    @property
    def spec(self) -> str:
        if self.kind == "percentile":
            return f"p{self.value:g}"
        return f"{self.kind}:{self.value:g}"

    def cutoff(self, heat_hw: np.ndarray) -> float:
        if self.kind == "percentile":
            return float(np.percentile(heat_hw, self.value))
        if self.kind == "relmax":
            return self.value * float(heat_hw.max())
        return self.value


_THRESHOLD_RE = re.compile(r"^(?:p(?P<p>\d+(?:\.\d*)?)|(?P<kind>relmax|abs):(?P<v>[-+0-9.eE]+))$")


def parse_threshold(spec: str | ThresholdRule) -> ThresholdRule:
    """`p95` (95th percentile of each heatmap), `relmax:0.3` (0.3 × its max) or `abs:0.5`."""
    if isinstance(spec, ThresholdRule):
        return spec
    m = _THRESHOLD_RE.match(spec.strip().lower())
    if m is None:
        raise MammoSaeError(
            f"invalid threshold {spec!r}; use pNN (percentile, e.g. p95), "
            "relmax:F (fraction of the map's max, e.g. relmax:0.3) or abs:X"
        )
    if m["p"] is not None:
        value = float(m["p"])
        if not 0.0 <= value < 100.0:
            raise MammoSaeError(f"threshold {spec!r}: percentile must be in [0, 100)")
        return ThresholdRule("percentile", value)
    try:
        value = float(m["v"])
    except ValueError as exc:
        raise MammoSaeError(f"invalid threshold {spec!r}: {m['v']!r} is not a number") from exc
    if m["kind"] == "relmax" and not 0.0 <= value < 1.0:
        raise MammoSaeError(f"threshold {spec!r}: relmax fraction must be in [0, 1)")
    return ThresholdRule(m["kind"], value)  # type: ignore[arg-type]


def threshold_mask(heat_hw: np.ndarray, rule: ThresholdRule | str) -> np.ndarray:
    """Boolean mask of the heatmap's pixels that reach the rule's cutoff and are positive.

    `relmax` keeps `heat > F·max` (strict, exactly the released code); `percentile` and `abs`
    keep `heat >= cutoff`, so a plateau at the percentile (e.g. a saturated corner cell
    covering more than 5 % of the frame) is kept rather than dropped whole. Pixels ≤ 0 are
    never kept: a latent that does not fire has no region, whatever the rule (otherwise `p95`
    of a mostly-zero map would select the zeros).
    """
    rule = parse_threshold(rule)
    heat_hw = np.asarray(heat_hw)
    if heat_hw.ndim != 2:
        raise MammoSaeError(f"heatmap must be 2-D (H, W), got shape {heat_hw.shape}")
    if not np.isfinite(heat_hw).all():
        raise MammoSaeError("heatmap contains NaN or infinite values")
    firing = heat_hw > 0
    if not firing.any():
        return firing
    cutoff = rule.cutoff(heat_hw)
    above = heat_hw > cutoff if rule.kind == "relmax" else heat_hw >= cutoff
    return above & firing


# --------------------------------------------------------------------------- boxes

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def mask_to_boxes(
    mask_hw: np.ndarray,
    min_area: float = 10,
    *,
    heat_hw: np.ndarray | None = None,
    min_mass: float = 0.0,
) -> np.ndarray:
    """One box per connected region of the mask, `[x0, y0, x1, y1]` with exclusive ends.

    Equals OpenCV `findContours(RETR_EXTERNAL)` + `boundingRect` (what the released code does):
    foreground 8-connected, and regions lying inside another region's hole belong to that
    region (filled first). Boxes with width × height < `min_area` are dropped, and with
    `heat_hw`, regions holding less than `min_mass` of the mask's summed heat (a stray speck
    next to the blob that carries the map). Sorted by (y0, x0, x1, y1) so the order is
    deterministic.
    """
    mask_hw = np.asarray(mask_hw, dtype=bool)
    if mask_hw.ndim != 2:
        raise MammoSaeError(f"mask must be 2-D (H, W), got shape {mask_hw.shape}")
    if not mask_hw.any():
        return np.zeros((0, 4))
    # Work on the mask's bounding crop: everything outside it is background connected to
    # the frame's border, so holes and regions are the same as in the full frame.
    rows = np.flatnonzero(mask_hw.any(axis=1))
    cols = np.flatnonzero(mask_hw.any(axis=0))
    r0, c0 = rows[0], cols[0]
    crop = mask_hw[r0 : rows[-1] + 1, c0 : cols[-1] + 1]
    labels, n = ndimage.label(_fill_holes(crop), structure=_EIGHT_CONNECTED)
    boxes = [
        (sx.start + c0, sy.start + r0, sx.stop + c0, sy.stop + r0)
        for sy, sx in ndimage.find_objects(labels)
    ]
    out = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    keep = box_areas(out) >= min_area
    if heat_hw is not None and min_mass > 0:
        heat = np.where(crop, np.asarray(heat_hw)[r0 : rows[-1] + 1, c0 : cols[-1] + 1], 0.0)
        mass = np.asarray(ndimage.sum(heat, labels, np.arange(1, n + 1)), dtype=np.float64)
        keep &= mass >= min_mass * max(float(mass.sum()), np.finfo(np.float64).tiny)
    out = out[keep]
    return out[np.lexsort((out[:, 3], out[:, 2], out[:, 0], out[:, 1]))]


def _fill_holes(mask_hw: np.ndarray) -> np.ndarray:
    """The mask plus its holes: background regions (4-connected, as OpenCV's) that do not touch
    the border. Same result as `ndimage.binary_fill_holes`, about 10x faster on large frames."""
    background, n = ndimage.label(~mask_hw)
    if n == 0:
        return mask_hw
    border = np.unique(
        np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]])
    )
    is_hole = np.ones(n + 1, dtype=bool)
    is_hole[border] = False
    is_hole[0] = False  # label 0 = the mask itself
    return mask_hw | is_hole[background]


def box_areas(boxes_n4: np.ndarray) -> np.ndarray:
    b = np.asarray(boxes_n4, dtype=np.float64).reshape(-1, 4)
    return np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)


def score_boxes(heat_hw: np.ndarray, boxes_n4: np.ndarray, how: BoxScore = "mean") -> np.ndarray:
    """Each box's score: the mean (or max) heatmap value over the pixels of its rectangle."""
    reduce = {"mean": np.mean, "max": np.max}.get(how)
    if reduce is None:
        raise MammoSaeError(f"unknown box score {how!r}; valid: mean, max")
    scores = np.empty(len(boxes_n4))
    for i, (x0, y0, x1, y1) in enumerate(np.asarray(boxes_n4, dtype=np.int64).reshape(-1, 4)):
        scores[i] = reduce(heat_hw[y0:y1, x0:x1])
    return scores


def heatmap_boxes(
    heat_hw: np.ndarray,
    rule: ThresholdRule | str,
    *,
    min_area: float = 10,
    box_score: BoxScore = "mean",
) -> tuple[np.ndarray, np.ndarray]:
    """Threshold → connected regions → boxes and their scores, for one heatmap."""
    boxes = mask_to_boxes(threshold_mask(heat_hw, rule), min_area)
    return boxes, score_boxes(heat_hw, boxes, box_score)


ThresholdOn = Literal["frame", "grid"]
THRESHOLD_ON = ("frame", "grid")


@dataclass(frozen=True)
class BoxRule:
    """Everything that turns one latent's cell map into scored boxes (docs/localization.md).

    `threshold` is applied to the upsampled heatmap (`threshold_on="frame"`, the paper) or to
    the native cell grid (`"grid"`: a region is a set of 8-connected cells and its box spans
    their stride-wide windows). `upsample` is how cells become pixels (`bilinear`, the paper,
    or `nearest`); `min_mass` drops regions with less than that share of the mask's summed
    heat; `min_area` drops boxes under w·h px; `box_score` ranks the boxes.
    """

    threshold: ThresholdRule = ThresholdRule("percentile", 95.0)
    threshold_on: ThresholdOn = "frame"
    upsample: str = "bilinear"
    min_mass: float = 0.0
    min_area: float = 10
    box_score: BoxScore = "mean"

    def __post_init__(self) -> None:
        from .maps import UPSAMPLINGS

        object.__setattr__(self, "threshold", parse_threshold(self.threshold))
        if self.threshold_on not in THRESHOLD_ON:
            raise MammoSaeError(
                f"unknown threshold target {self.threshold_on!r}; valid: {', '.join(THRESHOLD_ON)}"
            )
        if self.upsample not in UPSAMPLINGS:
            raise MammoSaeError(
                f"unknown upsampling {self.upsample!r}; valid: {', '.join(UPSAMPLINGS)}"
            )
        if not 0.0 <= self.min_mass < 1.0:
            raise MammoSaeError(f"min mass must be a fraction in [0, 1), got {self.min_mass}")
        if self.box_score not in ("mean", "max"):
            raise MammoSaeError(f"unknown box score {self.box_score!r}; valid: mean, max")

    def settings(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold.spec,
            "threshold_on": self.threshold_on,
            "upsample": self.upsample,
            "min_mass": self.min_mass,
            "min_box_area": self.min_area,
            "box_score": self.box_score,
        }

    @classmethod
    def from_settings(cls, s: Mapping[str, Any]) -> BoxRule:
        """The rule a localization.json `settings` records (older files: the paper's rule with
        their threshold, area and score)."""
        return cls(
            parse_threshold(str(s.get("threshold", PAPER_THRESHOLD))),
            s.get("threshold_on", "frame"),
            s.get("upsample", "bilinear"),
            float(s.get("min_mass", 0.0)),
            float(s.get("min_box_area", 10)),
            s.get("box_score", "mean"),
        )


@dataclass(frozen=True)
class LocalizationSettings:
    """localization.json's `settings`: how one result drew, matched and scored its boxes. The
    localize command writes it (`to_json`) and the report reads it back (`from_json`: Table 2's
    note, the latent pages' boxes). The defaults are what files written before a setting
    existed used; `schema_version` is the file's own (a newer file than this reader is refused)."""

    concept: str = ""
    # BoxRule.settings(): see `BoxRule`.
    threshold: str = PAPER_THRESHOLD
    threshold_on: str = "frame"
    upsample: str = "bilinear"
    min_mass: float = 0.0
    min_box_area: float = 10
    box_score: str = "mean"
    iou_threshold: float = 0.25
    split: str = ""  # "" = not recorded
    image_set: str = ""
    match: str = "voc"
    ap: str = "voc-all-point"
    align: str = "even"  # cells at even positions: results from before the setting existed
    n_images: int = 0
    n_gt: int = 0
    schema_version: int = SCHEMA_VERSION  # of the localization.json (not inside `settings`)

    def to_json(self) -> dict[str, Any]:
        """The `settings` object (localization.json holds `schema_version` beside it)."""
        out = asdict(self)
        del out["schema_version"]
        return out

    @classmethod
    def from_json(
        cls, doc: Mapping[str, Any], where: str = "localization.json"
    ) -> LocalizationSettings:
        """The settings of a whole localization.json (`{schema_version, settings, ...}`)."""
        version = doc.get("schema_version", SCHEMA_VERSION)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise MammoSaeError(
                f"{where}: schema_version {version!r}, newer than this mammo-sae reads "
                f"({SCHEMA_VERSION}): upgrade mammo-sae"
            )
        settings = doc.get("settings") or {}
        if not isinstance(settings, Mapping):
            raise MammoSaeError(f"{where}: `settings` is not an object")
        known = {f.name for f in fields(cls)} - {"schema_version"}
        return cls(**{k: v for k, v in settings.items() if k in known}, schema_version=version)

    def box_rule(self) -> BoxRule:
        return BoxRule.from_settings(self.to_json())


def map_boxes(
    map_hw: np.ndarray,
    frame_hw: tuple[int, int],
    centres: tuple[np.ndarray, np.ndarray] | None,
    rule: BoxRule,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One cell map → (heatmap in the frame, boxes, their scores) under a box rule."""
    from .maps import upsample

    heat = upsample(map_hw, frame_hw, centres, rule.upsample)
    if rule.threshold_on == "frame":
        boxes = mask_to_boxes(
            threshold_mask(heat, rule.threshold),
            rule.min_area,
            heat_hw=heat,
            min_mass=rule.min_mass,
        )
    else:
        cells = mask_to_boxes(
            threshold_mask(map_hw, rule.threshold), 0, heat_hw=map_hw, min_mass=rule.min_mass
        ).astype(np.int64)
        boxes = _cell_boxes_to_pixels(cells, np.shape(map_hw), frame_hw, centres)
        boxes = boxes[box_areas(boxes) >= rule.min_area]
    return heat, boxes, score_boxes(heat, boxes, rule.box_score)


def _cell_boxes_to_pixels(
    cells_n4: np.ndarray,
    grid_hw: tuple[int, ...],
    frame_hw: tuple[int, int],
    centres: tuple[np.ndarray, np.ndarray] | None,
) -> np.ndarray:
    """Boxes in cell indices (exclusive ends) → pixel boxes spanning those cells' windows,
    rounded to whole pixels and clipped to the frame."""
    H, W = (int(v) for v in frame_hw)
    y_lo, y_hi = _cell_spans(None if centres is None else centres[0], int(grid_hw[0]), H)
    x_lo, x_hi = _cell_spans(None if centres is None else centres[1], int(grid_hw[1]), W)
    c = np.asarray(cells_n4, dtype=np.int64).reshape(-1, 4)
    out = np.stack([x_lo[c[:, 0]], y_lo[c[:, 1]], x_hi[c[:, 2] - 1], y_hi[c[:, 3] - 1]], axis=1)
    out = np.floor(out + 0.5)  # half-pixel edges round up, the same way on both sides
    out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0, W)
    out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0, H)
    return out


# --------------------------------------------------------------------------- AP


def box_iou(a_n4: np.ndarray, b_m4: np.ndarray) -> np.ndarray:
    """(n, m) intersection over union of two box sets (continuous coordinates)."""
    a = np.asarray(a_n4, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b_m4, dtype=np.float64).reshape(-1, 4)
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    union = box_areas(a)[:, None] + box_areas(b)[None, :] - inter
    return inter / np.maximum(union, np.finfo(np.float64).eps)


def match_image(
    pred_n4: np.ndarray,
    scores_n: np.ndarray,
    gt_m4: np.ndarray,
    iou_threshold: float,
    match: Match = "voc",
) -> np.ndarray:
    """True-positive flags of one image's detections (in the given order), matched by score.

    Detections are visited by descending score (ties in input order); each GT box is matched at
    most once. `voc` (Mammo-CLIP / VOC devkit): a detection takes the GT box of highest IoU; it is
    a TP if that IoU ≥ threshold and the box is still free, otherwise an FP (no fallback to the
    second-best box). `coco` (pycocotools): it takes the free GT box of highest IoU ≥ threshold.
    """
    n = len(pred_n4)
    tp = np.zeros(n, dtype=bool)
    if n == 0 or len(gt_m4) == 0:
        return tp
    iou_nm = box_iou(pred_n4, gt_m4)
    taken = np.zeros(len(gt_m4), dtype=bool)
    for d in np.argsort(-np.asarray(scores_n, dtype=np.float64), kind="stable"):
        if match == "voc":
            g = int(np.argmax(iou_nm[d]))
            if iou_nm[d, g] >= iou_threshold and not taken[g]:
                tp[d] = taken[g] = True
        else:
            cand = np.where(taken, -np.inf, iou_nm[d])
            g = int(np.argmax(cand))
            if cand[g] >= iou_threshold:
                tp[d] = taken[g] = True
    return tp


def voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC all-point AP: precision made monotone from the right, summed over recall steps."""
    mrec = np.concatenate(([0.0], np.asarray(recall, dtype=np.float64), [1.0]))
    mpre = np.concatenate(([0.0], np.asarray(precision, dtype=np.float64), [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    step = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[step + 1] - mrec[step]) * mpre[step + 1]))


def coco_ap101(recall: np.ndarray, precision: np.ndarray) -> float:
    """COCO's AP: the monotone precision read at 101 recall points 0, 0.01, …, 1, averaged.

    Given only to document (and test) the difference from `voc_ap`; localisation reports VOC.
    """
    recall = np.asarray(recall, dtype=np.float64)
    if recall.size == 0:
        return 0.0
    mpre = np.maximum.accumulate(np.asarray(precision, dtype=np.float64)[::-1])[::-1]
    at = np.searchsorted(recall, np.linspace(0.0, 1.0, 101), side="left")
    # Recall points beyond the curve's end get precision 0.
    values = np.where(at < len(mpre), mpre[np.minimum(at, len(mpre) - 1)], 0.0)
    return float(np.mean(values))


@dataclass
class APResult:
    """Dataset-level AP of one detector (one latent) and its precision-recall curve."""

    ap: float
    n_pred: int
    n_gt: int
    n_images: int
    tp: np.ndarray = field(repr=False)  # per detection, in descending-score order
    scores: np.ndarray = field(repr=False)

    @property
    def n_tp(self) -> int:
        return int(self.tp.sum())

    @property
    def precision(self) -> np.ndarray:
        return np.cumsum(self.tp) / np.arange(1, len(self.tp) + 1)

    @property
    def recall(self) -> np.ndarray:
        return np.cumsum(self.tp) / self.n_gt if self.n_gt else np.zeros(len(self.tp))

    def best_f1(self) -> tuple[float, float, float]:
        """(F1, precision, recall) at the score cutoff of highest F1; zeros without a TP."""
        if self.n_tp == 0:
            return 0.0, 0.0, 0.0
        p, r = self.precision, self.recall
        f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0.0)
        i = int(np.argmax(f1))
        return float(f1[i]), float(p[i]), float(r[i])


def _as_boxes(boxes: Any, what: str) -> np.ndarray:
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 4))
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise MammoSaeError(f"{what}: boxes must have shape (n, 4), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise MammoSaeError(f"{what}: boxes contain NaN or infinite values")
    return arr


def average_precision(
    preds: Sequence[tuple[np.ndarray, np.ndarray]],
    gts: Sequence[np.ndarray],
    iou_threshold: float = 0.25,
    match: Match = "voc",
) -> APResult:
    """Dataset-level AP: `preds[i] = (boxes (n, 4), scores (n,))` and `gts[i]` (m, 4) of image i.

    Detections of all images are pooled and ranked by score (ties: image order, then score order
    within the image); recall's denominator is the number of GT boxes over all images. With no
    GT box at all the AP is 0 (as Mammo-CLIP's routine); `n_gt` says so.
    """
    if len(preds) != len(gts):
        raise MammoSaeError(f"{len(preds)} prediction sets but {len(gts)} ground-truth sets")
    if match not in ("voc", "coco"):
        raise MammoSaeError(f"unknown matching {match!r}; valid: voc, coco")
    if not 0.0 < iou_threshold <= 1.0:
        raise MammoSaeError(f"IoU threshold must be in (0, 1], got {iou_threshold}")
    all_tp: list[np.ndarray] = []
    all_scores: list[np.ndarray] = []
    n_gt = 0
    for i, ((boxes, scores), gt) in enumerate(zip(preds, gts)):
        boxes = _as_boxes(boxes, f"image {i} predictions")
        gt = _as_boxes(gt, f"image {i} ground truth")
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if len(scores) != len(boxes):
            raise MammoSaeError(f"image {i}: {len(boxes)} boxes but {len(scores)} scores")
        if not np.isfinite(scores).all():
            raise MammoSaeError(f"image {i}: scores contain NaN or infinite values")
        order = np.argsort(-scores, kind="stable")
        all_tp.append(match_image(boxes, scores, gt, iou_threshold, match)[order])
        all_scores.append(scores[order])
        n_gt += len(gt)
    tp = np.concatenate(all_tp) if all_tp else np.zeros(0, dtype=bool)
    scores = np.concatenate(all_scores) if all_scores else np.zeros(0)
    order = np.argsort(-scores, kind="stable")
    result = APResult(
        ap=0.0, n_pred=len(tp), n_gt=n_gt, n_images=len(gts), tp=tp[order], scores=scores[order]
    )
    if n_gt and len(tp):
        result.ap = voc_ap(result.recall, result.precision)
    return result


# --------------------------------------------------------------------------- whole pipeline


@dataclass
class Detections:
    """Boxes of one latent on one image, and the heatmap's mean (the released `mean_act`)."""

    boxes: np.ndarray
    scores: np.ndarray
    mean_activation: float
    pointing_hit: bool | None = None  # strongest cell on a GT box; None: image without GT


@dataclass
class LocalizationResult:
    """`table`: one row per latent (Table 2); `detections[i][j]`: image i, latent j.

    `baselines` (see `localize`): `classifier_map` (a row like a latent's, for the classifier's
    own activation map; its boxes per image in `classifier_detections`), `chance` and `oracle`.
    """

    table: pd.DataFrame
    latents: list[int]
    image_indices: list[int]
    image_ids: list[str]
    gt_boxes: list[np.ndarray]
    detections: list[list[Detections]]
    settings: dict[str, Any]
    baselines: dict[str, Any] = field(default_factory=dict)
    classifier_detections: list[Detections] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "settings": self.settings,
            "latents": self.table.to_dict(orient="records"),
            "baselines": self.baselines,
        }

    def detections_json(self) -> dict[str, Any]:
        """Per image and latent: GT boxes, predicted boxes, scores and mean activation."""
        images = {}
        for k, (image_id, gt, dets) in enumerate(
            zip(self.image_ids, self.gt_boxes, self.detections, strict=True)
        ):
            entry: dict[str, Any] = {
                "gt_boxes": gt.tolist(),
                "latents": {
                    str(lat): _detection_json(d) for lat, d in zip(self.latents, dets, strict=True)
                },
            }
            if self.classifier_detections is not None:
                entry["classifier_map"] = _detection_json(self.classifier_detections[k])
            images[image_id] = entry
        return {"schema_version": SCHEMA_VERSION, "images": images}


def _detection_json(d: Detections) -> dict[str, Any]:
    return {
        "pred_boxes": d.boxes.tolist(),
        "scores": d.scores.tolist(),
        "mean_act": d.mean_activation,
        "pointing_hit": d.pointing_hit,
    }


def unique_boxes(boxes: Sequence[Any]) -> np.ndarray:
    """(m, 4) array of the distinct boxes (row-level data repeats an image's boxes)."""
    rows = sorted({(float(b.x0), float(b.y0), float(b.x1), float(b.y1)) for b in boxes})
    return np.asarray(rows, dtype=np.float64).reshape(-1, 4)


def select_images(
    store: PatchStore, concept: str, split: str | None = "test", image_set: ImageSet = "positive"
) -> tuple[list[int], list[Any]]:
    """Store image indices (and their records) to evaluate: `summaries.labelled_rows`'s images of
    the split (one entry per image, skipped ones left out; split None or "all": every split) with
    label 1 for the concept (`positive`), or all of them (`all`)."""
    from .summaries import labelled_rows

    if image_set not in ("positive", "all"):
        raise MammoSaeError(f"unknown image set {image_set!r}; valid: positive, all")
    level = store.manifest.get("level", "image")
    rows, y = labelled_rows(store.images, concept, split=split, store_level=level)
    chosen = [int(i) for i, label in zip(rows, y) if image_set == "all" or label == 1]
    if not chosen:
        what = f"images with {concept} = 1" if image_set == "positive" else "images"
        where = f"split {split!r}" if split not in (None, "", "all") else "the store"
        raise DataError(f"no {what} in {where}")
    records = store.records()
    return chosen, [records[i] for i in chosen]


def image_detections(
    maps_lhw: np.ndarray,
    frame_hw: tuple[int, int],
    centres: tuple[np.ndarray, np.ndarray] | None,
    gt_m4: np.ndarray,
    rule: BoxRule,
) -> list[Detections]:
    """Boxes (and pointing-game hit) of each latent's map on one image."""
    on_box = _cells_on_boxes(maps_lhw.shape[-2:], frame_hw, centres, gt_m4) if len(gt_m4) else None
    out = []
    for map_hw in maps_lhw:
        hit = (
            None
            if on_box is None
            else bool(map_hw.max() > 0 and on_box.reshape(-1)[int(np.argmax(map_hw))])
        )
        if not (map_hw > 0).any():  # never fires on this image: no region, mean 0
            out.append(Detections(np.zeros((0, 4)), np.zeros(0), 0.0, hit))
            continue
        heat, boxes, scores = map_boxes(map_hw, frame_hw, centres, rule)
        out.append(Detections(boxes, scores, float(heat.mean()), hit))
    return out


def _detect(
    store: PatchStore,
    encoder: LatentEncoder,
    latents: Sequence[int],
    indices: Sequence[int],
    records: Sequence[Any],
    gt_boxes: Sequence[np.ndarray],
    rule: BoxRule,
    *,
    align: str,
    batch_rows: int,
    progress: bool,
    desc: str,
) -> list[list[Detections]]:
    """Heatmap → threshold → boxes of each map (latent, or the head's one) on each image."""
    from tqdm.auto import tqdm

    from .maps import heatmap_centres, iter_latent_maps

    detections: list[list[Detections]] = []
    maps_iter = iter_latent_maps(store, encoder, latents, indices, batch_rows=batch_rows)
    for rec, gt, maps_lhw in tqdm(
        zip(records, gt_boxes, maps_iter, strict=True),
        total=len(records),
        disable=not progress,
        desc=desc,
        unit="img",
    ):
        centres = heatmap_centres(store, rec.frame_hw, maps_lhw.shape[-2:], align)
        detections.append(image_detections(maps_lhw, rec.frame_hw, centres, gt, rule))
    return detections


REPORTED_IOUS = (0.1, 0.25, 0.5)


def _ap_row(
    dets: Sequence[Detections], gt_boxes: Sequence[np.ndarray], iou_threshold: float, match: Match
) -> dict[str, Any]:
    """One Table-2 row's numbers for one detector's boxes on every evaluated image: AP at the
    chosen IoU (`ap`) and at each of `REPORTED_IOUS`, and the pointing-game accuracy over the
    images with a GT box."""
    preds = [(d.boxes, d.scores) for d in dets]
    res = average_precision(preds, gt_boxes, iou_threshold, match)
    f1, p, r = res.best_f1()
    hits = [d.pointing_hit for d in dets if d.pointing_hit is not None]
    row = {
        "ap": res.ap,
        "n_images": res.n_images,
        "n_pred": res.n_pred,
        "n_gt": res.n_gt,
        "n_tp": res.n_tp,
        "best_f1": f1,
        "precision_at_best_f1": p,
        "recall_at_best_f1": r,
        "images_with_boxes": sum(len(d.boxes) > 0 for d in dets),
        "mean_activation": float(np.mean([d.mean_activation for d in dets])),
    }
    for iou in REPORTED_IOUS:
        row[f"ap_iou_{iou:g}"] = (
            res.ap if iou == iou_threshold else average_precision(preds, gt_boxes, iou, match).ap
        )
    row["pointing"] = float(np.mean(hits)) if hits else math.nan
    return row


# --------------------------------------------------------------------------- baselines


def oracle_boxes(gt_m4: np.ndarray, size_hw: tuple[float, float]) -> np.ndarray:
    """One box of `size_hw` (height, width) centred on each ground-truth box."""
    gt = np.asarray(gt_m4, dtype=np.float64).reshape(-1, 4)
    cy, cx = (gt[:, 1] + gt[:, 3]) / 2, (gt[:, 0] + gt[:, 2]) / 2
    h, w = float(size_hw[0]), float(size_hw[1])
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)


def chance_boxes(gt_m4: np.ndarray, region_hw: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each ground-truth box, a box of its size centred on a uniformly drawn pixel of
    `region_hw` (the breast; the whole frame when it is empty), shifted into the frame."""
    gt = np.asarray(gt_m4, dtype=np.float64).reshape(-1, 4)
    H, W = region_hw.shape
    ys, xs = np.nonzero(region_hw)
    if len(ys) == 0:
        ys, xs = np.divmod(np.arange(H * W), W)
    pick = rng.integers(0, len(ys), size=len(gt))
    w, h = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
    x0 = np.clip(xs[pick] + 0.5 - w / 2, 0, np.maximum(W - w, 0))
    y0 = np.clip(ys[pick] + 0.5 - h / 2, 0, np.maximum(H - h, 0))
    return np.stack([x0, y0, x0 + w, y0 + h], axis=1)


def _breast_region(rec: Any) -> np.ndarray | None:
    """The breast mask of a record's image in its frame; None when the file cannot be read."""
    from ..data.images import breast_mask
    from .figures import display_image

    try:
        image = display_image(rec.path, rec.frame_hw)
    except (MammoSaeError, OSError):
        return None
    return None if image is None else breast_mask(image)


def chance_ap(
    records: Sequence[Any],
    gt_boxes: Sequence[np.ndarray],
    iou_threshold: float,
    match: Match,
    *,
    draws: int,
    seed: int = 0,
) -> dict[str, Any]:
    """AP of random boxes of the findings' sizes inside the breast (random scores), averaged
    over `draws` draws: where a latent's AP would sit by luck."""
    regions = [_breast_region(r) for r in records]
    n_frame = sum(m is None for m in regions)
    regions = [
        np.ones(tuple(r.frame_hw), dtype=bool) if m is None else m
        for r, m in zip(records, regions, strict=True)
    ]
    rng = np.random.default_rng(seed)
    aps = []
    for _ in range(draws):
        preds = []
        for gt, region in zip(gt_boxes, regions, strict=True):
            boxes = chance_boxes(gt, region, rng)
            preds.append((boxes, rng.random(len(boxes))))
        aps.append(average_precision(preds, gt_boxes, iou_threshold, match).ap)
    return {
        "ap": float(np.mean(aps)) if aps else math.nan,
        "ap_std": float(np.std(aps)) if aps else math.nan,
        "draws": draws,
        "seed": seed,
        "region": "breast"
        if n_frame == 0
        else f"breast (whole frame for {n_frame} image(s) without a readable file)",
    }


def oracle_ap(
    detections: Sequence[Sequence[Detections]],
    gt_boxes: Sequence[np.ndarray],
    iou_threshold: float,
    match: Match,
) -> dict[str, Any]:
    """AP of one box per finding centred on its truth with the median size of the predicted
    boxes: the best a detector whose boxes have that size can do (1.0 only if the size fits)."""
    sizes = np.asarray(
        [[b[3] - b[1], b[2] - b[0]] for dets in detections for d in dets for b in d.boxes],
        dtype=np.float64,
    ).reshape(-1, 2)
    if not len(sizes):
        return {"ap": math.nan, "box_hw": None, "note": "no predicted boxes"}
    size = (float(np.median(sizes[:, 0])), float(np.median(sizes[:, 1])))
    preds = [(oracle_boxes(gt, size), np.ones(len(gt))) for gt in gt_boxes]
    return {"ap": average_precision(preds, gt_boxes, iou_threshold, match).ap, "box_hw": list(size)}


def localize(
    store: PatchStore,
    sae: LatentEncoder,
    concept: str,
    latents: Sequence[int],
    *,
    threshold: str | ThresholdRule = DEFAULT_THRESHOLD,
    iou_threshold: float = 0.25,
    split: str | None = "test",
    image_set: ImageSet = "positive",
    box_score: BoxScore = "mean",
    min_box_area: float = 10,
    match: Match = "voc",
    align: str = "receptive-field",
    threshold_on: ThresholdOn = "frame",
    upsample: str = "bilinear",
    min_mass: float = 0.0,
    head: Any = None,
    chance_draws: int = 0,
    seed: int = 0,
    batch_rows: int = 8192,
    progress: bool = True,
) -> LocalizationResult:
    """Localisation AP of each latent for a concept (the paper's Table 2 row; see module doc).

    `store` is an `ActivationStore` (full patch grids), `sae` anything with `encode(x_nd)`.
    `align` places each cell's value at its receptive-field centre (default) or evenly over
    the frame (`even`, the released code); `threshold`, `threshold_on`, `upsample`,
    `min_mass`, `min_box_area` and `box_score` make the `BoxRule`. Heatmaps are computed image by image and dropped
    after boxing, so memory stays at one image's upsampled maps.

    Baselines (in `.baselines`): `oracle` always; `classifier_map` when `head` (anything with
    `w_d`, e.g. `intervene.LinearHead`) is given: its per-cell w · f map through the same
    pipeline; `chance` when `chance_draws` > 0 (mean AP over that many draws, seeded).
    """
    from .maps import ALIGNMENTS, LinearMap

    rule = BoxRule(
        parse_threshold(threshold), threshold_on, upsample, min_mass, min_box_area, box_score
    )
    if align not in ALIGNMENTS:
        raise MammoSaeError(f"unknown cell alignment {align!r}; valid: {', '.join(ALIGNMENTS)}")
    latents = [int(j) for j in latents]
    if not latents:
        raise MammoSaeError("no latents to localise; give a ranking or latent indices")
    indices, records = select_images(store, concept, split, image_set)
    gt_boxes = [unique_boxes(r.boxes_of(concept)) for r in records]
    common = dict(align=align, batch_rows=batch_rows, progress=progress)
    detections = _detect(
        store, sae, latents, indices, records, gt_boxes, rule, desc=f"localise {concept}", **common
    )
    rows = [
        {
            "rank": j + 1,
            "latent": latent,
            **_ap_row([d[j] for d in detections], gt_boxes, iou_threshold, match),
        }
        for j, latent in enumerate(latents)
    ]
    baselines: dict[str, Any] = {"oracle": oracle_ap(detections, gt_boxes, iou_threshold, match)}
    classifier_detections = None
    if head is not None:
        cam = _detect(
            store,
            LinearMap(head.w_d),
            [0],
            indices,
            records,
            gt_boxes,
            rule,
            desc="classifier map",
            **common,
        )
        classifier_detections = [d[0] for d in cam]
        baselines["classifier_map"] = _ap_row(classifier_detections, gt_boxes, iou_threshold, match)
    if chance_draws > 0:
        baselines["chance"] = chance_ap(
            records, gt_boxes, iou_threshold, match, draws=chance_draws, seed=seed
        )
    settings = LocalizationSettings(
        concept=concept,
        **rule.settings(),
        iou_threshold=iou_threshold,
        split=split,
        image_set=image_set,
        match=match,
        ap="voc-all-point",
        align=align,
        n_images=len(indices),
        n_gt=int(sum(len(g) for g in gt_boxes)),
    ).to_json()
    return LocalizationResult(
        table=pd.DataFrame(rows),
        latents=latents,
        image_indices=indices,
        image_ids=[r.image_id for r in records],
        gt_boxes=gt_boxes,
        detections=detections,
        settings=settings,
        baselines=baselines,
        classifier_detections=classifier_detections,
    )


BASELINES = ("chance", "classifier_map", "oracle")


def table2(results: Mapping[str, LocalizationResult]) -> pd.DataFrame:
    """The paper's Table 2 layout: one row per setting (e.g. "Mass finetuned"), AP per rank in
    columns `rank_1 … rank_k`, the latents behind the ranks in `latents` (comma separated),
    then the AP of each baseline the result holds (`chance`, `classifier_map`, `oracle`)."""
    rows = []
    for setting, res in results.items():
        row: dict[str, Any] = {"setting": setting}
        row.update(
            {f"rank_{int(r)}": float(ap) for r, ap in zip(res.table["rank"], res.table["ap"])}
        )
        row["latents"] = ",".join(str(int(j)) for j in res.table["latent"])
        row.update({name: res.baselines[name]["ap"] for name in BASELINES if name in res.baselines})
        rows.append(row)
    return pd.DataFrame(rows)


def save_figure_grid(
    store: PatchStore,
    sae: LatentEncoder,
    result: LocalizationResult,
    path: Any,
    *,
    n_images: int = 4,
    head: Any = None,
    label: str | None = None,
    batch_rows: int = 8192,
) -> Any:
    """Figure 3: rows = the classifier's own map (when `head` is given and the result holds its
    boxes), then the result's latents (rank order); columns = up to `n_images` evaluated images
    (those with GT boxes first, in store order; the top row names them). Each panel says
    whether one of its boxes hits a GT box (the AP's own matching); heatmaps are recomputed
    for these images only, with the result's threshold and alignment."""
    from .figures import LatentPanel, display_image, panel_title, save_panel_grid
    from .maps import LinearMap, heatmap_centres, iter_latent_maps, upsample

    if n_images < 1:
        raise MammoSaeError(f"need at least one image for the figure, got {n_images}")
    s = result.settings
    align = s.get("align", "even")  # results from before the setting existed used `even`
    mode = BoxRule.from_settings(s).upsample
    with_cam = head is not None and result.classifier_detections is not None
    order = sorted(range(len(result.image_indices)), key=lambda k: len(result.gt_boxes[k]) == 0)
    chosen = order[:n_images]
    indices = [result.image_indices[k] for k in chosen]
    records = list(store.records())
    cams = (
        iter_latent_maps(store, LinearMap(head.w_d), [0], indices, batch_rows=batch_rows)
        if with_cam
        else iter([None] * len(chosen))
    )
    columns: list[list[LatentPanel]] = []
    maps_iter = iter_latent_maps(store, sae, result.latents, indices, batch_rows=batch_rows)
    for k, maps_lhw, cam in zip(chosen, maps_iter, cams, strict=True):
        rec = records[result.image_indices[k]]
        image = display_image(rec.path, rec.frame_hw)
        centres = heatmap_centres(store, rec.frame_hw, maps_lhw.shape[-2:], align)
        gt = result.gt_boxes[k]
        named = [
            (f"latent {lat}", upsample(m, rec.frame_hw, centres, mode), det)
            for lat, m, det in zip(result.latents, maps_lhw, result.detections[k], strict=True)
        ]
        if cam is not None and result.classifier_detections is not None:
            named.insert(
                0,
                (
                    "classifier map",
                    upsample(cam[0], rec.frame_hw, centres, mode),
                    result.classifier_detections[k],
                ),
            )
        column = []
        for j, (name, heat, det) in enumerate(named):
            hits = match_image(det.boxes, det.scores, gt, s["iou_threshold"], s.get("match", "voc"))
            title = panel_title(
                name,
                det.mean_activation,
                result.image_ids[k] if j == 0 else None,
                hit=bool(hits.any()) if len(gt) else None,
            )
            column.append(LatentPanel(image, heat, gt, det.boxes, title, hits=hits))
        columns.append(column)
    rows = [[col[j] for col in columns] for j in range(len(columns[0]))] if columns else []
    title = (
        f"{label or s['concept']}: {s['concept']}, threshold {s['threshold']}, "
        f"IoU {s['iou_threshold']:g}"
    )
    return save_panel_grid(rows, path, suptitle=title)


def _cell_spans(
    centres: np.ndarray | None, n_cells: int, frame_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-edge extent [lo, hi) of each cell along one axis: a stride-wide window around the
    pixel where its value sits (`centres`; None = cells laid evenly over the frame)."""
    from .maps import cell_centres

    c = cell_centres(n_cells, frame_len) if centres is None else np.asarray(centres, float)
    step = float(np.mean(np.diff(c))) if n_cells > 1 else float(frame_len)
    return c + 0.5 - step / 2, c + 0.5 + step / 2


def _cells_on_boxes(
    grid_hw: tuple[int, ...],
    frame_hw: tuple[int, int],
    centres: tuple[np.ndarray, np.ndarray] | None,
    gt_m4: np.ndarray,
) -> np.ndarray:
    """(gh, gw) cells whose stride-wide window (around where `upsample` puts the cell's value)
    overlaps any of the boxes: where a pointing-game hit may land."""
    gh, gw = int(grid_hw[0]), int(grid_hw[1])
    y0, y1 = _cell_spans(None if centres is None else centres[0], gh, int(frame_hw[0]))
    x0, x1 = _cell_spans(None if centres is None else centres[1], gw, int(frame_hw[1]))
    on_box = np.zeros((gh, gw), dtype=bool)
    for b in np.asarray(gt_m4, dtype=np.float64).reshape(-1, 4):
        on_box |= ((y0 < b[3]) & (y1 > b[1]))[:, None] & ((x0 < b[2]) & (x1 > b[0]))[None, :]
    return on_box


def pointing_scores(
    store: PatchStore,
    sae: SAELike,
    concept: str,
    *,
    split: str | None = "training",
    latents: Sequence[int] | None = None,
    align: str = "receptive-field",
    batch_rows: int = 8192,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Pointing game per latent: the share of the split's positive images where the latent's
    strongest cell overlaps a ground-truth box of `concept` (an image where it never fires is a
    miss). A cell is the stride-wide window around its receptive-field centre (`align`, as in
    `localize`). Returns (latent indices, scores, number of images). Meant for a split other
    than the one Table 2 is measured on, so that choosing latents by it does not peek at the
    test boxes."""
    from tqdm.auto import tqdm

    from .maps import heatmap_centres, iter_latent_maps

    lat = np.arange(int(sae.h)) if latents is None else np.asarray(list(latents), dtype=np.int64)
    indices, records = select_images(store, concept, split, "positive")
    hits = np.zeros(len(lat), dtype=np.int64)
    maps = iter_latent_maps(store, sae, lat, indices, batch_rows=batch_rows)
    for rec, maps_lhw in tqdm(
        zip(records, maps),
        total=len(records),
        disable=not progress,
        desc=f"pointing {concept}",
        unit="img",
    ):
        n_lat = maps_lhw.shape[0]
        centres = heatmap_centres(store, rec.frame_hw, maps_lhw.shape[-2:], align)
        on_box = _cells_on_boxes(
            maps_lhw.shape[-2:], rec.frame_hw, centres, unique_boxes(rec.boxes_of(concept))
        )
        flat = maps_lhw.reshape(n_lat, -1)
        best = flat.argmax(axis=1)
        hits += on_box.reshape(-1)[best] & (flat.max(axis=1) > 0)
    return lat, hits / max(len(records), 1), len(records)


__all__ = [
    "APResult",
    "BASELINES",
    "BoxRule",
    "Detections",
    "REPORTED_IOUS",
    "THRESHOLD_ON",
    "LocalizationResult",
    "ThresholdRule",
    "average_precision",
    "box_areas",
    "box_iou",
    "chance_ap",
    "chance_boxes",
    "coco_ap101",
    "heatmap_boxes",
    "image_detections",
    "localize",
    "map_boxes",
    "mask_to_boxes",
    "match_image",
    "oracle_ap",
    "oracle_boxes",
    "parse_threshold",
    "pointing_scores",
    "save_figure_grid",
    "score_boxes",
    "select_images",
    "table2",
    "threshold_mask",
    "unique_boxes",
    "voc_ap",
]
