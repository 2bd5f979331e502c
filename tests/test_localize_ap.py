"""Dataset-level AP@IoU: hand-computed cases, properties, and a cross-check against pycocotools."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mammo_sae.analysis.localize import (
    average_precision,
    box_iou,
    coco_ap101,
    match_image,
    voc_ap,
)
from mammo_sae.errors import MammoSaeError

GT = np.array([[0, 0, 10, 10], [50, 50, 70, 70]], dtype=float)


def test_box_iou_hand_values() -> None:
    iou = box_iou([[0, 0, 10, 10]], [[5, 0, 15, 10], [0, 0, 10, 10], [20, 20, 30, 30]])
    np.testing.assert_allclose(iou, [[50 / 150, 1.0, 0.0]])


def test_hand_computed_ap_with_a_false_positive_between_hits() -> None:
    # Ranked: TP (0.9), FP (0.8), TP (0.7) against 2 GT boxes.
    # precision 1, 1/2, 2/3; recall 1/2, 1/2, 1 → envelope 1, 2/3, 2/3 → AP = .5·1 + .5·2/3.
    preds = [
        (np.array([[0, 0, 10, 10], [30, 30, 40, 40], [50, 50, 70, 70]]), np.array([0.9, 0.8, 0.7]))
    ]
    res = average_precision(preds, [GT], iou_threshold=0.25)
    assert res.ap == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert (res.n_pred, res.n_gt, res.n_tp) == (3, 2, 2)
    np.testing.assert_allclose(res.precision, [1, 0.5, 2 / 3])
    np.testing.assert_allclose(res.recall, [0.5, 0.5, 1.0])
    f1, p, r = res.best_f1()
    assert (f1, p, r) == pytest.approx((0.8, 2 / 3, 1.0))


def test_pooling_across_images_uses_one_ranking() -> None:
    # Image A: a hit at 0.5; image B: a miss at 0.9 → ranked FP, TP: precision 0, 1/2 → AP 0.5.
    preds = [(GT[:1], np.array([0.5])), (np.array([[0, 0, 3, 3]]), np.array([0.9]))]
    res = average_precision(preds, [GT[:1], GT[:1]], iou_threshold=0.25)
    assert res.n_gt == 2
    assert res.ap == pytest.approx(0.5 * 0.5)


def test_duplicate_detection_of_one_box_is_a_false_positive() -> None:
    preds = [(np.array([[0, 0, 10, 10], [0, 0, 10, 9]]), np.array([0.9, 0.8]))]
    res = average_precision(preds, [GT[:1]], iou_threshold=0.25)
    assert res.tp.tolist() == [True, False]
    assert res.ap == pytest.approx(1.0)


def test_iou_threshold_is_inclusive() -> None:
    # IoU exactly 0.25: a 10x10 GT and a 5x5 box inside it.
    pred = np.array([[0, 0, 5, 5]], dtype=float)
    assert box_iou(pred, GT[:1])[0, 0] == 0.25
    assert average_precision([(pred, np.ones(1))], [GT[:1]], 0.25).ap == 1.0
    assert average_precision([(pred, np.ones(1))], [GT[:1]], 0.26).ap == 0.0


def test_voc_and_coco_matching_differ_when_best_box_is_taken() -> None:
    # Two overlapping GTs; the second detection's best GT is already matched.
    gt = np.array([[0, 0, 10, 10], [4, 0, 14, 10]], dtype=float)
    pred = np.array([[0, 0, 10, 10], [1, 0, 11, 10]], dtype=float)
    scores = np.array([0.9, 0.8])
    assert match_image(pred, scores, gt, 0.25, "voc").tolist() == [True, False]
    assert match_image(pred, scores, gt, 0.25, "coco").tolist() == [True, True]


def test_edge_cases() -> None:
    empty = (np.zeros((0, 4)), np.zeros(0))
    assert average_precision([empty], [GT]).ap == 0.0  # no detections
    res = average_precision([(GT, np.ones(2))], [np.zeros((0, 4))])  # no GT at all
    assert (res.ap, res.n_gt, res.n_pred) == (0.0, 0, 2)
    assert average_precision([], []).n_images == 0
    with pytest.raises(MammoSaeError, match="scores"):
        average_precision([(GT, np.ones(3))], [GT])
    with pytest.raises(MammoSaeError, match="NaN"):
        average_precision([(GT, np.array([1.0, np.nan]))], [GT])
    with pytest.raises(MammoSaeError, match="shape"):
        average_precision([(np.ones((2, 3)), np.ones(2))], [GT])
    with pytest.raises(MammoSaeError, match="prediction sets"):
        average_precision([], [GT])
    with pytest.raises(MammoSaeError, match="IoU"):
        average_precision([(GT, np.ones(2))], [GT], iou_threshold=0.0)


def test_voc_ap_and_coco_ap101_differ_as_documented() -> None:
    # Precision 1 up to recall 0.5, nothing after: VOC integrates (0.5); COCO averages
    # 101 points, 51 of which (0, .01, ..., .5) have precision 1 → 51/101.
    assert voc_ap([0.5], [1.0]) == pytest.approx(0.5)
    assert coco_ap101([0.5], [1.0]) == pytest.approx(51 / 101)


# --------------------------------------------------------------------------- properties

coord = st.integers(0, 60)


@st.composite
def box(draw: st.DrawFn) -> list[float]:
    x0, y0 = draw(coord), draw(coord)
    return [x0, y0, x0 + draw(st.integers(1, 30)), y0 + draw(st.integers(1, 30))]


@st.composite
def case(draw: st.DrawFn) -> tuple[list, list]:
    n_img = draw(st.integers(1, 4))
    gts = [
        np.array(draw(st.lists(box(), max_size=3)), dtype=float).reshape(-1, 4)
        for _ in range(n_img)
    ]
    preds = []
    for _ in range(n_img):
        boxes = np.array(draw(st.lists(box(), max_size=5)), dtype=float).reshape(-1, 4)
        scores = np.array(
            draw(
                st.lists(
                    st.integers(0, 1000).map(lambda v: v / 1000),
                    min_size=len(boxes),
                    max_size=len(boxes),
                )
            )
        )
        preds.append((boxes, scores))
    return preds, gts


@settings(max_examples=60, deadline=None)
@given(case(), st.sampled_from(["voc", "coco"]))
def test_ap_is_a_probability(c: tuple[list, list], match: str) -> None:
    res = average_precision(*c, iou_threshold=0.25, match=match)  # type: ignore[arg-type]
    assert 0.0 <= res.ap <= 1.0
    assert res.n_tp <= min(res.n_pred, res.n_gt)


@settings(max_examples=40, deadline=None)
@given(case())
def test_perfect_detections_score_one(c: tuple[list, list]) -> None:
    _, gts = c
    gts = [np.unique(g, axis=0) for g in gts]
    if sum(len(g) for g in gts) == 0:
        return
    preds = [(g, np.random.default_rng(0).random(len(g))) for g in gts]
    assert average_precision(preds, gts, iou_threshold=0.25).ap == pytest.approx(1.0)


@settings(max_examples=40, deadline=None)
@given(case(), st.randoms(use_true_random=False))
def test_invariant_to_image_order_and_monotone_score_changes(c: tuple[list, list], rnd) -> None:
    preds, gts = c
    # Distinct scores so that tie-breaking cannot depend on image order.
    k = 0
    for _boxes, scores in preds:
        scores[:] = np.arange(k, k + len(scores))[::-1] / 100.0 + 0.001
        k += len(scores)
    base = average_precision(preds, gts).ap
    perm = list(range(len(gts)))
    rnd.shuffle(perm)
    assert average_precision([preds[i] for i in perm], [gts[i] for i in perm]).ap == pytest.approx(
        base
    )
    squashed = [(b, np.exp(3 * s) - 7) for b, s in preds]
    assert average_precision(squashed, gts).ap == pytest.approx(base)


@settings(max_examples=40, deadline=None)
@given(case())
def test_a_lowest_scored_false_positive_changes_nothing(c: tuple[list, list]) -> None:
    preds, gts = c
    base = average_precision(preds, gts).ap
    far = np.array([[500, 500, 510, 510]], dtype=float)
    boxes, scores = preds[0]
    preds[0] = (np.vstack([boxes, far]), np.append(scores, -1.0))
    assert average_precision(preds, gts).ap == pytest.approx(base)


# --------------------------------------------------------------------------- pycocotools


def _coco_ap(preds: list, gts: list, iou: float) -> float:
    """AP from pycocotools for one category at one IoU threshold (boxes as xywh)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def xywh(b: np.ndarray) -> list[float]:
        return [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]

    anns = [
        {
            "id": k + 1,
            "image_id": i + 1,
            "category_id": 1,
            "bbox": xywh(b),
            "area": float((b[2] - b[0]) * (b[3] - b[1])),
            "iscrowd": 0,
        }
        for k, (i, b) in enumerate((i, b) for i, g in enumerate(gts) for b in g)
    ]
    dets = [
        {"image_id": i + 1, "category_id": 1, "bbox": xywh(b), "score": float(s)}
        for i, (boxes, scores) in enumerate(preds)
        for b, s in zip(boxes, scores)
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {
            "images": [{"id": i + 1, "width": 200, "height": 200} for i in range(len(gts))],
            "annotations": anns,
            "categories": [{"id": 1, "name": "c"}],
        }
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dets) if dets else COCO()
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.iouThrs = np.array([iou])
        ev.params.maxDets = [1000]
        ev.params.areaRng = [[0.0, 1e10]]
        ev.params.areaRngLbl = ["all"]
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"][0, :, 0, 0, 0]
    return float(np.mean(precision))


def _random_case(rng: np.random.Generator) -> tuple[list, list]:
    gts, preds = [], []
    for _ in range(rng.integers(1, 5)):
        xy = rng.uniform(0, 150, size=(rng.integers(1, 4), 2))
        wh = rng.uniform(8, 40, size=xy.shape)
        g = np.hstack([xy, xy + wh])
        # Jittered copies of some GT boxes (hits or near misses) plus random boxes (misses).
        jit = g[rng.integers(0, len(g), size=rng.integers(0, 4))] + rng.normal(0, 6, size=(1, 4))
        xy_r = rng.uniform(0, 150, size=(rng.integers(0, 3), 2))
        rand = np.hstack([xy_r, xy_r + rng.uniform(8, 40, size=xy_r.shape)])
        boxes = np.vstack([jit, rand]).reshape(-1, 4)
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        gts.append(g)
        preds.append((boxes, rng.random(len(boxes))))
    return preds, gts


def test_matching_and_curve_agree_with_pycocotools_on_random_cases() -> None:
    """With COCO's matching rule and COCO's 101-point reading of *our* precision-recall curve,
    pycocotools must give the same AP on arbitrary cases: this checks matching and the curve."""
    pytest.importorskip("pycocotools")
    rng = np.random.default_rng(7)
    for _ in range(40):
        preds, gts = _random_case(rng)
        for iou in (0.25, 0.5):
            ours = average_precision(preds, gts, iou_threshold=iou, match="coco")
            theirs = _coco_ap(preds, gts, iou)
            assert coco_ap101(ours.recall, ours.precision) == pytest.approx(theirs, abs=1e-12)


@pytest.mark.parametrize("kind", ["perfect", "all_misses", "alternating"])
def test_voc_ap_equals_pycocotools_where_interpolation_cannot_matter(kind: str) -> None:
    """VOC all-point and COCO 101-point agree when the precision envelope is flat over the
    whole recall range [0, 1]: perfect detections (1), no hits (0), and miss/hit alternating
    so precision is 1/2 at every hit and recall reaches 1 (0.5). Both matching rules agree here
    (each detection overlaps at most one GT box)."""
    pytest.importorskip("pycocotools")
    gts = [
        np.array([[10, 10, 30, 30], [80, 80, 120, 110]], float),
        np.array([[40, 40, 60, 70]], float),
    ]
    far = lambda k: np.array([[150 + k, 150, 160 + k, 160]], float)  # noqa: E731
    if kind == "perfect":
        preds = [(gts[0] + 1, np.array([0.9, 0.4])), (gts[1] - 1, np.array([0.6]))]
        expected = 1.0
    elif kind == "all_misses":
        preds = [(far(0), np.array([0.9])), (np.vstack([far(1), far(2)]), np.array([0.5, 0.3]))]
        expected = 0.0
    else:  # scores: miss .9, hit .8, miss .7, hit .6, miss .5, hit .4
        preds = [
            (np.vstack([far(0), gts[0][0], far(1), gts[0][1]]), np.array([0.9, 0.8, 0.7, 0.6])),
            (np.vstack([far(2), gts[1][0]]), np.array([0.5, 0.4])),
        ]
        expected = 0.5
    coco = _coco_ap(preds, gts, 0.25)
    for match in ("voc", "coco"):
        assert average_precision(preds, gts, 0.25, match).ap == pytest.approx(coco, abs=1e-12)
    assert coco == pytest.approx(expected)
