"""Figure-3-style panels: mammogram, `jet` heatmap overlay, GT boxes white, predicted boxes cyan
(solid when they hit a GT box, dashed when they miss); colours absent from `jet`, so a box stays
visible on any heat.

`LatentPanel` holds what one panel shows; `panel_rgb` blends its heatmap over the image and
`save_panel_grid` composes panels into a grid (rows × columns) and writes a PNG atomically.
Matplotlib is used through `Figure` + Agg, never pyplot, so no global state or display is needed.
As in the released code the heatmap is not normalised across panels: each panel's colour scale
runs from 0 to that heatmap's maximum (the title gives the mean activation for comparison); the
grid's colour bar says so.

`plot_topk_grid` draws top-k sweep curves (the report's Figure 2 and `intervene`'s figure).
"""

from __future__ import annotations

import os
import stat
from collections import OrderedDict
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


# Report pages show the same few images many times (top images and patch crops of each latent,
# per model): decoding and resizing once per file is most of what drawing them cost.
DISPLAY_CACHE_BYTES = 256 * 2**20
_display_cache: OrderedDict[tuple[str, tuple[int, int], int, int], np.ndarray] = OrderedDict()


def display_image(
    path: str | os.PathLike[str] | None, frame_hw: tuple[int, int]
) -> np.ndarray | None:
    """The mammogram as the model saw it (same reading and resizing), min-max scaled to [0, 1]:
    the reference's de-normalised input (the encoder's normalisation is affine, so min-max of
    the resized image is the same picture). None when there is no file to show.

    Read-only: repeated calls for an unchanged file (same path, size and mtime) are served from
    a cache bounded by `DISPLAY_CACHE_BYTES`."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    size_hw = (int(frame_hw[0]), int(frame_hw[1]))
    key = (os.fspath(path), size_hw, st.st_mtime_ns, st.st_size)
    cached = _display_cache.get(key)
    if cached is not None:
        _display_cache.move_to_end(key)
        return cached
    from ..data.images import read_image, resize_hw

    arr = resize_hw(read_image(path), size_hw)
    lo, hi = float(arr.min()), float(arr.max())
    out = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    out.flags.writeable = False
    _display_cache[key] = out
    held = sum(a.nbytes for a in _display_cache.values())
    while held > DISPLAY_CACHE_BYTES and len(_display_cache) > 1:
        held -= _display_cache.popitem(last=False)[1].nbytes
    return out


def _shrink(arr: np.ndarray, scale: float) -> np.ndarray:
    if scale >= 1.0:
        return arr
    import cv2

    h, w = arr.shape
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(np.asarray(arr, dtype=np.float32), size, interpolation=cv2.INTER_AREA)


def panel_rgb(panel: LatentPanel, size_hw: tuple[int, int], *, alpha: float = 0.5) -> np.ndarray:
    """The panel's picture at `size_hw` as one (h, w, 3) array: the `jet` heatmap (0 → its own
    max) blended over the grayscale image (over white without one)."""
    import cv2
    from matplotlib import colormaps

    def fit(arr: np.ndarray) -> np.ndarray:
        arr = np.asarray(arr, dtype=np.float32)
        if arr.shape == tuple(size_hw):
            return arr
        shrinking = size_hw[0] * size_hw[1] < arr.size
        mode = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
        return cv2.resize(arr, (size_hw[1], size_hw[0]), interpolation=mode)

    heat = fit(panel.heat_hw)
    peak = max(float(panel.heat_hw.max()), 1e-12)
    jet = colormaps["jet"](np.clip(heat / peak, 0.0, 1.0))[..., :3]
    under = np.ones(size_hw, np.float32) if panel.image_hw is None else fit(panel.image_hw)
    return (1.0 - alpha) * np.clip(under, 0.0, 1.0)[..., None] + alpha * jet


# Fixed layout (inches), instead of tight_layout's measuring passes: a line of 8-pt title text,
# the gap around each panel, and the right-hand band that holds the colour bar and box key.
_TITLE_LINE_IN, _GAP_IN, _KEY_IN = 0.145, 0.04, 0.9


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
    with a colour bar (0 → each panel's own max) and a key to the boxes on the right.

    The panels are composed into one picture at the PNG's own resolution and drawn on a single
    Axes (boxes and titles on top): a report draws hundreds of panels, and an Axes per panel
    cost most of the time."""
    import textwrap

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    n_rows = len(panels)
    n_cols = max((len(r) for r in panels), default=0)
    if n_rows == 0 or n_cols == 0:
        raise MammoSaeError("no panels to draw")
    width_in = panel_inches[0] * n_cols
    lines = textwrap.wrap(suptitle, width=max(20, int(width_in * 9))) if suptitle else []
    head_in = 0.1 + 0.17 * len(lines) if lines else 0.0
    height_in = panel_inches[1] * n_rows + (0.5 if suptitle else 0.0)
    grid_w_in = width_in - (_KEY_IN if colorbar else 0.0)
    grid_h_in = height_in - head_in
    # Canvas pixels = output pixels: the composed picture is not resampled again.
    canvas_w, canvas_h = max(1, round(grid_w_in * dpi)), max(1, round(grid_h_in * dpi))
    canvas = np.ones((canvas_h, canvas_w, 3), dtype=np.float32)
    cell_w, cell_h = canvas_w / n_cols, canvas_h / n_rows
    gap = _GAP_IN * dpi
    title_px = _TITLE_LINE_IN * dpi * max(p.title.count("\n") + 1 for row in panels for p in row)
    boxes: list[tuple[tuple[float, float, float, float], str, str, float]] = []
    titles: list[tuple[float, float, str]] = []
    for r, row in enumerate(panels):
        for c, panel in enumerate(row):
            H, W = panel.heat_hw.shape
            room_w, room_h = cell_w - 2 * gap, cell_h - title_px - 2 * gap
            scale = min(room_w / W, room_h / H)
            h, w = max(1, int(H * scale)), max(1, int(W * scale))
            x0 = int(c * cell_w + (cell_w - w) / 2)
            y0 = int(r * cell_h + gap + title_px + (room_h - h) / 2)
            canvas[y0 : y0 + h, x0 : x0 + w] = panel_rgb(panel, (h, w))
            titles.append((x0 + w / 2, y0 - 1, panel.title))
            sx, sy = w / W, h / H
            pred = np.asarray(panel.pred_boxes, dtype=np.float64).reshape(-1, 4)
            hits = np.ones(len(pred), bool) if panel.hits is None else np.asarray(panel.hits, bool)
            gts = np.asarray(panel.gt_boxes, dtype=np.float64).reshape(-1, 4)
            for box, colour, style, width in [(b, GT_COLOUR, "-", 2.0) for b in gts] + [
                (b, PRED_COLOUR, "-" if hit else "--", 1.5)
                for b, hit in zip(pred, hits, strict=True)
            ]:
                bx0, by0, bx1, by1 = box
                boxes.append(
                    (
                        (x0 + bx0 * sx, y0 + by0 * sy, (bx1 - bx0) * sx, (by1 - by0) * sy),
                        colour,
                        style,
                        width,
                    )
                )
    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    FigureCanvasAgg(fig)
    # The picture is pasted pixel for pixel (no resampling) at the bottom left; an Axes over
    # exactly those pixels, in canvas pixel units, carries the boxes and titles.
    fig.figimage(canvas, xo=0, yo=0, origin="upper")
    ax = fig.add_axes((0.0, 0.0, canvas_w / (width_in * dpi), canvas_h / (height_in * dpi)))
    ax.set_zorder(1)  # above the pasted picture
    ax.patch.set_visible(False)
    for (x, y, w, h), colour, style, width in boxes:
        ax.add_patch(
            Rectangle((x, y), w, h, fill=False, edgecolor=colour, linestyle=style, linewidth=width)
        )
    for x, y, text in titles:
        ax.text(x, y, text, ha="center", va="bottom", fontsize=8)
    ax.set_xlim(0, canvas_w)
    ax.set_ylim(canvas_h, 0)
    ax.axis("off")
    top = 1.0 - head_in / height_in
    if lines:
        fig.suptitle("\n".join(lines), fontsize=9, y=1.0 - 0.05 / height_in, va="top")
    if colorbar:
        _add_colorbar(fig, grid_w_in / width_in, top)
    return save_figure(fig, Path(path), dpi, tight=False)


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


def save_figure(fig: Any, path: Path, dpi: int = 110, *, tight: bool = True) -> Path:
    """tight_layout (unless the caller laid the figure out: `tight=False`), then an atomic PNG
    write."""
    if tight:
        fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        # zlib level 3, not Pillow's 6: a report writes hundreds of these; 2.3x faster to encode
        # for ~10 % larger files (measured on the demo's latent grids).
        fig.savefig(tmp, format="png", dpi=dpi, pil_kwargs={"compress_level": 3})
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
    "panel_rgb",
    "new_figure",
    "panel_title",
    "plot_topk_grid",
    "save_figure",
    "save_panel_grid",
]
