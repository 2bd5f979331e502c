"""Ranking metrics with bootstrap confidence intervals (float64, vectorised).

`auroc` equals sklearn's `roc_auc_score` (ties get half credit); `auprc` equals sklearn's
`average_precision_score` (step-wise, no interpolation). Both are also computed for many
bootstrap resamples at once, which is what makes whole intervention sweeps cheap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

from ..errors import MammoSaeError


def _check(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(np.int64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise MammoSaeError(f"labels ({y.size}) and scores ({s.size}) differ in length")
    if not np.isfinite(s).all():
        raise MammoSaeError(f"{int((~np.isfinite(s)).sum())} scores are NaN or infinite")
    if not set(np.unique(y)).issubset({0, 1}):
        raise MammoSaeError("binary metrics need labels in {0, 1}")
    return y, s


def _auroc_rows(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """AUROC per row of (B, n) arrays; NaN where a row has one class only."""
    ranks = rankdata(s, axis=1)
    n_pos = y.sum(axis=1)
    n_neg = y.shape[1] - n_pos
    rank_sum = (ranks * y).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    out[(n_pos == 0) | (n_neg == 0)] = np.nan
    return out


def _auprc_rows(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Average precision per row, with tied scores grouped (sklearn's definition)."""
    out = np.empty(y.shape[0])
    for i in range(y.shape[0]):
        order = np.argsort(-s[i], kind="mergesort")
        ys, ss = y[i, order], s[i, order]
        tp = np.cumsum(ys)
        # Only the last position of each run of equal scores is a threshold.
        last = np.r_[ss[1:] != ss[:-1], True]
        tp_t = tp[last]
        k = np.flatnonzero(last) + 1
        n_pos = tp[-1]
        if n_pos == 0:
            out[i] = np.nan
            continue
        precision = tp_t / k
        recall = tp_t / n_pos
        out[i] = np.sum(np.diff(np.r_[0.0, recall]) * precision)
    return out


def auroc(y_true: np.ndarray, scores: np.ndarray) -> float:
    y, s = _check(y_true, scores)
    if y.min() == y.max():
        raise MammoSaeError("AUROC needs both classes; the selection has only one")
    return float(_auroc_rows(y[None], s[None])[0])


def auprc(y_true: np.ndarray, scores: np.ndarray) -> float:
    y, s = _check(y_true, scores)
    if y.sum() == 0:
        raise MammoSaeError("AUPRC needs at least one positive")
    return float(_auprc_rows(y[None], s[None])[0])


@dataclass(frozen=True)
class MetricCI:
    value: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "ci_low": self.low, "ci_high": self.high}


def bootstrap_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) resample indices; fixed by seed so every model/k uses the same resamples."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def with_ci(y_true: np.ndarray, scores: np.ndarray, *, n_boot: int = 1000, seed: int = 0,
            level: float = 0.95, idx: np.ndarray | None = None) -> dict[str, MetricCI]:
    """AUROC and AUPRC with percentile bootstrap CIs (resamples with one class are dropped)."""
    y, s = _check(y_true, scores)
    value_roc, value_pr = auroc(y, s), auprc(y, s)
    if n_boot <= 0:
        return {"auroc": MetricCI(value_roc, np.nan, np.nan), "auprc": MetricCI(value_pr, np.nan, np.nan)}
    idx = bootstrap_indices(len(y), n_boot, seed) if idx is None else idx
    yb, sb = y[idx], s[idx]
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    rocs = _auroc_rows(yb, sb)
    prs = _auprc_rows(yb, sb)
    lo_r, hi_r = np.nanpercentile(rocs, q)
    lo_p, hi_p = np.nanpercentile(prs, q)
    return {"auroc": MetricCI(value_roc, float(lo_r), float(hi_r)),
            "auprc": MetricCI(value_pr, float(lo_p), float(hi_p))}
