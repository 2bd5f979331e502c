"""Report-only figures: SAE training curves, per-latent histograms.

Drawn with matplotlib's object API (`Figure` + Agg canvas, never pyplot), so nothing global is
touched and no display is needed; every PNG is written atomically. Heatmap panels and
Figure 2 (`plot_topk_grid`, also `intervene`'s figure) live in `mammo_sae.analysis.figures`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..analysis.figures import new_figure, save_figure
from ..errors import MammoSaeError

# Canonical training-log quantity -> (keys an SAE trainer may use for it, axis label, log scale).
TRAINING_SERIES: dict[str, tuple[tuple[str, ...], str, bool]] = {
    "loss": (("loss", "total_loss", "loss_total", "train_loss"), "loss", True),
    "fvu": (("fvu", "train_fvu", "val_fvu", "fvu_val"), "FVU", True),
    "l0": (("l0", "train_l0", "mean_l0", "val_l0"), "L0 (active latents / patch)", False),
    "dead_fraction": (("dead_fraction", "dead_frac", "frac_dead", "dead"), "dead fraction", False),
    "throughput": (
        (
            "patches_per_s",
            "acts_per_s",
            "tokens_per_s",
            "samples_per_s",
            "rows_per_s",
            "throughput",
            "images_per_s",
        ),
        "throughput (per s)",
        False,
    ),
}
# Keys giving the x axis of the training curves, in order of preference.
STEP_KEYS = ("step", "steps", "tokens", "patches_seen", "n_seen", "epoch", "iteration")


def _finite(values: Sequence[Any]) -> np.ndarray:
    out = np.full(len(values), np.nan)
    for i, v in enumerate(values):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[i] = float(v)
    return out


def training_series(
    log_rows: Sequence[Mapping[str, Any]],
) -> tuple[str, np.ndarray, dict[str, np.ndarray]]:
    """(x label, x values, {quantity: values}) for the quantities of TRAINING_SERIES present in
    an SAE training log (one dict per logged step; missing entries become NaN)."""
    keys = set().union(*(row.keys() for row in log_rows)) if log_rows else set()
    x_key = next((k for k in STEP_KEYS if k in keys), None)
    x = (
        _finite([row.get(x_key) for row in log_rows])
        if x_key
        else np.arange(1, len(log_rows) + 1, dtype=float)
    )
    series: dict[str, np.ndarray] = {}
    for name, (aliases, _, _) in TRAINING_SERIES.items():
        key = next((k for k in aliases if k in keys), None)
        if key is not None:
            values = _finite([row.get(key) for row in log_rows])
            if np.isfinite(values).any():
                series[
                    name if name != "throughput" else f"throughput ({key.replace('_per_s', '/s')})"
                ] = values
    return x_key or "logged step", x, series


def resample_positions(log_rows: Sequence[Mapping[str, Any]], x: np.ndarray) -> np.ndarray:
    """x of the logged steps by which dead latents were resampled again: where the log's
    cumulative `n_resamples` grew since the previous entry (one mark per logged step, however
    many resamplings it covers). Empty when the log does not count them."""
    counts = _finite([row.get("n_resamples") for row in log_rows])
    grew = np.zeros(len(counts), dtype=bool)
    if len(counts):
        before = np.concatenate([[0.0], counts[:-1]])
        grew = np.isfinite(counts) & np.isfinite(before) & (counts > before)
    return np.asarray(x, dtype=float)[grew]


def plot_training_curves(
    log_rows: Sequence[Mapping[str, Any]], path: Path, *, title: str = ""
) -> list[str]:
    """One panel per quantity found in the log, with a dotted line at each logged step by which
    dead latents were resampled; returns the quantities drawn."""
    x_label, x, series = training_series(log_rows)
    if not series:
        raise MammoSaeError("the SAE training log has none of: " + ", ".join(TRAINING_SERIES))
    resampled = resample_positions(log_rows, x)
    fig, axes = new_figure(3.2 * len(series), 2.8, 1, len(series))
    for ax, (name, values) in zip(axes[0], series.items()):
        _, label, log_scale = TRAINING_SERIES.get(name, ((), name, False))
        ok = np.isfinite(values) & np.isfinite(x)
        for at in resampled:
            ax.axvline(at, color="grey", lw=0.8, ls=":")
        ax.plot(x[ok], values[ok], lw=1.2, marker="." if ok.sum() < 40 else None)
        if log_scale and (values[ok] > 0).all():
            ax.set_yscale("log")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel(x_label, fontsize=8)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    save_figure(fig, path)
    return list(series)


def plot_activation_histogram(
    values_by_class: Mapping[str, np.ndarray], path: Path, *, title: str = ""
) -> Path:
    """Per-image mean activation of one latent, one histogram per class (shared bins)."""
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in values_by_class.items() if len(v)}
    if not arrays:
        raise MammoSaeError("no activations to draw")
    everything = np.concatenate(list(arrays.values()))
    hi = float(everything.max()) if everything.size else 1.0
    bins = np.linspace(0.0, hi if hi > 0 else 1.0, 25)
    fig, axes = new_figure(4.6, 2.8)
    ax = axes[0][0]
    for label, values in arrays.items():
        ax.hist(values, bins=bins, alpha=0.55, label=f"{label} (n={len(values)})")
    ax.set_xlabel("per-image mean activation", fontsize=8)
    ax.set_ylabel("images", fontsize=8)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    # A fixed layout: drawn once per latent and model, where tight_layout's measuring dominated.
    fig.subplots_adjust(left=0.12, right=0.98, bottom=0.15, top=0.9)
    return save_figure(fig, path, tight=False)


def nice_ks(ks: Sequence[float]) -> np.ndarray:
    arr = np.asarray(ks, dtype=np.float64)
    if arr.size and not np.all(np.diff(arr) >= 0):
        raise MammoSaeError("top-k values must be sorted")
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise MammoSaeError("top-k values must be finite and ≥ 0")
    return arr
