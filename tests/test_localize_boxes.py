"""Thresholds, boxes (vs OpenCV external contours), box scores and bilinear upsampling."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from scipy import ndimage

from mammo_sae.analysis.localize import (
    heatmap_boxes,
    mask_to_boxes,
    parse_threshold,
    score_boxes,
    threshold_mask,
)
from mammo_sae.analysis.maps import cell_centres, upsample
from mammo_sae.errors import MammoSaeError


def test_parse_threshold_specs() -> None:
    assert parse_threshold("p95").spec == "p95"
    assert parse_threshold("P99.5").value == 99.5
    rule = parse_threshold("relmax:0.3")
    assert (rule.kind, rule.value) == ("relmax", 0.3)
    assert parse_threshold("abs:1e-2").value == 0.01
    for bad in ("95", "p100", "relmax:1.5", "relmax:", "max:0.3", "pxx"):
        with pytest.raises(MammoSaeError, match="threshold"):
            parse_threshold(bad)


def test_threshold_rules_select_the_expected_pixels() -> None:
    heat = np.arange(100, dtype=np.float32).reshape(10, 10)
    assert threshold_mask(heat, "p95").sum() == 5  # values 95..99 >= 94.05
    assert threshold_mask(heat, "relmax:0.3").sum() == 70  # values > 29.7
    assert threshold_mask(heat, "abs:89.5").sum() == 10
    # Ties: relmax is strict (released code), percentile keeps a plateau at the cutoff.
    plateau = np.zeros((10, 10))
    plateau[:, :4] = 1.0  # 40 % of the map at the max
    assert threshold_mask(plateau, "p95").sum() == 40
    assert threshold_mask(plateau, "relmax:0.3").sum() == 40
    assert threshold_mask(np.ones((3, 3)), "relmax:0.99").all()
    # A latent that never fires has no region, whatever the rule.
    assert not threshold_mask(np.zeros((4, 4)), "p95").any()
    assert not threshold_mask(-np.ones((4, 4)), "relmax:0.3").any()
    with pytest.raises(MammoSaeError, match="NaN"):
        threshold_mask(np.full((2, 2), np.nan), "p95")


def _opencv_boxes(mask: np.ndarray, min_area: float) -> list[tuple[float, ...]]:
    """The released code's rule: external contours → boundingRect → [x, y, x+w, y+h], w·h ≥ 10."""
    contours, _ = cv2.findContours(
        mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    out = []
    for c in contours:
        x, y, w, h = cv2.boundingRect(c)
        if w * h >= min_area:
            out.append((float(x), float(y), float(x + w), float(y + h)))
    return sorted(out, key=lambda b: (b[1], b[0], b[2], b[3]))


@pytest.mark.parametrize("seed", range(6))
def test_boxes_equal_opencv_external_contours(seed: int) -> None:
    rng = np.random.default_rng(seed)
    # Smoothed noise gives blobs with holes, nested islands and diagonal touches.
    noise = ndimage.gaussian_filter(rng.random((60, 45)), sigma=rng.uniform(0.8, 2.5))
    mask = noise > np.quantile(noise, rng.uniform(0.5, 0.9))
    ring = np.zeros((20, 20), bool)
    ring[3:17, 3:17] = True
    ring[6:14, 6:14] = False
    ring[9:11, 9:11] = True  # an island inside the hole: OpenCV's RETR_EXTERNAL drops it
    mask[:20, :20] = ring
    for min_area in (0, 10):
        ours = [tuple(float(v) for v in b) for b in mask_to_boxes(mask, min_area)]
        assert ours == _opencv_boxes(mask, min_area)


def test_box_ends_are_exclusive_and_tiny_boxes_are_dropped() -> None:
    mask = np.zeros((20, 20), bool)
    mask[2:5, 3:7] = True  # 4 wide x 3 high = 12 px → kept
    mask[10:13, 10:13] = True  # 3 x 3 = 9 px → dropped at min_area 10
    np.testing.assert_array_equal(mask_to_boxes(mask, 10), [[3, 2, 7, 5]])
    assert len(mask_to_boxes(mask, 0)) == 2
    assert mask_to_boxes(np.zeros((5, 5), bool)).shape == (0, 4)


def test_box_scores_mean_and_max() -> None:
    heat = np.zeros((10, 10))
    heat[2:4, 2:4] = [[1, 2], [3, 6]]
    box = np.array([[2, 2, 4, 4]])
    assert score_boxes(heat, box, "mean") == pytest.approx([3.0])
    assert score_boxes(heat, box, "max") == pytest.approx([6.0])
    boxes, scores = heatmap_boxes(heat, "relmax:0.1", min_area=1)
    np.testing.assert_array_equal(boxes, box)
    assert scores == pytest.approx([3.0])
    with pytest.raises(MammoSaeError, match="box score"):
        score_boxes(heat, box, "median")  # type: ignore[arg-type]


def _bilinear_reference(map_hw: np.ndarray, frame_hw: tuple[int, int]) -> np.ndarray:
    """Separable linear interpolation between cell centres, constant beyond the outer ones."""
    (h, w), (H, W) = map_hw.shape, frame_hw
    rows = np.stack(
        [np.interp(np.arange(H), cell_centres(h, H), map_hw[:, j]) for j in range(w)], 1
    )
    return np.stack([np.interp(np.arange(W), cell_centres(w, W), rows[i]) for i in range(H)], 0)


def test_upsample_is_bilinear_align_corners_false() -> None:
    rng = np.random.default_rng(0)
    map_hw = rng.random((6, 4)).astype(np.float32)
    up = upsample(map_hw, (96, 64))
    assert up.shape == (96, 64)
    np.testing.assert_allclose(up, _bilinear_reference(map_hw, (96, 64)), atol=1e-5)
    # Batched maps give the same as one at a time; matches torch's interpolate directly.
    maps = rng.random((3, 6, 4)).astype(np.float32)
    np.testing.assert_allclose(upsample(maps, (96, 64))[1], upsample(maps[1], (96, 64)))
    torch_up = torch.nn.functional.interpolate(
        torch.from_numpy(map_hw)[None, None], size=(96, 64), mode="bilinear", align_corners=False
    )[0, 0].numpy()
    np.testing.assert_array_equal(up, torch_up)


def test_cell_centres_offset_on_the_vindr_frame() -> None:
    # 48 rows onto 1520 px: cell i's value sits at (i + .5)·1520/48 − .5 ≈ 31.67 i + 15.3,
    # versus the receptive-field centre 32 i + 7 (B5): up to ≈ 8 px apart.
    centres = cell_centres(48, 1520)
    assert centres[0] == pytest.approx(15.333, abs=1e-3)
    offset = np.abs(centres - (32 * np.arange(48) + 7))
    assert 7.5 < offset.max() < 8.5


def test_upsample_rejects_bad_shapes() -> None:
    with pytest.raises(MammoSaeError, match="shape"):
        upsample(np.zeros(5), (10, 10))
    with pytest.raises(MammoSaeError, match="frame"):
        upsample(np.zeros((2, 2)), (0, 10))


@pytest.mark.parametrize("seed", range(4))
def test_fill_holes_equals_scipy(seed: int) -> None:
    from mammo_sae.analysis.localize import _fill_holes

    rng = np.random.default_rng(seed)
    mask = ndimage.gaussian_filter(rng.random((40, 30)), 1.2) > 0.5
    np.testing.assert_array_equal(_fill_holes(mask), ndimage.binary_fill_holes(mask))
