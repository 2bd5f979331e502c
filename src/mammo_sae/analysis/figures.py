"""Figure-3-style panels: mammogram, `jet` heatmap overlay, GT boxes white, predicted boxes cyan
(solid when they hit a GT box, dashed when they miss); colours absent from `jet`, so a box stays
visible on any heat.

`LatentPanel` holds what one panel shows; `draw_panel` draws it on a matplotlib Axes and
`save_panel_grid` lays panels out in a grid (rows × columns) and writes a PNG atomically.
Matplotlib is used through `Figure` + Agg, never pyplot, so no global state or display is needed.
As in the released code the heatmap is not normalised across panels: each panel's colour scale
runs from 0 to that heatmap's maximum (the title gives the mean activation for comparison); the
grid's colour bar says so.

`plot_topk_grid` draws top-k sweep curves (the report's Figure 2 and `intervene`'s figure).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MammoSaeError
from ..io import atomic_path


@dataclass
class LatentPanel:
    image_hw: np.ndarray | None  # grayscale in [0, 1], frame size; None → no background
    heat_hw: np.ndarray  # heatmap in the same frame
    gt_boxes: np.ndarray  # (m, 4) [x0, y0, x1, y1] frame pixels
    pred_boxes: np.ndarray  # (n, 4)
    title: str
    hits: np.ndarray | None = None  # (n,) bool: predicted box matched a GT box; None = unknown


GT_COLOUR, PRED_COLOUR = "white", "cyan"  # neither is a `jet` colour


def panel_title(
    latent: int | str,
    mean_activation: float,
    image_id: str | None = None,
    *,
    hit: bool | None = None,
) -> str:
    """`latent 13867 · mean act 0.42` (a string names another map, e.g. "classifier map"),
    preceded by the image id on a first line if given, followed by HIT / miss when known."""
    if image_id and len(image_id) > 14:  # VinDr ids are 32 hex digits
        image_id = image_id[:12] + "…"
    head = f"{image_id}\n" if image_id else ""
    name = f"latent {latent}" if isinstance(latent, (int, np.integer)) else str(latent)
    mark = "" if hit is None else (" · HIT" if hit else " · miss")
    return f"{head}{name}\nmean act {mean_activation:.3g}{mark}"


def display_image(
    path: str | os.PathLike[str] | None, frame_hw: tuple[int, int]
) -> np.ndarray | None:
    """The mammogram as the model saw it (same reading and resizing), min-max scaled to [0, 1]:
    the reference's de-normalised input. None when there is no file to show."""
    if path is None or not Path(path).is_file():
        return None
    try:
        from ..data.images import read_image, to_model_input
    except ImportError:  # images module unavailable: plain PNG reading is enough to draw
        arr = _read_png(path)
        if arr.shape != tuple(frame_hw):
            import cv2

            arr = cv2.resize(
                arr, (int(frame_hw[1]), int(frame_hw[0])), interpolation=cv2.INTER_AREA
            )
    else:
        arr = to_model_input(read_image(path), tuple(frame_hw))[0].numpy()
    lo, hi = float(arr.min()), float(arr.max())
    return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)


def _read_png(path: str | os.PathLike[str]) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("F"), dtype=np.float32)
    except OSError as exc:
        raise MammoSaeError(f"cannot read image {path}: {exc}") from exc


def _shrink(arr: np.ndarray, scale: float) -> np.ndarray:
    if scale >= 1.0:
        return arr
    import cv2

    h, w = arr.shape
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(np.asarray(arr, dtype=np.float32), size, interpolation=cv2.INTER_AREA)


def draw_panel(ax: Any, panel: LatentPanel, *, max_height: int = 400, alpha: float = 0.5) -> None:
    """Draw one panel; images taller than `max_height` px are shrunk for drawing (boxes too)."""
    from matplotlib.patches import Rectangle

    H, W = panel.heat_hw.shape
    scale = min(1.0, max_height / H)
    if panel.image_hw is not None:
        ax.imshow(_shrink(panel.image_hw, scale), cmap="gray", vmin=0.0, vmax=1.0)
    heat = _shrink(panel.heat_hw, scale)
    ax.imshow(heat, cmap="jet", alpha=alpha, vmin=0.0, vmax=max(float(heat.max()), 1e-12))
    pred = np.asarray(panel.pred_boxes, dtype=np.float64).reshape(-1, 4)
    hits = np.ones(len(pred), dtype=bool) if panel.hits is None else np.asarray(panel.hits, bool)
    drawn = [(b, GT_COLOUR, "-", 2.0) for b in np.asarray(panel.gt_boxes, float).reshape(-1, 4)]
    drawn += [
        (b, PRED_COLOUR, "-" if hit else "--", 1.5) for b, hit in zip(pred, hits, strict=True)
    ]
    for box, colour, style, width in drawn:
        x0, y0, x1, y1 = box * scale
        # Box edges are pixel edges; imshow puts pixel centres on integers.
        ax.add_patch(
            Rectangle(
                (x0 - 0.5, y0 - 0.5),
                x1 - x0,
                y1 - y0,
                fill=False,
                edgecolor=colour,
                linestyle=style,
                linewidth=width,
            )
        )
    ax.set_xlim(-0.5, W * scale - 0.5)
    ax.set_ylim(H * scale - 0.5, -0.5)
    ax.set_title(panel.title, fontsize=8)
    ax.axis("off")


def save_panel_grid(
    panels: Sequence[Sequence[LatentPanel]],
    path: str | os.PathLike[str],
    *,
    panel_inches: tuple[float, float] = (1.8, 3.0),
    dpi: int = 100,
    suptitle: str | None = None,
    colorbar: bool = True,
) -> Path:
    """Write `panels[row][col]` as one PNG grid (rows may be ragged; empty cells stay blank),
    with a colour bar (0 → each panel's own max) and a key to the boxes on the right."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_rows = len(panels)
    n_cols = max((len(r) for r in panels), default=0)
    if n_rows == 0 or n_cols == 0:
        raise MammoSaeError("no panels to draw")
    fig = Figure(
        figsize=(panel_inches[0] * n_cols, panel_inches[1] * n_rows + (0.5 if suptitle else 0))
    )
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    max_height = int(panel_inches[1] * dpi * 1.5)
    for r in range(n_rows):
        for c in range(n_cols):
            if c < len(panels[r]):
                draw_panel(axes[r][c], panels[r][c], max_height=max_height)
            else:
                axes[r][c].axis("off")
    top = 1.0
    if suptitle:
        import textwrap

        lines = textwrap.wrap(suptitle, width=max(20, int(panel_inches[0] * n_cols * 9)))
        # Place the title in its own band of fixed height (inches) above the panels' titles.
        height = fig.get_figheight()
        fig.suptitle("\n".join(lines), fontsize=9, y=1.0 - 0.05 / height, va="top")
        top = 1.0 - (0.1 + 0.17 * len(lines)) / height
    right = 1.0 - (0.9 / fig.get_figwidth() if colorbar else 0.0)
    fig.tight_layout(rect=(0.0, 0.0, right, top))
    if colorbar:
        _add_colorbar(fig, right, top)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path


def _add_colorbar(fig: Any, left: float, top: float) -> None:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    width = fig.get_figwidth()
    cax = fig.add_axes((left + 0.15 / width, 0.35 * top, 0.15 / width, 0.45 * top))
    bar = fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), cmap="jet"), cax=cax, ticks=[0, 1])
    bar.ax.set_yticklabels(["0", "panel\nmax"], fontsize=7)
    cax.set_title("heat", fontsize=7)
    fig.text(
        left + 0.05 / width,
        0.3 * top,
        f"boxes:\nGT {GT_COLOUR}\npredicted\n{PRED_COLOUR}\n(dashed:\nmiss)",
        fontsize=6,
        va="top",
    )


# --------------------------------------------------------------------------- plain figures
def new_figure(
    width: float, height: float, rows: int = 1, cols: int = 1, **kw: Any
) -> tuple[Any, Any]:
    """A pyplot-free Agg figure and its (rows × cols) axes array."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False, **kw)
    return fig, axes


def save_figure(fig: Any, path: Path, dpi: int = 110) -> Path:
    """tight_layout, then an atomic PNG write."""
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path


# --------------------------------------------------------------------------- top-k sweep (Figure 2)
@dataclass
class Curve:
    """One top-k sweep curve: AUROC (and its CI) against k."""

    label: str
    ks: np.ndarray
    auroc: np.ndarray
    low: np.ndarray
    high: np.ndarray


MODES = (("on", "top-k activated"), ("off", "top-k deactivated"))


def plot_topk_grid(curves: Mapping[str, Mapping[str, Sequence[Curve]]], path: Path) -> Path:
    """Figure 2: rows = concepts, columns = activated / deactivated; one line (95 % CI band) per
    model; symlog x so that k = 0 shows. `curves[concept][mode]` lists that panel's curves."""
    concepts = list(curves)
    if not concepts:
        raise MammoSaeError("no top-k curves to draw")
    fig, axes = new_figure(11, 3.6 * len(concepts), len(concepts), 2, sharey=True)
    for r, concept in enumerate(concepts):
        for c, (mode, name) in enumerate(MODES):
            ax = axes[r][c]
            for curve in curves[concept].get(mode, []):
                (line,) = ax.plot(curve.ks, curve.auroc, marker="o", ms=3, label=curve.label)
                band = np.isfinite(curve.low) & np.isfinite(curve.high)
                if band.any():
                    ax.fill_between(
                        curve.ks[band],
                        curve.low[band],
                        curve.high[band],
                        color=line.get_color(),
                        alpha=0.2,
                    )
            ax.set_xscale("symlog", linthresh=1)
            ax.axhline(0.5, color="grey", lw=0.8, ls=":")
            ax.set_title(f"{concept}: {name}", fontsize=10)
            ax.set_xlabel("k (top-k latents per class, log scale)", fontsize=8)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        axes[r][0].set_ylabel("AUROC (95 % CI)")
    return save_figure(fig, path)


__all__ = [
    "MODES",
    "Curve",
    "LatentPanel",
    "display_image",
    "draw_panel",
    "new_figure",
    "panel_title",
    "plot_topk_grid",
    "save_figure",
    "save_panel_grid",
]
