"""Image retrieval: nearest images by SAE latent fingerprint, beside the raw pooled features.

Every score is computed from per-image vectors already on disk (no backbone or SAE pass), by
default centred on the searched images' mean (`center`): every image of one scanner and
protocol shares a large common component (latents active everywhere, the mean patch vector),
which can put every raw cosine within 1e-8 of 1 (the small phantom chain of
`benchmarks/retrieval_phantom.py`), leaving their order to rounding.

- `sparse_cosine`: cosine similarity of the images' (centred) mean latent vectors
  (`summaries.mean_nh`, the paper's per-image quantity), computed on the sparse matrix;
- `sparse_overlap`: the share of the query's top `overlap_top` active latents that are also
  among the candidate's; an image's top latents are those furthest above their mean over the
  images (centred) or the largest (raw); ties (the score takes few values) are broken by
  `sparse_cosine`;
- `dense_cosine`: cosine similarity of the (centred) raw per-image mean patch vectors (the
  store's `pooled.npy`), the baseline a fingerprint has to beat.

A query never retrieves itself; optionally it does not retrieve images of its own patient
either (VinDr: the other view of the same breast shares its findings). Remaining ties are
broken by image order, so results are deterministic. `precision_at_k` is the share of the k
nearest images that are positive for a label, averaged over the label's positive queries
(SAIL-style label retrieval). See docs/analysis.md ("Retrieval").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

from ..errors import MammoSaeError

SCHEMA_VERSION = 1
METHODS: dict[str, str] = {
    "sparse_cosine": "cosine of the per-image mean SAE latent vectors",
    "sparse_overlap": "share of the query's top active latents among the image's top active "
    "latents (ties broken by sparse_cosine)",
    "dense_cosine": "cosine of the per-image mean raw patch vectors (store pooled.npy)",
}
# Query chunk size: at most this many (query, candidate) scores held per method at once.
CHUNK_SCORES = 4_000_000


@dataclasses.dataclass
class Neighbours:
    """Per query: the k nearest candidates (positions in the candidate list) and their scores."""

    positions_qk: np.ndarray  # int64
    scores_qk: np.ndarray  # float64


def _dense(x: sp.spmatrix | np.ndarray) -> np.ndarray:
    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)


class CosineIndex:
    """Cosine similarity of rows of an (n, x) matrix, optionally centred on its column means.

    Sparse input stays sparse: with centring, (a − μ)·(b − μ) = a·b − a·μ − b·μ + μ·μ, so
    only sparse products and (n,) vectors are needed (float64 throughout; the summaries hold
    float32, far coarser than the cancellation error). Zero rows (after centring) score 0."""

    def __init__(self, m_nx: sp.spmatrix | np.ndarray, *, center: bool) -> None:
        self.sparse = sp.issparse(m_nx)
        if self.sparse:
            m = sp.csr_matrix(m_nx, dtype=np.float64)
            mu = np.asarray(m.mean(0)).ravel() if center else np.zeros(m.shape[1])
            self.a_n = m @ mu
            self.c = float(mu @ mu)
            sq_n = np.asarray(m.multiply(m).sum(1)).ravel() - 2 * self.a_n + self.c
        else:
            m = np.asarray(m_nx, dtype=np.float64)
            m = m - m.mean(0) if center else m
            sq_n = (m * m).sum(1)
        self.m = m
        self.center = center
        self.norm_n = np.sqrt(np.maximum(sq_n, 0.0))

    def scores(self, query_positions: Sequence[int] | np.ndarray) -> np.ndarray:
        """(q, n) cosine of the query rows with every row."""
        q = np.asarray(query_positions, dtype=np.int64)
        dots = _dense(self.m[q] @ self.m.T)
        if self.sparse and self.center:
            dots += self.c - self.a_n[q][:, None] - self.a_n[None, :]
        denom = self.norm_n[q][:, None] * self.norm_n[None, :]
        return np.divide(dots, denom, out=np.zeros_like(dots), where=denom > 0)


def cosine_scores(
    m_nx: sp.spmatrix | np.ndarray, query_positions: Sequence[int], *, center: bool = False
) -> np.ndarray:
    """(q, n) cosine similarity of the query rows of `m_nx` with every row of it."""
    return CosineIndex(m_nx, center=center).scores(query_positions)


def top_latent_sets(mean_nh: sp.spmatrix, top: int, *, centre: bool = False) -> sp.csr_matrix:
    """(n, h) 0/1 matrix: each row's `top` largest active entries (fewer if fewer are active;
    equal values broken by latent index). With `centre`, active entries are ranked by how far
    they lie above the latent's mean over the rows (z − μ_j), so that latents active on every
    image at a similar level do not fill every image's set."""
    m = sp.csr_matrix(mean_nh, dtype=np.float64)
    m.eliminate_zeros()
    value = m.data - np.asarray(m.mean(0)).ravel()[m.indices] if centre else m.data
    indptr, indices = m.indptr, m.indices
    keep: list[np.ndarray] = []
    counts = np.zeros(m.shape[0], np.int64)
    for i in range(m.shape[0]):
        lo, hi = indptr[i], indptr[i + 1]
        order = np.lexsort((indices[lo:hi], -value[lo:hi]))[:top]
        keep.append(indices[lo:hi][order])
        counts[i] = len(order)
    cols = np.concatenate(keep) if keep else np.zeros(0, np.int32)
    return sp.csr_matrix((np.ones(len(cols)), cols, np.r_[0, np.cumsum(counts)]), shape=m.shape)


def overlap_scores(sets_nh: sp.csr_matrix, query_positions: Sequence[int]) -> np.ndarray:
    """(q, n) share of each query's top-latent set that each row's set also holds."""
    q = sets_nh[np.asarray(query_positions, dtype=np.int64)]
    shared = _dense(q @ sets_nh.T)
    size = np.asarray(q.sum(1), dtype=np.float64)
    return np.divide(shared, size, out=np.zeros_like(shared), where=size > 0)


def rank(
    score_qn: np.ndarray,
    k: int,
    *,
    exclude_qn: np.ndarray | None = None,
    tiebreak_qn: np.ndarray | None = None,
) -> Neighbours:
    """The k best-scoring candidates per query (excluded ones never), ties broken by
    `tiebreak_qn` (higher first) and then by position."""
    score = np.array(score_qn, dtype=np.float64)
    if exclude_qn is not None:
        score[exclude_qn] = -np.inf
    keys = (-score,) if tiebreak_qn is None else (-np.asarray(tiebreak_qn, np.float64), -score)
    order = np.lexsort(keys, axis=-1)[:, :k]  # stable: equal keys keep position order
    return Neighbours(order.astype(np.int64), np.take_along_axis(score, order, axis=1))


def neighbours(
    mean_nh: sp.spmatrix,
    pooled_nd: np.ndarray,
    query_positions: Sequence[int],
    k: int,
    *,
    overlap_top: int = 16,
    center: bool = True,
    groups_n: np.ndarray | None = None,
    progress: bool = False,
) -> dict[str, Neighbours]:
    """The k nearest candidates of each query by every method in METHODS.

    `mean_nh` and `pooled_nd` hold one row per candidate image; queries are positions in them.
    A query is never its own neighbour; with `groups_n` (e.g. patient ids) no candidate of the
    query's group is either. `center`: cosines of vectors centred on the candidates' mean, and
    overlap sets of each image's active latents furthest above their mean; else raw vectors."""
    from tqdm.auto import tqdm

    n = mean_nh.shape[0]
    if pooled_nd.shape[0] != n:
        raise MammoSaeError(f"{n} latent rows but {pooled_nd.shape[0]} pooled rows")
    queries = np.asarray(query_positions, dtype=np.int64)
    if len(queries) and (queries.min() < 0 or queries.max() >= n):
        raise MammoSaeError(f"query positions out of range for {n} candidates")
    k = min(int(k), n - 1)
    available = _available(queries, n, groups_n)
    if len(queries) and available.min() < k:
        raise MammoSaeError(
            f"k = {k} but a query has only {int(available.min())} candidates "
            "left after excluding itself (and its patient's images)"
        )
    sparse_index = CosineIndex(mean_nh, center=center)
    dense_index = CosineIndex(pooled_nd, center=center)
    sets = top_latent_sets(mean_nh, overlap_top, centre=center)
    parts: dict[str, list[Neighbours]] = {m: [] for m in METHODS}
    step = max(1, CHUNK_SCORES // max(n, 1))
    for lo in tqdm(
        range(0, len(queries), step),
        desc="retrieving",
        unit="chunk",
        disable=not progress or len(queries) <= step,
    ):
        q = queries[lo : lo + step]
        exclude = np.zeros((len(q), n), dtype=bool)
        exclude[np.arange(len(q)), q] = True
        if groups_n is not None:
            exclude |= groups_n[q][:, None] == groups_n[None, :]
        cos_sparse = sparse_index.scores(q)
        parts["sparse_cosine"].append(rank(cos_sparse, k, exclude_qn=exclude))
        parts["sparse_overlap"].append(
            rank(overlap_scores(sets, q), k, exclude_qn=exclude, tiebreak_qn=cos_sparse)
        )
        parts["dense_cosine"].append(rank(dense_index.scores(q), k, exclude_qn=exclude))
    return {
        m: Neighbours(
            np.concatenate([p.positions_qk for p in ps]) if ps else np.zeros((0, k), np.int64),
            np.concatenate([p.scores_qk for p in ps]) if ps else np.zeros((0, k)),
        )
        for m, ps in parts.items()
    }


def _available(queries: np.ndarray, n: int, groups_n: np.ndarray | None) -> np.ndarray:
    if groups_n is None:
        return np.full(len(queries), n - 1)
    _, inverse, counts = np.unique(groups_n, return_inverse=True, return_counts=True)
    return n - counts[inverse[queries]]


def precision_at_k(nb: Neighbours, y_n: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    """Mean over queries of the share of positives (y = 1) among each query's k nearest."""
    hits = np.asarray(y_n)[nb.positions_qk] == 1
    out = {}
    for k in ks:
        if k > hits.shape[1]:
            raise MammoSaeError(f"precision@{k} needs {k} neighbours; only {hits.shape[1]} ranked")
        out[int(k)] = float(hits[:, :k].mean()) if len(hits) else float("nan")
    return out


def latent_ranking(
    mean_nh: sp.spmatrix, latents: Sequence[int], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the k rows with the largest summed mean activation over `latents` (ties by
    position), and those sums."""
    lat = np.asarray(latents, dtype=np.int64)
    h = mean_nh.shape[1]
    bad = [int(j) for j in lat if j < 0 or j >= h]
    if bad or not len(lat):
        raise MammoSaeError(
            f"latent indices out of range for an SAE with h = {h}: {bad}"
            if bad
            else "no latents given"
        )
    score = np.asarray(sp.csc_matrix(mean_nh)[:, lat].sum(1), dtype=np.float64).ravel()
    order = np.argsort(-score, kind="stable")[:k]
    return order.astype(np.int64), score[order]
