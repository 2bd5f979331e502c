"""Top-k latent interventions (the paper's Figure 2) and targeted latent edits.

A latent mask m is applied at every position before decoding and the edited map replaces the
original; pooling and the linear concept head follow. Because the head is linear on the
spatial mean and the decoder is linear (the pooled identity, docs/architecture.md):

    logit(m) = (W_decᵀ w) · (mean_hw(z) ⊙ m) + w · b_dec + b

so a whole sweep needs only each image's mean latent vector (`summaries.mean_nh`). The union
sets U_k = T_k(0) ∪ T_k(1) grow with k, so every k is one column of a (h, K) 0/1 matrix and
the sweep is a single sparse × dense product. `exact_decode_logits` does it the long way
(decode every patch, replace the map, mean, head) and the tests prove both agree.

- activated (`on`):  keep U_k, zero the rest.  k = 0 → constant logit (AUROC 0.5); k = h → plain SAE.
- deactivated (`off`): zero U_k.                k = 0 → plain SAE; k = h → constant logit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp

from .. import metrics
from ..errors import MammoSaeError
from . import DEFAULT_KS

Mode = Literal["on", "off"]


@dataclasses.dataclass(frozen=True)
class LinearHead:
    """Binary concept head on pooled features: logit = w · pooled + b."""

    w_d: np.ndarray  # float64 (d,)
    b: float
    concept: str | None = None


def head_from_classifier(classifier: Any) -> LinearHead:
    """The concept logit of a `ConceptClassifier` (n_class 1: that logit; 2: logit1 − logit0)."""
    weight = classifier.head.weight.detach().double().cpu().numpy()
    bias = (
        classifier.head.bias.detach().double().cpu().numpy()
        if classifier.head.bias is not None
        else np.zeros(weight.shape[0])
    )
    if weight.shape[0] == 1:
        w, b = weight[0], float(bias[0])
    elif weight.shape[0] == 2:  # softmax over two classes: P(1) is monotone in logit1 − logit0
        w, b = weight[1] - weight[0], float(bias[1] - bias[0])
    else:
        raise MammoSaeError(
            f"interventions need a binary head; this classifier has "
            f"{weight.shape[0]} outputs (multi-class concepts are not supported)"
        )
    return LinearHead(w_d=w, b=b, concept=getattr(classifier, "concept", None))


def load_head(path: str | Path) -> LinearHead:
    from ..models.checkpoints import load_classifier

    return head_from_classifier(load_classifier(path))


def sae_readout(sae: Any, head: LinearHead) -> tuple[np.ndarray, float]:
    """(v_h, c) with logit = v · mean(z ⊙ m) + c: v = W_decᵀ w, c = w · b_dec + b.

    An SAE with input normalisation is folded first (decode = s·(W_dec z + b_dec) + μ is still
    affine in z), so W_dec and b_dec are in raw feature units.
    """
    if (
        hasattr(sae, "folded")
        and getattr(getattr(sae, "cfg", None), "normalisation", "none") != "none"
    ):
        sae = sae.folded()
    W_dec = _np(sae.W_dec)
    b_dec = _np(sae.b_dec)
    if W_dec.shape[0] != len(head.w_d):
        raise MammoSaeError(
            f"SAE decoder outputs d = {W_dec.shape[0]} but the head expects "
            f"d = {len(head.w_d)} (wrong model/SAE pair?)"
        )
    return W_dec.T @ head.w_d, float(head.w_d @ b_dec + head.b)


def _np(t: Any) -> np.ndarray:
    if hasattr(t, "detach"):
        t = t.detach().double().cpu().numpy()
    return np.asarray(t, dtype=np.float64)


def normalise_ks(ks: Iterable[int], h: int) -> list[int]:
    """Clip k to [0, h] and drop duplicates, keeping order (so the default grid ends at h)."""
    out: list[int] = []
    for k in ks:
        if int(k) < 0:
            raise MammoSaeError(f"k must be ≥ 0, got {k}")
        kk = min(int(k), h)
        if kk not in out:
            out.append(kk)
    return sorted(out)


def entry_rank(rankings: Sequence[np.ndarray], h: int) -> np.ndarray:
    """For each latent, the smallest k whose union U_k contains it minus 1 (h if never)."""
    entry = np.full(h, h, dtype=np.int64)
    for order in rankings:
        order = np.asarray(order, dtype=np.int64)
        if len(order) and (order.max() >= h or order.min() < 0):
            raise MammoSaeError(f"ranking holds latent indices outside [0, {h})")
        entry[order] = np.minimum(entry[order], np.arange(len(order)))
    return entry


def union_masks(entry_h: np.ndarray, ks: Sequence[int]) -> sp.csc_matrix:
    """(h, K) 0/1 matrix: column j marks U_{ks[j]}."""
    cols = [np.flatnonzero(entry_h < k) for k in ks]
    rows = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    col_idx = np.repeat(np.arange(len(ks)), [len(c) for c in cols])
    return sp.csc_matrix((np.ones(len(rows)), (rows, col_idx)), shape=(len(entry_h), len(ks)))


def masked_logits(
    mean_nh: sp.csr_matrix | np.ndarray,
    v_h: np.ndarray,
    c: float,
    masks_hk: sp.spmatrix | np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Fast path: (keep-logits (K, n), drop-logits (K, n)) for K latent masks at once."""
    contrib_nh = sp.csr_matrix(mean_nh, dtype=np.float64).multiply(v_h[None, :]).tocsr()
    dense_hk = (
        masks_hk.toarray() if sp.issparse(masks_hk) else np.asarray(masks_hk, dtype=np.float64)
    )
    # Both sides as products (not total − kept): a full drop must give exactly the constant c.
    on_kn = np.asarray(contrib_nh @ dense_hk).T + c
    off_kn = np.asarray(contrib_nh @ (1.0 - dense_hk)).T + c
    return on_kn, off_kn


def exact_decode_logits(
    store: Any,
    sae: Any,
    head: LinearHead,
    rows: Sequence[int],
    masks_hk: np.ndarray,
    *,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Reference path: per image encode every stored patch, mask, decode, mean, head.

    Returns (keep-logits, drop-logits), each (K, n). Costs K decodes of every patch.
    """
    import torch
    from tqdm.auto import tqdm

    masks = torch.as_tensor(
        np.asarray(masks_hk.toarray() if sp.issparse(masks_hk) else masks_hk), dtype=torch.float32
    ).T  # (K, h)
    w = torch.as_tensor(head.w_d, dtype=torch.float64)
    on = np.zeros((masks.shape[0], len(rows)))
    off = np.zeros_like(on)
    for col, i in enumerate(tqdm(list(rows), desc="exact decode", disable=not progress)):
        acts_pd, _, _ = store.image_patches(int(i))
        x_pd = torch.from_numpy(np.array(acts_pd, dtype=np.float32))
        with torch.no_grad():
            z_ph = sae.encode(x_pd).float()
            for kk in range(masks.shape[0]):
                for out, m_h in ((on, masks[kk]), (off, 1.0 - masks[kk])):
                    x_hat_pd = sae.decode(z_ph * m_h).double()  # the edited map
                    out[kk, col] = float(x_hat_pd.mean(0) @ w) + head.b
    return on, off


@dataclasses.dataclass
class SweepResult:
    ks: list[int]
    union_size: list[int]
    metrics: dict[str, dict[str, np.ndarray]]  # mode -> curves_with_ci output
    n: int
    n_pos: int

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for mode, m in self.metrics.items():
            for j, k in enumerate(self.ks):
                out.append(
                    {
                        "mode": mode,
                        "k": k,
                        "union_size": self.union_size[j],
                        **{key: float(val[j]) for key, val in m.items()},
                    }
                )
        return out


def sweep(
    mean_nh: sp.csr_matrix | np.ndarray,
    y: np.ndarray,
    v_h: np.ndarray,
    c: float,
    rankings: Sequence[np.ndarray],
    ks: Sequence[int] = DEFAULT_KS,
    *,
    modes: Sequence[Mode] = ("on", "off"),
    n_boot: int = 1000,
    seed: int = 0,
    logits: tuple[np.ndarray, np.ndarray] | None = None,
) -> SweepResult:
    """Top-k activated/deactivated sweep with bootstrap CIs (same resamples for every curve).

    `rankings` are the class-0 and class-1 orders (training split); `mean_nh`/`y` the
    evaluation images (test split). `logits` overrides the fast path (e.g. exact decode).
    """
    h = len(v_h)
    ks = normalise_ks(ks, h)
    entry = entry_rank(rankings, h)
    masks = union_masks(entry, ks)
    on_kn, off_kn = logits if logits is not None else masked_logits(mean_nh, v_h, c, masks)
    by_mode = {"on": on_kn, "off": off_kn}
    curves = {
        mode: metrics.curves_with_ci(y, by_mode[mode], n_boot=n_boot, seed=seed) for mode in modes
    }
    return SweepResult(
        ks=ks,
        union_size=[int((entry < k).sum()) for k in ks],
        metrics=curves,
        n=len(y),
        n_pos=int(np.sum(y)),
    )


def edit_set(
    mean_nh: sp.csr_matrix | np.ndarray,
    y: np.ndarray,
    v_h: np.ndarray,
    c: float,
    latents: Sequence[int],
    mode: Mode,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    attribute: np.ndarray | None = None,
) -> dict[str, Any]:
    """A targeted edit: keep only (`on`) or zero (`off`) the given latents; plain SAE beside it.

    With a binary `attribute` per image (e.g. the phantom's marker) the result also gives the
    classifier's shortcut: the AUROC of its logit for the attribute among concept-negative images
    (0.5 = the attribute does not move the score), before and after the edit."""
    h = len(v_h)
    lat = np.asarray(sorted({int(j) for j in latents}), dtype=np.int64)
    if len(lat) == 0:
        raise MammoSaeError("no latents given")
    if lat.min() < 0 or lat.max() >= h:
        raise MammoSaeError(
            f"latent indices outside [0, {h}): {[int(j) for j in lat if j < 0 or j >= h]}"
        )
    mask = np.zeros((h, 2))
    mask[lat, 0] = 1.0  # column 0: the set; column 1: empty set (on) / all kept (off)
    on_kn, off_kn = masked_logits(mean_nh, v_h, c, mask)
    edited = on_kn[0] if mode == "on" else off_kn[0]
    plain = off_kn[1]  # dropping nothing = the plain SAE
    m = metrics.curves_with_ci(y, np.stack([plain, edited]), n_boot=n_boot, seed=seed)
    cells = {key: [float(v) for v in val] for key, val in m.items()}
    out = {
        "latents": lat.tolist(),
        "mode": mode,
        "n": int(len(y)),
        "n_pos": int(np.sum(y)),
        "plain_sae": {k: v[0] for k, v in cells.items()},
        "edited": {k: v[1] for k, v in cells.items()},
        "auroc_change": cells["auroc"][1] - cells["auroc"][0],
        "logit_shift_mean": float(np.mean(edited - plain)),
    }
    if attribute is not None:
        if np.shape(attribute) != np.shape(y):
            raise MammoSaeError(
                f"attribute has {np.size(attribute)} values for {np.size(y)} images"
            )
        neg = np.asarray(y) == 0
        a = np.asarray(attribute, dtype=np.int64)[neg]
        if len(a) == 0 or a.min() == a.max():
            out["shortcut"] = {
                "skipped": "the concept's negatives all have the same attribute value"
            }
        else:
            out["shortcut"] = {
                "attribute_auroc_among_negatives": {
                    "plain_sae": metrics.auroc(a, plain[neg]),
                    "edited": metrics.auroc(a, edited[neg]),
                },
                "n_negatives": int(neg.sum()),
                "n_with_attribute": int(a.sum()),
            }
    return out
