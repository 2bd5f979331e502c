"""Probing: which SAE latents represent a concept (the paper's Eq. 2 and the released rankings).

z̄(c) is the mean latent vector over the images of class c and all their positions: the mean
over images of each image's mean latent vector (`summaries.mean_nh`), which equals Eq. 2 when
every image has the same number of positions N_l. Scores per latent t and class c:

- `mean`     z̄_t(c)                      the paper's definition;
- `centered` z̄_t(c) − z̄_t(all)           what the released MammoSAE rankings contain (class-1
                                           ranking = order of z̄(1) − z̄(0); class 0 its reverse);
- `auroc`    AUROC of the image mean of latent t for class c (1 − AUROC for c = 0), a
             discriminative score that ignores scale (latents never active score 0.5).

Rankings are written in the released format: a JSON list of {rank (0-based), index,
importance}, sorted by importance, descending (ties by index).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from .. import metrics
from ..errors import MammoSaeError
from ..io import read_json

# mean: paper Eq. 2; centered: the released rankings; auroc: discriminative; peak: class mean of
# each image's *maximum* activation minus the global one — favours latents that fire strongly in
# a few positions of positive images (local findings) over ones that shift the whole map.
SCORES = ("mean", "centered", "auroc", "peak")


@dataclasses.dataclass
class ProbeResult:
    concept: str
    n_per_class: dict[int, int]
    class_mean: dict[Any, np.ndarray]  # 0, 1 and "all" -> (h,) float64
    scores: dict[str, dict[int, np.ndarray]]  # score name -> class -> (h,) importance

    def ranking(self, score: str, cls: int) -> list[dict[str, Any]]:
        return ranking_entries(self.scores[score][cls])


def class_means(mean_nh: sp.csr_matrix | np.ndarray, y: np.ndarray) -> dict[Any, np.ndarray]:
    """z̄(0), z̄(1) and z̄(all) (each (h,) float64) from per-image mean vectors and labels."""
    y = np.asarray(y)
    out: dict[Any, np.ndarray] = {}
    for key, sel in ((0, y == 0), (1, y == 1), ("all", np.ones(len(y), bool))):
        if not sel.any():
            raise MammoSaeError(f"class {key} has no images in this selection")
        out[key] = np.asarray(mean_nh[np.flatnonzero(sel)].astype(np.float64).mean(axis=0)).ravel()
    return out


def latent_auroc(
    mean_nh: sp.csr_matrix | np.ndarray, y: np.ndarray, *, block: int = 512
) -> np.ndarray:
    """Per-latent AUROC of the image mean activation for label 1 (0.5 for never-active latents)."""
    y = np.asarray(y, dtype=np.int64)
    if y.min() == y.max():
        raise MammoSaeError("per-latent AUROC needs both classes in the selection")
    m = sp.csc_matrix(mean_nh) if sp.issparse(mean_nh) else sp.csc_matrix(np.asarray(mean_nh))
    out = np.full(m.shape[1], 0.5)
    active = np.flatnonzero(np.diff(m.indptr) > 0)
    for lo in range(0, len(active), block):
        cols = active[lo : lo + block]
        vals_bn = m[:, cols].toarray().T.astype(np.float64)
        out[cols] = metrics._auroc_rows(np.broadcast_to(y, vals_bn.shape), vals_bn)
    return out


def probe(
    mean_nh: sp.csr_matrix | np.ndarray,
    y: np.ndarray,
    *,
    concept: str = "",
    scores: Sequence[str] | None = None,
    max_nh: sp.csr_matrix | np.ndarray | None = None,
) -> ProbeResult:
    """Class means and the requested per-class scores over the given images (default: every score
    the inputs allow; `peak` needs the per-image max vectors `max_nh`, rows aligned with `mean_nh`)."""
    if scores is None:
        scores = SCORES if max_nh is not None else tuple(s for s in SCORES if s != "peak")
    unknown = [s for s in scores if s not in SCORES]
    if unknown:
        raise MammoSaeError(f"unknown score(s) {unknown}; valid: {', '.join(SCORES)}")
    y = np.asarray(y, dtype=np.int64)
    if mean_nh.shape[0] != len(y):
        raise MammoSaeError(f"{mean_nh.shape[0]} summary rows but {len(y)} labels")
    means = class_means(mean_nh, y)
    out: dict[str, dict[int, np.ndarray]] = {}
    if "mean" in scores:
        out["mean"] = {0: means[0], 1: means[1]}
    if "centered" in scores:
        out["centered"] = {0: means[0] - means["all"], 1: means[1] - means["all"]}
    if "auroc" in scores:
        a = latent_auroc(mean_nh, y)
        out["auroc"] = {0: 1.0 - a, 1: a}
    if "peak" in scores:
        if max_nh is None or max_nh.shape != mean_nh.shape:
            raise MammoSaeError("the peak score needs per-image max vectors aligned with the means")
        peaks = class_means(max_nh, y)
        out["peak"] = {0: peaks[0] - peaks["all"], 1: peaks[1] - peaks["all"]}
    return ProbeResult(
        concept=concept,
        n_per_class={0: int((y == 0).sum()), 1: int((y == 1).sum())},
        class_mean=means,
        scores=out,
    )


def ranking_order(importance_h: np.ndarray) -> np.ndarray:
    """Latent indices by importance, descending; ties broken by the lower index."""
    imp = np.asarray(importance_h, dtype=np.float64)
    return np.lexsort((np.arange(len(imp)), -imp))


def ranking_entries(importance_h: np.ndarray) -> list[dict[str, Any]]:
    order = ranking_order(importance_h)
    return [
        {"rank": r, "index": int(j), "importance": float(importance_h[j])}
        for r, j in enumerate(order)
    ]


def read_ranking(path: str | Path, top: int | None = None) -> tuple[list[int], list[float]]:
    """Latent indices and importances (NaN where absent) in rank order, the first `top` of them
    (None: all), from a ranking JSON: ours, the released MammoSAE files, or a mapping holding
    such a list under `ranking`. Entries are sorted by `rank` when every entry has one."""
    data = read_json(path)
    if isinstance(data, dict):
        data = data.get("ranking")
    if not isinstance(data, list) or not data or not all(isinstance(e, dict) for e in data):
        raise MammoSaeError(
            f"{path}: expected a non-empty JSON list of {{rank, index, importance}}"
        )
    try:
        if all("rank" in e for e in data):
            data = sorted(data, key=lambda e: int(e["rank"]))
        idx = [int(e["index"]) for e in data]
        importance = [float(e.get("importance", math.nan)) for e in data]
    except (KeyError, TypeError, ValueError) as exc:
        raise MammoSaeError(
            f"{path}: ranking entries need integer 'rank' and 'index' ({exc})"
        ) from exc
    if min(idx) < 0 or len(set(idx)) != len(idx):
        raise MammoSaeError(f"{path}: latent indices must be distinct and non-negative")
    if top is not None and top < 1:
        raise MammoSaeError(f"--top must be at least 1, got {top}")
    return idx[:top], importance[:top]


# Which ranking a reader of a finished run takes when several were written, in order (the
# released files' `centered` first).
RANKING_PREFERENCE = ("centered", "mean", "auroc")


def ranking_file_name(cls: int, score: str) -> str:
    return f"ranking_class={cls}_{score}.json"


def probe_table(result: ProbeResult, *, max_images_active: np.ndarray | None = None) -> Any:
    """One row per latent: class means and every score (a pandas DataFrame)."""
    import pandas as pd

    h = len(result.class_mean[0])
    cols: dict[str, Any] = {
        "index": np.arange(h),
        "mean_class0": result.class_mean[0],
        "mean_class1": result.class_mean[1],
        "mean_all": result.class_mean["all"],
    }
    for score, per_class in result.scores.items():
        if score == "mean":
            continue
        for c in (0, 1):
            cols[f"{score}_class{c}"] = per_class[c]
    if max_images_active is not None:
        cols["images_active"] = max_images_active
    return pd.DataFrame(cols)
