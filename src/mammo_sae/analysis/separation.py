"""Latent separation (the paper's Figures 4/5) and automatic flags for confounding latents.

For each model, z̄(0) and z̄(1) are the class-mean latent vectors of its features through the
same SAE. Reported per model:

- `separation` = mean over the `top` most class-1-dominant latents of
  (z̄_t(1) − z̄_t(0)) / (z̄_t(1) + z̄_t(0)) ∈ [0, 1]: 1 when the concept's latents fire only on
  class 1 (the finetuned panels of Figs 4/5), near 0 when they fire on both classes alike;
- `global_separation` = Σ_t |z̄_t(1) − z̄_t(0)| / Σ_t (z̄_t(1) + z̄_t(0)) over all latents
  (dominated by latents that fire everywhere, so usually small);
- the most class-1-dominant latents (largest z̄(1) − z̄(0), the released class-1 ranking) and
  the latents active in both classes (min(z̄(0), z̄(1)) ≥ `shared_ratio` · max, ranked by min);
- per latent an off-breast score (share of its activation mass on cells with breast-tissue
  fraction < 0.5) and, where the store has `confounder` boxes (the phantom's marker), a
  confounder score (share of its mass on marked images that lies in cells centred in the box).

- where the images carry a binary `attribute` label (the phantom's `confounder`: the marker is
  on the image), an association per latent: the AUROC of its image-mean activation for the
  attribute among the concept's NEGATIVE images, where the concept cannot explain a difference.

Flag rule (documented in docs/analysis.md): among a model's top-`top` class-1-dominant
latents, a latent is flagged `confounder` when its confounder score ≥ `confounder_threshold`
AND ≥ `min_enrichment` × the share of positions inside the box (what a latent active everywhere
would get); `off_breast` likewise with `off_breast_threshold` and the share of off-breast
positions; `associated` when its attribute AUROC is ≥ `association_auroc` (or ≤ 1 − it).
Latents with no activation mass are never flagged. Every associated latent (not only the top
ones) is listed in `associated`, the set a debiasing edit switches off.

The spatial score finds latents that fire ON the marker; the association finds latents whose
activation anywhere depends on it. In the phantom the finetuned classifier's shortcut lives in
the second kind (a marker in a corner changes whole-map features through the network's global
context), which is why both are reported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MammoSaeError
from .probe import class_means, latent_auroc, ranking_order
from .summaries import LatentSummaries


@dataclasses.dataclass(frozen=True)
class FlagRule:
    top: int = 10
    confounder_threshold: float = 0.3
    off_breast_threshold: float = 0.75
    min_enrichment: float = 3.0
    shared_ratio: float = 0.5
    association_auroc: float = 0.8

    def __post_init__(self) -> None:
        if not 0.5 < self.association_auroc <= 1.0:
            raise MammoSaeError(
                f"association_auroc must be in (0.5, 1], got {self.association_auroc}"
            )


def separation_index(z0_h: np.ndarray, z1_h: np.ndarray) -> float:
    """Σ|z̄(1) − z̄(0)| / Σ(|z̄(0)| + |z̄(1)|) over all latents."""
    total = float(np.abs(z0_h).sum() + np.abs(z1_h).sum())
    return float(np.abs(z1_h - z0_h).sum() / total) if total > 0 else float("nan")


def dominance(z0_h: np.ndarray, z1_h: np.ndarray, latents: Sequence[int]) -> float:
    """Mean of (z̄(1) − z̄(0)) / (z̄(1) + z̄(0)) over `latents` (NaN when none)."""
    idx = np.asarray(list(latents), dtype=np.int64)
    if len(idx) == 0:
        return float("nan")
    return float(np.mean((z1_h[idx] - z0_h[idx]) / (z1_h[idx] + z0_h[idx])))


def shared_latents(z0_h: np.ndarray, z1_h: np.ndarray, ratio: float, top: int) -> np.ndarray:
    lo, hi = np.minimum(z0_h, z1_h), np.maximum(z0_h, z1_h)
    ok = (lo > 0) & (lo >= ratio * hi)
    idx = np.flatnonzero(ok)
    return idx[np.argsort(-lo[idx], kind="mergesort")][:top]


def _share(num: float, den: float) -> float:
    return float(num) / float(den) if den else float("nan")


# Fewer images on either side of the attribute and chance alone flags latents: with 3 vs 30
# negatives, 11 % of random latents reach AUROC ≥ 0.8 or ≤ 0.2; with 10 vs 100, 0.08 %.
MIN_ATTRIBUTE_GROUP = 10


def attribute_association(mean_nh: Any, y: np.ndarray, attribute: np.ndarray | None) -> np.ndarray:
    """Per-latent AUROC for the attribute among the concept-negative images (NaN when the
    attribute is absent, or fewer than MIN_ATTRIBUTE_GROUP negatives have or lack it)."""
    h = mean_nh.shape[1]
    if attribute is None:
        return np.full(h, np.nan)
    attribute = np.asarray(attribute, dtype=np.int64)
    if attribute.shape != np.shape(y):
        raise MammoSaeError(f"attribute has {attribute.size} values for {np.size(y)} images")
    neg = np.flatnonzero(np.asarray(y) == 0)
    a = attribute[neg]
    if min(int(a.sum()), int(len(a) - a.sum())) < MIN_ATTRIBUTE_GROUP:
        return np.full(h, np.nan)
    return latent_auroc(mean_nh[neg], a)


def model_separation(
    summaries: LatentSummaries,
    rows: np.ndarray,
    y: np.ndarray,
    rule: FlagRule = FlagRule(),
    attribute: np.ndarray | None = None,
) -> dict[str, Any]:
    """Class means, separation, top/shared latents and flags for one model's summaries.
    `attribute` (optional, aligned with `rows`) is a binary image label such as the phantom's
    `confounder`, scored per latent by `attribute_association`."""
    mean_nh = summaries.mean_rows(rows)
    means = class_means(mean_nh, y)
    z0, z1 = means[0], means[1]
    diff = z1 - z0
    order = ranking_order(diff)
    top = [int(j) for j in order[: rule.top] if diff[j] > 0]
    shared = shared_latents(z0, z1, rule.shared_ratio, rule.top)
    off = summaries.off_breast_score()
    conf = summaries.confounder_score()
    assoc = attribute_association(mean_nh, y, attribute)
    meta = summaries.meta
    conf_base = _share(meta.get("confounder_positions", 0), meta.get("marked_positions", 0))
    off_base = _share(meta.get("off_breast_positions", 0), meta.get("tissue_known_positions", 0))

    def flags(j: int) -> list[str]:
        out = []
        if (
            np.isfinite(conf[j])
            and conf[j] >= rule.confounder_threshold
            and (not np.isfinite(conf_base) or conf[j] >= rule.min_enrichment * conf_base)
        ):
            out.append("confounder")
        if (
            np.isfinite(off[j])
            and off[j] >= rule.off_breast_threshold
            and (not np.isfinite(off_base) or off[j] >= rule.min_enrichment * off_base)
        ):
            out.append("off_breast")
        if _associated(assoc[j], rule):
            out.append("associated")
        return out

    def entry(j: int, rank: int | None = None) -> dict[str, Any]:
        e = {
            "index": int(j),
            "mean_class0": float(z0[j]),
            "mean_class1": float(z1[j]),
            "off_breast_score": float(off[j]),
            "confounder_score": float(conf[j]),
            "attribute_auroc": float(assoc[j]),
            "flags": flags(j),
        }
        if rank is not None:
            e["rank"] = rank
        return e

    top_entries = [entry(j, r) for r, j in enumerate(top)]
    return {
        "n_per_class": {"0": int((y == 0).sum()), "1": int((y == 1).sum())},
        "separation": dominance(z0, z1, top),
        "global_separation": separation_index(z0, z1),
        "class1_dominant": top_entries,
        "shared": [entry(int(j)) for j in shared],
        "flagged": [e for e in top_entries if e["flags"]],
        "baseline_confounder_share": conf_base,
        "baseline_off_breast_share": off_base,
        "associated": [int(j) for j in np.flatnonzero(_associated(assoc, rule))],
        "associated_in_top": sum(1 for e in top_entries if "associated" in e["flags"]),
        "_z0": z0,
        "_z1": z1,
        "_off": off,
        "_conf": conf,
        "_assoc": assoc,
    }


def _associated(auroc: Any, rule: FlagRule) -> Any:
    """AUROC ≥ t or ≤ 1 − t (NaN → False); scalar or array."""
    a = np.asarray(auroc, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.maximum(a, 1.0 - a) >= rule.association_auroc


def compare(
    models: dict[str, tuple[LatentSummaries, np.ndarray, np.ndarray, np.ndarray | None]],
    rule: FlagRule = FlagRule(),
) -> dict[str, dict[str, Any]]:
    """`model_separation` for each named (summaries, rows, labels, attribute or None); SAEs must
    have equal width."""
    widths = {name: m[0].h for name, m in models.items()}
    if len(set(widths.values())) > 1:
        raise MammoSaeError(f"models were summarised with SAEs of different widths: {widths}")
    return {
        name: model_separation(s, rows, y, rule, attribute)
        for name, (s, rows, y, attribute) in models.items()
    }


def public(result: dict[str, Any]) -> dict[str, Any]:
    """The JSON-able part of a `model_separation` result."""
    return {k: v for k, v in result.items() if not k.startswith("_")}


def latent_table(results: dict[str, dict[str, Any]]) -> Any:
    """Long table: one row per (model, latent active in either class)."""
    import pandas as pd

    frames = []
    for name, r in results.items():
        z0, z1 = r["_z0"], r["_z1"]
        idx = np.flatnonzero((z0 > 0) | (z1 > 0))
        flagged = {e["index"]: ",".join(e["flags"]) for e in r["flagged"]}
        frames.append(
            pd.DataFrame(
                {
                    "model": name,
                    "index": idx,
                    "mean_class0": z0[idx],
                    "mean_class1": z1[idx],
                    "difference": z1[idx] - z0[idx],
                    "off_breast_score": r["_off"][idx],
                    "confounder_score": r["_conf"][idx],
                    "attribute_auroc": r["_assoc"][idx],
                    "flags": [flagged.get(int(j), "") for j in idx],
                }
            )
        )
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def plot_separation(
    results: dict[str, dict[str, Any]], path: Path, *, concept: str = "", label_top: int = 5
) -> None:
    """Figures 4/5: per model, z̄(1) up (red) and z̄(0) down (blue) over the latent index, the
    most class-1-dominant latents labelled in red, latents active in both classes in purple,
    flagged latents marked with their flag."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .figures import save_figure

    names: Sequence[str] = list(results)
    fig, axes = plt.subplots(len(names), 1, figsize=(11, 3.2 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        r = results[name]
        z0, z1 = r["_z0"], r["_z1"]
        idx = np.flatnonzero((z0 > 0) | (z1 > 0))
        ax.vlines(idx, 0, z1[idx], color="tab:red", lw=1, label="z̄(1) (concept present)")
        ax.vlines(idx, 0, -z0[idx], color="tab:blue", lw=1, label="z̄(0) (absent), drawn downwards")
        ax.axhline(0, color="black", lw=0.6)
        # Labels of latents closer than 4 % of the axis stack upwards instead of overlapping.
        near = 0.04 * len(z0)
        placed: list[tuple[float, int]] = []
        for e in r["class1_dominant"][:label_top]:
            tag = f"{e['index']}" + (f" [{','.join(e['flags'])}]" if e["flags"] else "")
            level = sum(1 for x, _ in placed if abs(x - e["index"]) < near)
            placed.append((e["index"], level))
            ax.annotate(
                tag,
                (e["index"], e["mean_class1"]),
                xytext=(0, 4 + 9 * level),
                textcoords="offset points",
                ha="center",
                fontsize=7,
                color="darkred",
            )
        for e in r["shared"][:label_top]:
            ax.annotate(
                str(e["index"]),
                (e["index"], -e["mean_class0"]),
                xytext=(0, -10),
                textcoords="offset points",
                ha="center",
                fontsize=7,
                color="purple",
            )
            ax.plot([e["index"]], [e["mean_class1"]], "o", ms=3, color="purple")
        ax.set_title(
            f"{name}: separation {r['separation']:.3f}" + (f" ({concept})" if concept else ""),
            fontsize=10,
        )
        ax.set_ylabel("class-mean activation")
        ax.set_xlim(-0.5, len(z0) - 0.5)
        # Room for the labels above the tallest bar and below the deepest one.
        top, bottom = float(z1.max(initial=0.0)), float(z0.max(initial=0.0))
        ax.set_ylim(-1.25 * bottom - 1e-9, 1.3 * top + 1e-9)
        ax.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel(
        "latent index (labels: red = most class-1-dominant, purple = active in both)"
    )
    save_figure(fig, path, dpi=120)
    plt.close(fig)
