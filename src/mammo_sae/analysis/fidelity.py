"""Fidelity: the concept head on original vs SAE-reconstructed features (the paper's Table 1).

Original logit = w · pooled + b with the store's pooled features (spatial mean of the full
map). SAE logit = the same head on the spatial mean of the reconstructed map, with no error
term added back (as the reference splices it), i.e. w · (W_dec · mean(z) + b_dec) + b by the
pooled identity. "Recovered" = (AUROC_SAE − 0.5)/(AUROC_orig − 0.5): the share of the head's
above-chance AUROC that survives the SAE, k = 0 (constant logit, AUROC 0.5) being the
ablation baseline. FVU, L0 and dead fraction are over the stored positions of the same images.

Below the final layer the pooled identity does not hold: the caller passes `logits` from
`intervene.exact_logits` with a `NetworkReadout` (the stored and the reconstructed map each run
through the rest of the classifier's network), and the result names that path.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import metrics
from ..errors import MammoSaeError
from .intervene import LinearHead, sae_readout
from .summaries import LatentSummaries


def fidelity(
    summaries: LatentSummaries,
    pooled_nd: np.ndarray,
    rows: np.ndarray,
    y: np.ndarray,
    sae: Any,
    head: LinearHead,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    logits: tuple[np.ndarray, np.ndarray] | None = None,
    path: str = "pooled-identity",
) -> dict[str, Any]:
    """AUROC/AUPRC (with bootstrap CIs, shared resamples) original vs SAE + FVU, L0, dead fraction.

    `logits` = (original, SAE), each (n,), overrides the pooled identity (named by `path`)."""
    rows = np.asarray(rows, dtype=np.int64)
    if logits is None:
        orig_n, sae_n = _pooled_identity_logits(summaries, pooled_nd, rows, sae, head)
    else:
        orig_n, sae_n = (np.asarray(v, dtype=np.float64) for v in logits)
        if not (np.isfinite(orig_n).all() and np.isfinite(sae_n).all()):
            raise MammoSaeError(f"{path}: the logits of the selected images contain NaN")
    m = metrics.curves_with_ci(y, np.stack([orig_n, sae_n]), n_boot=n_boot, seed=seed)
    pick = {key: (float(val[0]), float(val[1])) for key, val in m.items()}
    out: dict[str, Any] = {"n": int(len(y)), "n_pos": int(np.sum(y)), "path": path}
    for j, name in enumerate(("original", "sae")):
        out[name] = {key: val[j] for key, val in pick.items()}
    a_orig, a_sae = out["original"]["auroc"], out["sae"]["auroc"]
    out["recovered"] = (a_sae - 0.5) / (a_orig - 0.5) if a_orig != 0.5 else float("nan")
    out["auroc_drop"] = a_orig - a_sae
    out.update(summaries.reconstruction_stats(rows))
    frac = summaries.meta.get("subsample_fraction", 1.0)
    out["subsample_fraction"] = frac
    if frac not in (None, 1, 1.0):
        out["warning"] = (
            "store subsampled: the SAE side averages stored patches only while the "
            "original side uses the full-map pooled features; use a full store"
        )
    return out


def _pooled_identity_logits(
    summaries: LatentSummaries, pooled_nd: np.ndarray, rows: np.ndarray, sae: Any, head: LinearHead
) -> tuple[np.ndarray, np.ndarray]:
    pooled = np.asarray(pooled_nd, dtype=np.float64)[rows]
    if pooled.shape[1] != len(head.w_d):
        raise MammoSaeError(f"store d = {pooled.shape[1]} but the head expects d = {len(head.w_d)}")
    if not np.isfinite(pooled).all():
        raise MammoSaeError("pooled features of the selected images contain NaN (skipped images?)")
    v_h, c = sae_readout(sae, head)
    orig_n = pooled @ head.w_d + head.b
    sae_n = np.asarray(summaries.mean_rows(rows).astype(np.float64) @ v_h).ravel() + c
    return orig_n, sae_n
