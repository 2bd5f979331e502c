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


# --------------------------------------------------------------------------- many curves at once
def bootstrap_counts(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) multiplicity of each item in each resample (same resamples as `bootstrap_indices`)."""
    idx = bootstrap_indices(n, n_boot, seed)
    flat = (idx + np.arange(n_boot)[:, None] * n).ravel()
    return np.bincount(flat, minlength=n_boot * n).reshape(n_boot, n).astype(np.float64)


def weighted_auroc_auprc(y: np.ndarray, s: np.ndarray, w_bn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and AUPRC of scores `s` (n,) under each row of item weights `w_bn` (B, n).

    With integer weights (bootstrap multiplicities) this equals sklearn on the resampled
    arrays: one sort per curve, then cumulative sums over tie groups, with no per-resample
    sorting. Only one (B, n) cumulative sum is taken; the rest works on the groups holding a
    positive. Rows with one class only give NaN. Arithmetic is in `w_bn`'s dtype (float32 is
    exact for bootstrap counts up to 2**24 items).
    """
    y = np.asarray(y).astype(bool)
    order = np.argsort(-np.asarray(s), kind="mergesort")
    s_sorted, y_sorted = np.asarray(s)[order], y[order]
    w = np.take(w_bn, order, axis=1)
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
    if len(starts) == len(s_sorted):            # no ties: every item is its own group
        all_g, group_has_pos = w, y_sorted
        pos_gp = w[:, y_sorted]
    else:
        all_g = np.add.reduceat(w, starts, axis=1)
        group_has_pos = np.add.reduceat(y_sorted.astype(np.int64), starts) > 0
        pos_gp = np.add.reduceat(w * y_sorted, starts, axis=1)[:, group_has_pos]
    seen_gp = np.cumsum(all_g, axis=1)[:, group_has_pos]     # weight at or above each group
    tp_gp = np.cumsum(pos_gp, axis=1)                         # positives at or above
    n_pos = tp_gp[:, -1] if tp_gp.shape[1] else np.zeros(len(w))
    n_neg = w.sum(axis=1) - n_pos
    neg_in_gp = np.take(all_g, np.flatnonzero(group_has_pos), axis=1) - pos_gp
    neg_below_gp = n_neg[:, None] - (seen_gp - tp_gp)
    with np.errstate(invalid="ignore", divide="ignore"):
        roc = (pos_gp * (neg_below_gp + 0.5 * neg_in_gp)).sum(axis=1, dtype=np.float64) / (
            n_pos.astype(np.float64) * n_neg)
        precision_gp = tp_gp / np.maximum(seen_gp, 1e-30)
        pr = (pos_gp * precision_gp).sum(axis=1, dtype=np.float64) / n_pos
    roc[(n_pos == 0) | (n_neg == 0)] = np.nan
    pr[n_pos == 0] = np.nan
    return roc, pr


def curves_with_ci(y_true: np.ndarray, scores_kn: np.ndarray, *, n_boot: int = 1000, seed: int = 0,
                   level: float = 0.95) -> dict[str, np.ndarray]:
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
    out = {key: np.full(k, np.nan) for key in
           ("auroc", "auroc_low", "auroc_high", "auprc", "auprc_low", "auprc_high")}
    for i, s in enumerate(scores_kn):
        roc, pr = weighted_auroc_auprc(y, s, ones)
        out["auroc"][i], out["auprc"][i] = roc[0], pr[0]
        if counts is not None:
            rocs, prs = weighted_auroc_auprc(y, s, counts)
            with np.errstate(invalid="ignore"):
                out["auroc_low"][i], out["auroc_high"][i] = np.nanpercentile(rocs, q)
                out["auprc_low"][i], out["auprc_high"][i] = np.nanpercentile(prs, q)
    return out
