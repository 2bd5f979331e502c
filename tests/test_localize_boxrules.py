"""Box rules (issue 17): threshold on the frame or the native grid, nearest vs bilinear
upsampling, minimum region mass; by-construction cases on an 8x5 grid at 256x160."""

from __future__ import annotations

import numpy as np
import pytest

from mammo_sae.analysis.localize import (
    BoxRule,
    average_precision,
    image_detections,
    map_boxes,
    parse_threshold,
)
from mammo_sae.analysis.maps import upsample
from mammo_sae.errors import MammoSaeError

GRID, FRAME, CELL = (8, 5), (256, 160), 32

RULES = [
    BoxRule(parse_threshold("p95")),  # the paper
    BoxRule(parse_threshold("p99")),
    BoxRule(parse_threshold("relmax:0.5")),
    BoxRule(parse_threshold("relmax:0.5"), upsample="nearest"),
    BoxRule(parse_threshold("p90"), upsample="nearest"),
    BoxRule(parse_threshold("relmax:0.5"), threshold_on="grid"),
    BoxRule(parse_threshold("p90"), threshold_on="grid"),
    BoxRule(parse_threshold("relmax:0.3"), min_mass=0.3),
    BoxRule(parse_threshold("relmax:0.5"), threshold_on="grid", min_mass=0.3, upsample="nearest"),
]


def _blob_map(r: int, c: int, value: float = 1.0, size: int = 2) -> np.ndarray:
    m = np.zeros(GRID, np.float32)
    m[r : r + size, c : c + size] = value
    return m


def _cell_box(r: int, c: int, size: int = 2) -> np.ndarray:
    return np.array([[c * CELL, r * CELL, (c + size) * CELL, (r + size) * CELL]], float)


@pytest.mark.parametrize("rule", RULES, ids=lambda r: "-".join(map(str, r.settings().values())))
def test_a_blob_exactly_on_the_box_scores_ap_one_under_every_rule(rule: BoxRule) -> None:
    cells = [(1, 1), (4, 2), (2, 3), (5, 0)]
    maps = [_blob_map(r, c, 1.0 + k) for k, (r, c) in enumerate(cells)]
    gts = [_cell_box(r, c) for r, c in cells]
    preds = []
    for m, gt in zip(maps, gts, strict=True):
        (det,) = image_detections(m[None], FRAME, None, gt, rule)
        assert det.pointing_hit is True and len(det.boxes) == 1
        preds.append((det.boxes, det.scores))
    for iou in (0.1, 0.25):
        assert average_precision(preds, gts, iou).ap == pytest.approx(1.0)


@pytest.mark.parametrize(
    "rule",
    [
        BoxRule(parse_threshold("relmax:0.5"), upsample="nearest"),
        BoxRule(parse_threshold("relmax:0.5"), threshold_on="grid"),
        BoxRule(parse_threshold("p50"), threshold_on="grid"),
    ],
)
def test_whole_cell_rules_reproduce_the_box_exactly(rule: BoxRule) -> None:
    _, boxes, _ = map_boxes(_blob_map(1, 1), FRAME, None, rule)
    np.testing.assert_array_equal(boxes, _cell_box(1, 1))


def test_nearest_keeps_whole_cells_where_bilinear_shrinks_the_box() -> None:
    rule = BoxRule(parse_threshold("relmax:0.8"))
    nearest = BoxRule(rule.threshold, upsample="nearest")
    _, near, _ = map_boxes(_blob_map(1, 1), FRAME, None, nearest)
    _, bil, _ = map_boxes(_blob_map(1, 1), FRAME, None, rule)
    np.testing.assert_array_equal(near, _cell_box(1, 1))
    # Bilinear falls from 1 to 0 over the 32 px from an edge cell's centre (47.5) to the next
    # (15.5): > 0.8 only within 6.4 px outside the edge centres, i.e. pixels 42..85.
    assert len(bil) == 1
    np.testing.assert_array_equal(bil, [[42, 42, 86, 86]])


def test_nearest_is_piecewise_constant_and_bilinear_interpolates() -> None:
    m = np.zeros(GRID, np.float32)
    m[3, 2] = 1.0
    near = upsample(m, FRAME, mode="nearest")
    bil = upsample(m, FRAME, mode="bilinear")
    assert set(np.unique(near)) == {0.0, 1.0}
    np.testing.assert_array_equal(near[96:128, 64:96], 1.0)  # exactly the cell
    assert near.sum() == CELL * CELL
    assert len(np.unique(bil)) > 10 and 0 < bil[100, 60] < 1 and bil[111, 79] == bil.max()
    # With receptive-field centres, nearest switches halfway between neighbouring centres.
    centres = (np.arange(8) * 32.0 + 10, np.arange(5) * 32.0 + 10)
    near_rf = upsample(m, FRAME, centres, mode="nearest")
    rows = np.flatnonzero(near_rf[:, 80])
    cols = np.flatnonzero(near_rf[110])
    assert (rows[0], rows[-1], cols[0], cols[-1]) == (91, 122, 59, 90)
    with pytest.raises(MammoSaeError, match="upsampling"):
        upsample(m, FRAME, mode="bicubic")


def test_grid_boxes_span_the_cells_windows_around_their_centres() -> None:
    centres = (np.arange(8) * 32.0 + 10, np.arange(5) * 32.0 + 10)
    _, boxes, _ = map_boxes(
        _blob_map(0, 1), FRAME, centres, BoxRule(parse_threshold("relmax:0.5"), threshold_on="grid")
    )
    # Windows [c + 0.5 - 16, c + 0.5 + 16): shifted 5.5 px up-left, clipped at the frame.
    np.testing.assert_array_equal(boxes, [[27, 0, 91, 59]])


def test_min_mass_drops_a_weak_speck_but_keeps_the_blob() -> None:
    m = _blob_map(1, 1, 1.0)
    m[6, 4] = 0.9  # a single strong-enough but small cell
    rule = BoxRule(parse_threshold("relmax:0.3"), upsample="nearest")
    _, both, _ = map_boxes(m, FRAME, None, rule)
    assert len(both) == 2
    for on in ("frame", "grid"):
        strict = BoxRule(parse_threshold("relmax:0.3"), on, "nearest", min_mass=0.3)
        _, kept, _ = map_boxes(m, FRAME, None, strict)
        np.testing.assert_array_equal(kept, _cell_box(1, 1))


def test_box_rule_validation_and_settings_round_trip() -> None:
    rule = BoxRule(parse_threshold("relmax:0.4"), "grid", "nearest", 0.2, 16, "max")
    assert rule.settings() == {
        "threshold": "relmax:0.4",
        "threshold_on": "grid",
        "upsample": "nearest",
        "min_mass": 0.2,
        "min_box_area": 16,
        "box_score": "max",
    }
    assert BoxRule.from_settings(rule.settings()) == rule
    old = BoxRule.from_settings({"threshold": "p99", "min_box_area": 10, "box_score": "mean"})
    assert old == BoxRule(parse_threshold("p99"))  # files from before the rules
    with pytest.raises(MammoSaeError, match="threshold target"):
        BoxRule(threshold_on="cells")  # type: ignore[arg-type]
    with pytest.raises(MammoSaeError, match="upsampling"):
        BoxRule(upsample="cubic")
    with pytest.raises(MammoSaeError, match="min mass"):
        BoxRule(min_mass=1.0)


def test_a_map_that_never_fires_has_no_box_and_misses_the_pointing_game() -> None:
    (det,) = image_detections(
        np.zeros((1, *GRID), np.float32), FRAME, None, _cell_box(1, 1), BoxRule()
    )
    assert len(det.boxes) == 0 and det.pointing_hit is False
    (det,) = image_detections(_blob_map(1, 1)[None], FRAME, None, np.zeros((0, 4)), BoxRule())
    assert det.pointing_hit is None  # no GT: not counted
