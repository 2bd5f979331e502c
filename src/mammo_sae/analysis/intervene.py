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
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

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


def sae_width(sae: Any) -> int:
    """h, the number of latents (W_dec is (d, h) in every supported SAE)."""
    return int(sae.W_dec.shape[1])


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


class MapReadout(Protocol):
    """The concept logit of B (edited) maps of one image given as patch vectors at the store's
    layer: `(x_bpd, rows_p, cols_p, grid_hw) -> logits (B,)` float64."""

    path: str

    def __call__(
        self, x_bpd: Any, rows_p: np.ndarray, cols_p: np.ndarray, grid_hw: tuple[int, int]
    ) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class PooledReadout:
    """Final layer: mean over the stored positions, then the linear head (decode every patch
    and replace the map, as the reference splices the SAE)."""

    head: LinearHead
    path: str = "exact-decode"

    def __call__(
        self, x_bpd: Any, rows_p: np.ndarray, cols_p: np.ndarray, grid_hw: tuple[int, int]
    ) -> np.ndarray:
        import torch

        w = torch.as_tensor(self.head.w_d, dtype=torch.float64, device=x_bpd.device)
        return (x_bpd.double().mean(1) @ w + self.head.b).cpu().numpy()


@dataclasses.dataclass(frozen=True)
class NetworkReadout:
    """An earlier layer: the map goes back on its grid and through the rest of the classifier's
    network (`EfficientNet.forward_from`), then the pooled head. The pooled identity holds only
    at the final layer, so this is the one exact path below it."""

    classifier: Any  # ConceptClassifier, eval mode, on the SAE's device
    layer: str
    head: LinearHead

    @property
    def path(self) -> str:
        return f"network from {self.layer}"

    def __call__(
        self, x_bpd: Any, rows_p: np.ndarray, cols_p: np.ndarray, grid_hw: tuple[int, int]
    ) -> np.ndarray:
        import torch

        gh, gw = grid_hw
        if len(rows_p) != gh * gw:
            raise MammoSaeError(
                f"the store holds {len(rows_p)} of the {gh}x{gw} positions of an image: running "
                "the rest of the network needs every position (extract without --subsample)"
            )
        b, _, d = x_bpd.shape
        grid = x_bpd.new_zeros(b, d, gh, gw)
        grid[:, :, torch.as_tensor(rows_p), torch.as_tensor(cols_p)] = x_bpd.transpose(1, 2)
        dtype = next(self.classifier.parameters()).dtype
        with torch.no_grad():
            final = self.classifier.encoder.forward_from(grid.to(dtype), self.layer)
        w = torch.as_tensor(self.head.w_d, dtype=torch.float64, device=final.device)
        return (final.double().mean(dim=(2, 3)) @ w + self.head.b).cpu().numpy()


def layer_readout(classifier: Any, layer: str, device: Any = "cpu") -> MapReadout:
    """The exact readout of maps at `layer`: `PooledReadout` at final, else `NetworkReadout`."""
    head = head_from_classifier(classifier)
    if layer == "final":
        return PooledReadout(head)
    return NetworkReadout(classifier.to(device).eval(), layer, head)


# Edited maps decoded per batch: bounds memory at (chunk, positions, h) latents.
_DECODE_ELEMENTS = 1 << 25


def exact_logits(
    store: Any,
    sae: Any,
    readout: MapReadout,
    rows: Sequence[int],
    masks_hk: np.ndarray | sp.spmatrix | None = None,
    *,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Reference path: per image encode every stored patch, (mask,) decode, read out.

    Always "original" (n,) (the stored map itself) and "sae" (n,) (the plain reconstruction,
    no error term); with masks also "on" and "off", each (K, n): keep / zero column k's latents
    before decoding. Costs 2K + 2 readouts of every image.
    """
    import torch
    from tqdm.auto import tqdm

    from ..devices import module_device

    device = module_device(sae)
    masks = None
    if masks_hk is not None:
        dense = masks_hk.toarray() if sp.issparse(masks_hk) else np.asarray(masks_hk)
        masks = torch.as_tensor(dense, dtype=torch.float32, device=device).T  # (K, h)
        masks = torch.cat([masks, 1.0 - masks])  # keep rows, then drop rows
    k = 0 if masks is None else masks.shape[0] // 2
    out = {"original": np.zeros(len(rows)), "sae": np.zeros(len(rows))}
    edited = np.zeros((2 * k, len(rows)))
    for col, i in enumerate(tqdm(list(rows), desc="exact decode", disable=not progress)):
        acts_pd, rows_p, cols_p = store.image_patches(int(i))
        grid = store.grid_hw(int(i))
        x_pd = torch.from_numpy(np.array(acts_pd, dtype=np.float32)).to(device)
        with torch.no_grad():
            z_ph = sae.encode(x_pd).float()
            plain = torch.stack([x_pd, sae.decode(z_ph).float()])
            both = readout(plain, rows_p, cols_p, grid)
            out["original"][col], out["sae"][col] = both[0], both[1]
            if masks is None:
                continue
            chunk = max(1, _DECODE_ELEMENTS // max(1, z_ph.numel()))
            for lo in range(0, len(masks), chunk):
                z_bph = z_ph[None] * masks[lo : lo + chunk, None, :]
                b, p, h = z_bph.shape  # one decode call for the whole chunk of edited maps
                x_bpd = sae.decode(z_bph.reshape(b * p, h)).float().reshape(b, p, -1)
                edited[lo : lo + len(z_bph), col] = readout(x_bpd, rows_p, cols_p, grid)
    if masks is not None:
        out["on"], out["off"] = edited[:k], edited[k:]
    return out


def exact_decode_logits(
    store: Any,
    sae: Any,
    head: LinearHead,
    rows: Sequence[int],
    masks_hk: np.ndarray | sp.spmatrix,
    *,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(keep-logits, drop-logits), each (K, n), the long way at the final layer: decode every
    patch, replace the map, mean, head. The tests prove it equals the pooled identity."""
    got = exact_logits(store, sae, PooledReadout(head), rows, masks_hk, progress=progress)
    return got["on"], got["off"]


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


# Latent masks (h, K) -> (keep-logits, drop-logits), each (K, n): the pooled identity
# (`pooled_logits`) or an exact path (`exact_logits`).
MaskedLogits = Callable[[sp.spmatrix | np.ndarray], tuple[np.ndarray, np.ndarray]]


def pooled_logits(mean_nh: sp.csr_matrix | np.ndarray, v_h: np.ndarray, c: float) -> MaskedLogits:
    """The fast path of `sweep`/`edit_set`: `masked_logits` on the images' mean latent vectors
    with the readout (v_h, c) of `sae_readout`."""
    return lambda masks: masked_logits(mean_nh, v_h, c, masks)


def sweep(
    y: np.ndarray,
    rankings: Sequence[np.ndarray],
    h: int,
    masked: MaskedLogits,
    ks: Sequence[int] = DEFAULT_KS,
    *,
    modes: Sequence[Mode] = ("on", "off"),
    n_boot: int = 1000,
    seed: int = 0,
) -> SweepResult:
    """Top-k activated/deactivated sweep of h latents with bootstrap CIs (the same resamples for
    every curve). `rankings` are the class-0 and class-1 orders (training split); `y` the
    evaluation images' labels (test split); `masked` gives their logits for latent masks:
    `pooled_logits` (the fast identity at the final layer) or an exact path (`exact_logits`)."""
    ks = normalise_ks(ks, h)
    entry = entry_rank(rankings, h)
    on_kn, off_kn = masked(union_masks(entry, ks))
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
    y: np.ndarray,
    h: int,
    masked: MaskedLogits,
    latents: Sequence[int],
    mode: Mode,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    attribute: np.ndarray | None = None,
) -> dict[str, Any]:
    """A targeted edit of h latents: keep only (`on`) or zero (`off`) the given latents; plain
    SAE beside it. `masked` gives the logits for latent masks (as in `sweep`).

    With a binary `attribute` per image (e.g. the phantom's marker) the result also gives the
    classifier's shortcut: the AUROC of its logit for the attribute among concept-negative images
    (0.5 = the attribute does not move the score), before and after the edit."""
    lat = np.asarray(sorted({int(j) for j in latents}), dtype=np.int64)
    if len(lat) == 0:
        raise MammoSaeError("no latents given")
    if lat.min() < 0 or lat.max() >= h:
        raise MammoSaeError(
            f"latent indices outside [0, {h}): {[int(j) for j in lat if j < 0 or j >= h]}"
        )
    mask = np.zeros((h, 2))
    mask[lat, 0] = 1.0  # column 0: the set; column 1: empty set (on) / all kept (off)
    on_kn, off_kn = masked(mask)
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
