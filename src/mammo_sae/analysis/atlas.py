"""Latent atlas: every latent of an SAE described from the cached per-image summaries.

Per latent j, over the selected images (no backbone or SAE pass: `summaries.mean_nh` etc.):

- activity: firing rate (share of images with mean activation > 0), mean and max activation,
  and the normalised entropy of its activation mass over images (1 = spread evenly over every
  image, 0 = all in one image);
- association with every label of the dataset that varies over the images: binary labels
  (findings, attributes such as the phantom's `confounder` marker, view = MLO, laterality = R,
  any 0/1 user label)
  by the AUROC of the image mean activation, with the Mann–Whitney U normal approximation
  (tie- and continuity-corrected) for its p-value; ordinal labels (density, BI-RADS, any other
  integer label) by Spearman's ρ with the t approximation. Benjamini–Hochberg q-values over all
  latents × labels. All at once: each column's ranks are computed once from the sparse matrix
  (zeros share one tied rank), and rank sums for every label are one sparse × dense product;
- spatial profile (from the summaries' per-latent mass sums): centre of mass across from the
  chest wall and down, relative to the breast's extent; off-breast and frame-border share; for
  the phantom, the share inside the marker box;
- effect on each classifier's logit: v_j = w · W_dec[:, j] (the pooled identity, `sae_readout`);
- an automatic name from its strongest significant associations and spatial profile, e.g.
  "Mass + (AUROC 0.93) · upper · dense (ρ 0.41)", or "unexplained"; flags (confounder,
  off_breast, border, dead). An attribute is a label whose images carry boxes of it
  (`ImageRecord.attribute_boxes`, e.g. the phantom's marker): the data names them, and a latent
  that follows one (its strongest association, or its mass inside the boxes) is flagged as a
  possible confounder;
- a co-activation cluster: spherical k-means on the latents' binary firing patterns over a
  subsample of images (sparse products only).

See docs/analysis.md ("Latent atlas").
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy import stats as sps

from ..data.records import FINDING_CONCEPTS, is_attribute
from ..errors import MammoSaeError

SCHEMA_VERSION = 1
# Spatial words: a centre of mass in the outer third of the breast extent, or most of the mass
# off the breast / on the border ring / in the marker box.
THIRD = 1.0 / 3.0
SPATIAL_SHARE = 0.5
# The flag of a latent that follows an attribute (a possible confounder of the findings).
CONFOUNDER_FLAG = "confounder"
# Words for the two directions of non-finding labels (positive association, negative);
# an attribute's are `Label.words`'s.
DIRECTION_WORDS: dict[str, tuple[str, str]] = {
    "view": ("MLO", "CC"),
    "laterality": ("right", "left"),
    "density": ("dense", "fatty"),
    "birads": ("high BI-RADS", "low BI-RADS"),
}


@dataclasses.dataclass
class Label:
    """One image label over the selected images (values aligned with their rows)."""

    name: str
    kind: str  # "binary" (AUROC) | "ordinal" (Spearman)
    values: np.ndarray  # float64 (n,)
    attribute: bool = False  # the images carry boxes of it (`ImageRecord.attribute_boxes`)

    def words(self) -> tuple[str, str]:
        if self.attribute:
            return (f"marker ({self.name})", "no marker")
        if self.name in DIRECTION_WORDS:
            return DIRECTION_WORDS[self.name]
        return (
            (f"{self.name} +", f"{self.name} −")
            if self.kind == "binary"
            else (f"{self.name} ↑", f"{self.name} ↓")
        )


def image_labels(
    images: Any, rows: np.ndarray, column: str = "image_labels"
) -> tuple[list[Label], dict[str, str]]:
    """Every label of the store's image table that varies over `rows`, and why others were left
    out ({name: reason}). Label-dict entries (findings, density, birads, attributes, user
    labels), then view (1 = MLO) and laterality (1 = R), then numeric `extra` fields. A
    label-dict entry is an attribute when some of the images carry boxes of it."""
    if column not in images:
        column = "labels"
    dicts = [images.at[int(r), column] for r in rows]
    names = list(dict.fromkeys(k for d in dicts for k in d))
    attributes = attribute_names(images, rows)
    out: list[Label] = []
    skipped: dict[str, str] = {}

    def add(name: str, values: list[Any]) -> None:
        try:
            v = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            skipped[name] = "not numeric"
            return
        if not np.isfinite(v).all():
            skipped[name] = "missing on some images"
            return
        uniq = np.unique(v)
        if len(uniq) < 2:
            skipped[name] = f"constant ({uniq[0]:g})" if len(uniq) else "no images"
            return
        kind = "binary" if set(uniq.tolist()) <= {0.0, 1.0} else "ordinal"
        out.append(Label(name, kind, v, attribute=name in attributes))

    for name in names:
        add(name, [d.get(name, math.nan) for d in dicts])
    for name, positive in (("view", "MLO"), ("laterality", "R")):
        if name in images:
            raw = [str(images.at[int(r), name]) for r in rows]
            if all(raw):
                add(name, [float(x == positive) for x in raw])
            else:
                skipped[name] = "missing on some images"
    if "extra" in images:
        extras = [images.at[int(r), "extra"] or {} for r in rows]
        for name in dict.fromkeys(k for e in extras for k in e):
            if name != "n_rows" and name not in names:  # n_rows: CSV rows per image, not a label
                add(name, [e.get(name, math.nan) for e in extras])
    return out, skipped


def attribute_names(images: Any, rows: np.ndarray) -> set[str]:
    """Concepts of the attribute boxes (`records.is_attribute`) on the image table's `rows`:
    rows of the table's `boxes` column are `[concept, x0, y0, x1, y1]`."""
    if "boxes" not in images:
        return set()
    return {
        str(box[0])
        for r in rows
        for box in images.at[int(r), "boxes"] or ()
        if is_attribute(str(box[0]))
    }


# --------------------------------------------------------------------------- ranks
@dataclasses.dataclass
class ColumnRanks:
    """Average ranks (1..n, ties averaged) of every column of an (n, h) sparse matrix, without
    densifying: the nonzero entries' ranks in `ranks` (same sparsity pattern), and per column
    the rank shared by its zeros and the tie term Σ(t³ − t) over its tie groups."""

    n: int
    ranks: sp.csc_matrix
    pattern: sp.csc_matrix  # 1 where the column is nonzero
    n_zero: np.ndarray
    zero_rank: np.ndarray
    tie_term: np.ndarray

    @property
    def h(self) -> int:
        return self.ranks.shape[1]


def column_ranks(m_nh: sp.spmatrix | np.ndarray) -> ColumnRanks:
    m = sp.csc_matrix(m_nh, dtype=np.float64, copy=True)
    m.eliminate_zeros()
    n, h = m.shape
    counts = np.diff(m.indptr)
    col = np.repeat(np.arange(h), counts)
    data = m.data
    order = np.lexsort((data, col))
    d_sorted, c_sorted = data[order], col[order]
    n_zero = n - counts
    n_neg = np.bincount(col[data < 0], minlength=h)
    position = np.arange(len(data)) - m.indptr[c_sorted]  # 0-based among the column's nonzeros
    base = position + 1.0 + np.where(d_sorted > 0, n_zero[c_sorted], 0)
    first = np.ones(len(data), dtype=bool)  # starts a tie group
    first[1:] = (c_sorted[1:] != c_sorted[:-1]) | (d_sorted[1:] != d_sorted[:-1])
    group = np.cumsum(first) - 1
    size = np.bincount(group).astype(np.float64)
    mean_rank = np.bincount(group, weights=base) / size
    ranks = np.empty(len(data))
    ranks[order] = mean_rank[group]
    tie = np.bincount(c_sorted[first], weights=size**3 - size, minlength=h).astype(np.float64)
    tie += n_zero.astype(np.float64) ** 3 - n_zero
    return ColumnRanks(
        n=n,
        ranks=sp.csc_matrix((ranks, m.indices, m.indptr), shape=(n, h)),
        pattern=sp.csc_matrix((np.ones(len(data)), m.indices, m.indptr), shape=(n, h)),
        n_zero=n_zero,
        zero_rank=n_neg + (n_zero + 1) / 2.0,
        tie_term=tie,
    )


def _rank_dot(r: ColumnRanks, w_nl: np.ndarray) -> np.ndarray:
    """Σ_i rank_ij · w_il for every column j and weight vector l: (h, L)."""
    w_nl = np.asarray(w_nl, dtype=np.float64)
    nz = np.asarray(r.ranks.T @ w_nl)
    zeros = w_nl.sum(0)[None, :] - np.asarray(r.pattern.T @ w_nl)  # weight on the zeros
    return nz + r.zero_rank[:, None] * zeros


def auroc_test(r: ColumnRanks, y_nl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROC (h, L) of every column for every binary label column, and the two-sided
    Mann–Whitney p-value (normal approximation, tie and continuity corrections). Columns
    constant over the images get AUROC 0.5 and p NaN (nothing to test)."""
    y = np.asarray(y_nl, dtype=np.float64).reshape(r.n, -1)
    n1 = y.sum(0)
    n0 = r.n - n1
    if ((n1 == 0) | (n0 == 0)).any():
        raise MammoSaeError("every binary label needs both classes among the images")
    u = _rank_dot(r, y) - (n1 * (n1 + 1) / 2.0)[None, :]
    auc = u / (n1 * n0)[None, :]
    n = float(r.n)
    var = (n1 * n0)[None, :] / 12.0 * ((n + 1) - (r.tie_term / (n * (n - 1)))[:, None])
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.maximum(np.abs(u - (n1 * n0 / 2.0)[None, :]) - 0.5, 0.0) / np.sqrt(var)
    p = 2.0 * sps.norm.sf(z)
    flat = var <= 1e-12 * (n1 * n0)[None, :]
    auc[flat], p[flat] = 0.5, np.nan
    return auc, np.minimum(p, 1.0)


def spearman_test(r: ColumnRanks, values_nl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Spearman ρ (h, L) of every column with every label column, and the two-sided p-value of
    its t approximation (as scipy's spearmanr); NaN p for columns constant over the images."""
    v = np.asarray(values_nl, dtype=np.float64).reshape(r.n, -1)
    rv = sps.rankdata(v, axis=0)
    n = float(r.n)
    mid = (n + 1) / 2.0
    cov = _rank_dot(r, rv) / n - mid * mid
    sq_nz = np.asarray(r.ranks.power(2).sum(0)).ravel()
    var_col = (sq_nz + r.n_zero * r.zero_rank**2) / n - mid * mid
    var_lab = (rv**2).mean(0) - mid * mid
    if (var_lab <= 0).any():
        raise MammoSaeError("every ordinal label needs at least two values among the images")
    flat = var_col <= 1e-12 * mid * mid
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.clip(cov / np.sqrt(np.maximum(var_col, 0.0)[:, None] * var_lab[None, :]), -1, 1)
        t = rho * np.sqrt((n - 2) / np.maximum(1.0 - rho**2, 1e-300))
    p = 2.0 * sps.t.sf(np.abs(t), n - 2) if n > 2 else np.full_like(rho, np.nan)
    rho[flat], p[flat] = 0.0, np.nan
    return rho, p


def bh_fdr(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg q-values over every finite entry of `p` (NaN stays NaN)."""
    p = np.asarray(p, dtype=np.float64)
    q = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    vals = p[ok]
    m = len(vals)
    if m == 0:
        return q
    order = np.argsort(vals, kind="mergesort")
    scaled = vals[order] * m / np.arange(1, m + 1)
    adjusted = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    out = np.empty(m)
    out[order] = adjusted
    q[ok] = out
    return q


# --------------------------------------------------------------------------- activity
def activity(mean_nh: sp.csr_matrix, max_nh: sp.csr_matrix | None) -> dict[str, np.ndarray]:
    """Firing rate, mean and max activation and normalised entropy over images, per latent."""
    m = sp.csc_matrix(mean_nh, dtype=np.float64)
    m.eliminate_zeros()
    n, h = m.shape
    counts = np.diff(m.indptr)
    total = np.asarray(m.sum(0)).ravel()
    col = np.repeat(np.arange(h), counts)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.abs(m.data) / np.abs(total)[col]
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
        entropy = (
            -np.bincount(col, weights=plogp, minlength=h) / math.log(n) if n > 1 else np.zeros(h)
        )
    peak = np.asarray((max_nh if max_nh is not None else mean_nh).max(axis=0).toarray()).ravel()
    entropy[counts == 0] = np.nan
    return {
        "firing_rate": counts / max(n, 1),
        "images_active": counts,
        "mean_activation": total / max(n, 1),
        "max_activation": peak.astype(np.float64),
        "entropy": np.clip(entropy, 0.0, 1.0),
    }


# --------------------------------------------------------------------------- clusters
def coactivation_clusters(
    mean_nh: sp.csr_matrix,
    n_clusters: int,
    *,
    max_images: int = 2000,
    iterations: int = 15,
    seed: int = 0,
    tick: Callable[[], None] | None = None,
) -> np.ndarray:
    """Cluster id per latent (−1: never active on the subsample), clusters numbered by size.

    Each latent is its binary firing pattern over up to `max_images` images (seeded subsample),
    scaled to unit length; spherical k-means (k-means++ start, cosine similarity) groups latents
    that fire on the same images. Only sparse × dense products: memory O(nnz + h·k)."""
    n, h = mean_nh.shape
    rng = np.random.default_rng(seed)
    rows = (
        np.sort(rng.choice(n, size=min(n, max_images), replace=False))
        if n > max_images
        else np.arange(n)
    )
    fire = (sp.csr_matrix(mean_nh)[rows] > 0).astype(np.float32).T.tocsr()  # (h, m)
    counts = np.asarray(fire.sum(1)).ravel()
    active = np.flatnonzero(counts > 0)
    labels = np.full(h, -1, dtype=np.int64)
    if len(active) == 0 or n_clusters < 1:
        return labels
    x = sp.diags(1.0 / np.sqrt(counts[active]).astype(np.float32)) @ fire[active]
    k = min(n_clusters, len(active))
    # k-means++ start: each next centre drawn ∝ squared distance to the nearest chosen one.
    centres = [int(rng.integers(len(active)))]
    best = np.asarray(x @ x[centres[0]].T.toarray()).ravel()
    for _ in range(1, k):
        d2 = np.maximum(2.0 - 2.0 * best, 0.0)
        if d2.sum() <= 0:
            break
        c = int(rng.choice(len(active), p=d2 / d2.sum()))
        centres.append(c)
        best = np.maximum(best, np.asarray(x @ x[c].T.toarray()).ravel())
    c_km = x[centres].toarray()
    assign = np.zeros(len(active), dtype=np.int64)
    for it in range(iterations):
        new = np.asarray(x @ c_km.T).argmax(1)
        if it and np.array_equal(new, assign):
            break
        assign = new
        member = sp.csr_matrix(
            (np.ones(len(assign), np.float32), (assign, np.arange(len(assign)))),
            shape=(len(c_km), len(assign)),
        )
        sums = (member @ x).toarray()
        norms = np.linalg.norm(sums, axis=1)
        keep = norms > 0  # an emptied cluster keeps its centre
        c_km[keep] = sums[keep] / norms[keep, None]
        if tick is not None:
            tick()
    sizes = np.bincount(assign, minlength=len(c_km))
    order = np.lexsort((np.arange(len(sizes)), -sizes))
    renumber = np.empty(len(sizes), dtype=np.int64)
    renumber[order] = np.arange(len(sizes))
    labels[active] = renumber[assign]
    return labels


# --------------------------------------------------------------------------- the atlas
@dataclasses.dataclass
class AtlasRules:
    alpha: float = 0.05  # BH q-value for "significant"
    min_auroc: float = 0.7  # |AUROC − 0.5| ≥ min_auroc − 0.5 to name a binary association
    min_rho: float = 0.3  # |ρ| ≥ min_rho to name an ordinal association
    max_name_parts: int = 2  # associations in a name
    top_associations: int = 5  # associations listed per latent in atlas.json


@dataclasses.dataclass
class Atlas:
    h: int
    n_images: int
    labels: list[Label]
    skipped_labels: dict[str, str]
    columns: dict[str, np.ndarray]  # per-latent columns of atlas.csv
    effect: np.ndarray  # (h, L) AUROC (binary) or ρ (ordinal)
    p: np.ndarray  # (h, L)
    q: np.ndarray  # (h, L)
    names: list[str]
    flags: list[list[str]]
    associations: list[list[dict[str, Any]]]  # per latent, strongest first

    def table(self) -> Any:
        import pandas as pd

        cols: dict[str, Any] = {
            "latent": np.arange(self.h),
            "name": self.names,
            "flags": [",".join(f) for f in self.flags],
        }
        cols.update(self.columns)
        for k, lab in enumerate(self.labels):
            stat = "auroc" if lab.kind == "binary" else "rho"
            cols[f"{lab.name}_{stat}"] = self.effect[:, k]
            cols[f"{lab.name}_q"] = self.q[:, k]
        return pd.DataFrame(cols)


def strength(effect: np.ndarray, kinds: Sequence[str]) -> np.ndarray:
    """Comparable association strength in [0, 1]: 2|AUROC − 0.5| (Somers' D) or |ρ|."""
    binary = np.array([k == "binary" for k in kinds])
    return np.where(binary[None, :], 2.0 * np.abs(effect - 0.5), np.abs(effect))


def build_atlas(
    mean_nh: sp.csr_matrix,
    labels: Sequence[Label],
    *,
    max_nh: sp.csr_matrix | None = None,
    spatial: dict[str, np.ndarray] | None = None,
    logit_effects: dict[str, np.ndarray] | None = None,
    n_clusters: int = 200,
    cluster_images: int = 2000,
    seed: int = 0,
    rules: AtlasRules | None = None,
    skipped_labels: dict[str, str] | None = None,
    progress: bool = True,
) -> Atlas:
    """Everything in the module docstring for the given images (rows of `mean_nh`)."""
    from tqdm.auto import tqdm

    rules = rules or AtlasRules()
    n, h = mean_nh.shape
    if n < 3:
        raise MammoSaeError(f"the atlas needs at least 3 images, got {n}")
    for lab in labels:
        if lab.values.shape != (n,):
            raise MammoSaeError(f"label {lab.name!r} has {lab.values.size} values for {n} images")
    bar = tqdm(total=4 + (15 if n_clusters else 0), desc="atlas", unit="step", disable=not progress)
    cols: dict[str, np.ndarray] = dict(activity(mean_nh, max_nh))
    bar.update()
    r = column_ranks(mean_nh)
    bar.update()
    effect = np.full((h, len(labels)), np.nan)
    p = np.full((h, len(labels)), np.nan)
    for kind, test in (("binary", auroc_test), ("ordinal", spearman_test)):
        idx = [k for k, lab in enumerate(labels) if lab.kind == kind]
        if idx:
            e, pv = test(r, np.stack([labels[k].values for k in idx], axis=1))
            effect[:, idx], p[:, idx] = e, pv
    q = bh_fdr(p)
    bar.update()
    spatial = dict(spatial or {})
    for key in ("com_across", "com_down", "off_breast", "border_fraction", "marker_box_share"):
        cols[key] = np.asarray(spatial.get(key, np.full(h, np.nan)), dtype=np.float64)
    for model, v in (logit_effects or {}).items():
        v = np.asarray(v, dtype=np.float64)
        if v.shape != (h,):
            raise MammoSaeError(f"logit effect of {model!r} has {v.size} values for h = {h}")
        cols[f"logit_{model}"] = v
    names, flags, assoc = _describe(cols, labels, effect, q, rules)
    bar.update()
    cols["cluster"] = (
        coactivation_clusters(
            mean_nh, n_clusters, max_images=cluster_images, seed=seed, tick=bar.update
        )
        if n_clusters
        else np.full(h, -1, dtype=np.int64)
    )
    bar.close()
    return Atlas(
        h=h,
        n_images=n,
        labels=list(labels),
        skipped_labels=dict(skipped_labels or {}),
        columns=cols,
        effect=effect,
        p=p,
        q=q,
        names=names,
        flags=flags,
        associations=assoc,
    )


def _describe(
    cols: dict[str, np.ndarray],
    labels: Sequence[Label],
    effect: np.ndarray,
    q: np.ndarray,
    rules: AtlasRules,
) -> tuple[list[str], list[list[str]], list[list[dict[str, Any]]]]:
    """Names, flags and sorted association lists (deterministic; no language model)."""
    h = effect.shape[0]
    kinds = [lab.kind for lab in labels]
    s = strength(effect, kinds)
    threshold = np.array(
        [2 * (rules.min_auroc - 0.5) if k == "binary" else rules.min_rho for k in kinds]
    )
    with np.errstate(invalid="ignore"):
        named = (q < rules.alpha) & (s >= threshold[None, :])
    # Strongest first; among equals the smaller q-value, then the label's order.
    q_key = np.nan_to_num(q, nan=2.0)
    names, flags, assoc = [], [], []
    for j in range(h):
        order = np.lexsort((np.arange(len(labels)), q_key[j], -np.nan_to_num(s[j], nan=-1.0)))
        entries = []
        for k in order[: rules.top_associations]:
            if not np.isfinite(q[j, k]):
                continue
            lab = labels[k]
            entries.append(
                {
                    "label": lab.name,
                    "kind": lab.kind,
                    "stat": "auroc" if lab.kind == "binary" else "rho",
                    "value": float(effect[j, k]),
                    "q": float(q[j, k]),
                    "sign": "+" if (effect[j, k] > (0.5 if lab.kind == "binary" else 0)) else "−",
                    "significant": bool(q[j, k] < rules.alpha),
                    "named": bool(named[j, k]),
                }
            )
        assoc.append(entries)
        parts = []
        for k in order:
            if len(parts) >= rules.max_name_parts or not named[j, k]:
                break
            lab = labels[k]
            positive = effect[j, k] > (0.5 if lab.kind == "binary" else 0.0)
            word = lab.words()[0 if positive else 1]
            stat = f"AUROC {effect[j, k]:.2f}" if lab.kind == "binary" else f"ρ {effect[j, k]:.2f}"
            parts.append(f"{word} ({stat})")
        where, f = _spatial_words(cols, j)
        # A marker latent: an attribute is its strongest named association (a Mass latent whose
        # AUROC for the marker is high only because the marker follows Mass is not one).
        first = order[0] if len(order) else None
        if (
            first is not None
            and labels[first].attribute
            and named[j, first]
            and effect[j, first] > 0.5
            and CONFOUNDER_FLAG not in f
        ):
            f.insert(0, CONFOUNDER_FLAG)
        if cols["images_active"][j] == 0:
            names.append("dead (never active)")
            flags.append(["dead"])
            continue
        names.append(" · ".join((parts or ["unexplained"]) + where))
        flags.append(f)
    return names, flags, assoc


def _spatial_words(cols: dict[str, np.ndarray], j: int) -> tuple[list[str], list[str]]:
    words, flags = [], []
    down, across = cols["com_down"][j], cols["com_across"][j]
    if cols["marker_box_share"][j] >= SPATIAL_SHARE:
        words.append("on the marker")
        flags.append(CONFOUNDER_FLAG)
    if cols["off_breast"][j] >= SPATIAL_SHARE:
        words.append("off-breast")
        flags.append("off_breast")
    if cols["border_fraction"][j] >= SPATIAL_SHARE:
        words.append("frame border")
        flags.append("border")
    if np.isfinite(down) and (down < THIRD or down > 1 - THIRD):
        words.append("upper" if down < THIRD else "lower")
    if np.isfinite(across) and (across < THIRD or across > 1 - THIRD):
        words.append("chest wall" if across < THIRD else "anterior")
    return words, flags


def planted_first(atlas: Atlas) -> list[str]:
    """Label names in the order the planted/known concepts come (findings, attributes such as
    the phantom's marker, density, BI-RADS, view, laterality, then user labels): for tables."""
    attributes = [lab.name for lab in atlas.labels if lab.attribute]
    known = [*FINDING_CONCEPTS, *attributes, "density", "birads", "view", "laterality"]
    rank = {name: i for i, name in enumerate(known)}
    return sorted((lab.name for lab in atlas.labels), key=lambda x: (rank.get(x, len(rank)), x))


def spatial_from_summaries(summaries: Any) -> dict[str, np.ndarray]:
    """The spatial columns from a `LatentSummaries` (off-breast and marker-box shares, centre of
    mass, border share); NaN where the summaries lack what a column needs."""
    prof = summaries.spatial_profile() if hasattr(summaries, "spatial_profile") else {}
    return {
        "off_breast": summaries.off_breast_score(),
        "marker_box_share": summaries.confounder_score(),
        **prof,
    }


def to_json(atlas: Atlas, *, alpha: float = 0.05, top_members: int = 10) -> dict[str, Any]:
    """atlas.json's body (without config/provenance): labels, per-latent entries, clusters."""
    cols = atlas.columns

    def num(x: Any) -> Any:
        x = float(x)
        return x if math.isfinite(x) else None

    latents = []
    scalar = [k for k in cols if k != "cluster"]
    for j in range(atlas.h):
        e: dict[str, Any] = {
            "latent": j,
            "name": atlas.names[j],
            "flags": atlas.flags[j],
            "cluster": int(cols["cluster"][j]),
        }
        e.update({k: num(cols[k][j]) for k in scalar})
        e["associations"] = atlas.associations[j]
        latents.append(e)
    clusters = []
    cl = cols["cluster"]
    for c in range(int(cl.max()) + 1 if (cl >= 0).any() else 0):
        members = np.flatnonzero(cl == c)
        members = members[np.argsort(-cols["firing_rate"][members], kind="stable")]
        named = [
            atlas.names[m].split(" (")[0]
            for m in members
            if not atlas.names[m].startswith(("unexplained", "dead"))
        ]
        common = max(set(named), key=lambda w: (named.count(w), w)) if named else "unexplained"
        clusters.append(
            {
                "cluster": c,
                "size": int(len(members)),
                "label": common,
                "members": [int(m) for m in members[:top_members]],
            }
        )
    return {
        "h": atlas.h,
        "n_images": atlas.n_images,
        "labels": [
            {
                "name": lab.name,
                "kind": lab.kind,
                "statistic": "auroc" if lab.kind == "binary" else "spearman_rho",
                "n_positive": int(lab.values.sum()) if lab.kind == "binary" else None,
                "values": sorted(set(np.unique(lab.values).tolist())),
            }
            for lab in atlas.labels
        ],
        "label_order": planted_first(atlas),
        "skipped_labels": atlas.skipped_labels,
        "n_tests": int(np.isfinite(atlas.p).sum()),
        "n_significant": int((np.nan_to_num(atlas.q, nan=1.0) < alpha).sum()),
        "latents": latents,
        "clusters": clusters,
    }
