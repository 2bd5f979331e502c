"""Ranking metrics with bootstrap confidence intervals (float64, vectorised).

`auroc` equals sklearn's `roc_auc_score` (ties get half credit); `auprc` equals sklearn's
`average_precision_score` (step-wise, no interpolation). Both are also computed for many
bootstrap resamples at once, which is what makes whole intervention sweeps cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import rankdata

from .errors import MammoSaeError


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


def with_ci(
    y_true: np.ndarray,
    scores: np.ndarray,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    idx: np.ndarray | None = None,
) -> dict[str, MetricCI]:
    """AUROC and AUPRC with percentile bootstrap CIs (resamples with one class are dropped)."""
    y, s = _check(y_true, scores)
    value_roc, value_pr = auroc(y, s), auprc(y, s)
    if n_boot <= 0:
        return {
            "auroc": MetricCI(value_roc, np.nan, np.nan),
            "auprc": MetricCI(value_pr, np.nan, np.nan),
        }
    idx = bootstrap_indices(len(y), n_boot, seed) if idx is None else idx
    yb, sb = y[idx], s[idx]
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    rocs = _auroc_rows(yb, sb)
    prs = _auprc_rows(yb, sb)
    lo_r, hi_r = np.nanpercentile(rocs, q)
    lo_p, hi_p = np.nanpercentile(prs, q)
    return {
        "auroc": MetricCI(value_roc, float(lo_r), float(hi_r)),
        "auprc": MetricCI(value_pr, float(lo_p), float(hi_p)),
    }


# --------------------------------------------------------------------------- many curves at once
def bootstrap_counts(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) multiplicity of each item in each resample (same resamples as `bootstrap_indices`)."""
    idx = bootstrap_indices(n, n_boot, seed)
    flat = (idx + np.arange(n_boot)[:, None] * n).ravel()
    return np.bincount(flat, minlength=n_boot * n).reshape(n_boot, n).astype(np.float64)


def _curve_selector(y: np.ndarray, s: np.ndarray) -> tuple[Any, int]:
    """Sparse (3G, n) 0/1 matrix of one score vector; G = tie groups (by descending score)
    that hold a positive. Multiplying it by item weights (n, B) gives, per such group g:
    rows [0, G): weight scored below group g−1's and at or above group g's scores (their
    cumulative sum = weight ranked at or above g); rows [G, 2G): weight in g; rows [2G, 3G):
    positive weight in g. Everything AUROC and AUPRC need, in one sparse product."""
    import scipy.sparse as sp

    pos = np.asarray(y).astype(bool)
    order = np.argsort(-s, kind="mergesort")
    s_sorted, pos_sorted = s[order], pos[order]
    group = np.cumsum(np.r_[True, s_sorted[1:] != s_sorted[:-1]]) - 1
    pos_groups = np.flatnonzero(np.bincount(group, weights=pos_sorted) > 0)
    g = len(pos_groups)
    segment = np.searchsorted(pos_groups, group)  # g = after the last positive group
    rank_of_group = np.full(group[-1] + 1, -1)
    rank_of_group[pos_groups] = np.arange(g)
    rank = rank_of_group[group]
    in_pos_group = rank >= 0
    rows = np.r_[segment[segment < g], g + rank[in_pos_group], 2 * g + rank[pos_sorted]]
    cols = np.r_[order[segment < g], order[in_pos_group], order[pos_sorted]]
    return sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(3 * g, len(s))), g


def _curve_metrics(
    sums_gb: np.ndarray, g: int, total_b: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    if g == 0:
        nan = np.full(len(total_b), np.nan)
        return nan, nan.copy()
    seen = np.cumsum(sums_gb[:g], axis=0)  # weight at or above each positive group
    in_group, pos = sums_gb[g : 2 * g], sums_gb[2 * g :]
    tp = np.cumsum(pos, axis=0)  # positive weight at or above
    n_pos = tp[-1]
    n_neg = total_b - n_pos
    neg_below = n_neg[None, :] - (seen - tp)
    with np.errstate(invalid="ignore", divide="ignore"):
        roc = (pos * (neg_below + 0.5 * (in_group - pos))).sum(0, dtype=np.float64) / (
            n_pos.astype(np.float64) * n_neg
        )
        pr = (pos * (tp / np.maximum(seen, 1e-30))).sum(0, dtype=np.float64) / n_pos
    roc[(n_pos == 0) | (n_neg == 0)] = np.nan
    pr[n_pos == 0] = np.nan
    return roc, pr


def weighted_auroc_auprc(
    y: np.ndarray, s: np.ndarray, w_bn: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and AUPRC of scores `s` (n,) under each row of item weights `w_bn` (B, n).

    With integer weights (bootstrap multiplicities) this equals sklearn on the resampled
    arrays: one sort per curve and one sparse product with the weights, no per-resample sort.
    Rows with one class only give NaN. Arithmetic is in `w_bn`'s dtype (float32 is exact for
    bootstrap counts of up to 2**24 items).
    """
    w_bn = np.asarray(w_bn)
    sel, g = _curve_selector(np.asarray(y), np.asarray(s, dtype=np.float64))
    sums = np.asarray(sel.astype(w_bn.dtype) @ np.ascontiguousarray(w_bn.T))
    return _curve_metrics(sums, g, w_bn.sum(axis=1))


def curves_with_ci(
    y_true: np.ndarray,
    scores_kn: np.ndarray,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, np.ndarray]:
    """AUROC/AUPRC with percentile bootstrap CIs for K score vectors sharing labels and resamples.

    Returns arrays of shape (K,): `auroc`, `auroc_low`, `auroc_high`, `auprc`, `auprc_low`,
    `auprc_high`. The same resamples serve every curve (paired comparisons across k and modes),
    and the values equal `with_ci(y, scores_kn[k], n_boot=n_boot, seed=seed)` for each k.
    """
    scores_kn = np.atleast_2d(np.asarray(scores_kn, dtype=np.float64))
    y, _ = _check(y_true, scores_kn[0])
    for s in scores_kn:
        _check(y, s)
    if y.min() == y.max():
        raise MammoSaeError("AUROC needs both classes; the selection has only one")
    k = len(scores_kn)
    ones = np.ones((1, len(y)))
    counts = bootstrap_counts(len(y), n_boot, seed).astype(np.float32) if n_boot > 0 else None
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    out = {
        key: np.full(k, np.nan)
        for key in ("auroc", "auroc_low", "auroc_high", "auprc", "auprc_low", "auprc_high")
    }
    counts_nb = np.ascontiguousarray(counts.T) if counts is not None else None
    totals_b = counts.sum(axis=1) if counts is not None else None
    done: dict[bytes, int] = {}  # identical curves (e.g. plain SAE at both sweep ends)
    for i, s in enumerate(scores_kn):
        key = s.tobytes()
        if key in done:
            for name in out:
                out[name][i] = out[name][done[key]]
            continue
        done[key] = i
        roc, pr = weighted_auroc_auprc(y, s, ones)
        out["auroc"][i], out["auprc"][i] = roc[0], pr[0]
        if counts is not None:
            sel, g = _curve_selector(y, s)
            rocs, prs = _curve_metrics(np.asarray(sel @ counts_nb), g, totals_b)
            with np.errstate(invalid="ignore"):
                out["auroc_low"][i], out["auroc_high"][i] = np.nanpercentile(rocs, q)
                out["auprc_low"][i], out["auprc_high"][i] = np.nanpercentile(prs, q)
    return out
