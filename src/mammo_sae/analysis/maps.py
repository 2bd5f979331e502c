"""Patch-latent maps: chosen SAE latents at every position of chosen images, and their
upsampling to the model-input frame (the heatmaps of the paper's Figure 3), each cell's value
placed at the receptive-field centre of that cell for the store's encoder.

A store keeps each image's final-layer vectors with their (row, col) cell; encoding them with
the SAE and scattering the chosen latents back gives one `(n_latents, grid_h, grid_w)` map per
image. Images may have different grids (different input sizes), so the maps come back as a
list, one array per image. Localisation needs every cell, i.e. a store extracted with
subsample 1.0; a store missing cells raises `StoreError`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..devices import module_device
from ..errors import MammoSaeError, StoreError
from ..protocols import LatentEncoder, PatchStore


def _grids(store: PatchStore) -> np.ndarray:
    """(n_images, 2) grid sizes, indexed by image index."""
    images = store.images
    missing = {"grid_h", "grid_w"} - set(images.columns)
    if missing:
        raise StoreError(f"store image table lacks column(s) {sorted(missing)}")
    grids = np.zeros((store.n_images, 2), dtype=np.int64)
    index = images["image_index"].to_numpy() if "image_index" in images else np.arange(len(images))
    grids[index] = images[["grid_h", "grid_w"]].to_numpy()
    return grids


def _encode_rows(sae: LatentEncoder, acts_nd: np.ndarray, latents: np.ndarray) -> np.ndarray:
    """The chosen latents of `sae.encode` for a batch of rows, as float32 numpy."""
    x_nd = torch.from_numpy(np.ascontiguousarray(acts_nd, dtype=np.float32)).to(module_device(sae))
    with torch.no_grad():
        z_nh = sae.encode(x_nd)
        if isinstance(z_nh, torch.Tensor):  # select on the device: copy back 10 columns, not h
            return z_nh[:, torch.as_tensor(latents, device=z_nh.device)].float().cpu().numpy()
    return np.asarray(z_nh, dtype=np.float32)[:, latents]


def _check_latents(sae: LatentEncoder, latents: Sequence[int]) -> np.ndarray:
    lat = np.asarray([int(j) for j in latents], dtype=np.int64)
    h = getattr(sae, "h", None)
    if lat.size == 0:
        raise MammoSaeError("no latents given")
    if (lat < 0).any() or (h is not None and (lat >= h).any()):
        bad = [int(j) for j in lat if j < 0 or (h is not None and j >= h)]
        raise MammoSaeError(f"latent indices out of range for an SAE with h = {h}: {bad}")
    return lat


def _load_patches(
    store: PatchStore, i: int, grids: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
    if not 0 <= i < store.n_images:
        raise StoreError(f"image index {i} out of range (store has {store.n_images} images)")
    acts_pd, rows_p, cols_p = store.image_patches(i)
    acts_pd, rows_p, cols_p = np.asarray(acts_pd), np.asarray(rows_p), np.asarray(cols_p)
    gh, gw = int(grids[i, 0]), int(grids[i, 1])
    if len(rows_p) != gh * gw:
        raise StoreError(
            f"image {i} has {len(rows_p)} of its {gh}x{gw} cells in the store; "
            "patch maps need a store extracted with subsample 1.0"
        )
    if not np.isfinite(acts_pd).all():
        raise StoreError(f"image {i}: stored activations contain NaN or infinite values")
    return acts_pd, rows_p.astype(np.int64), cols_p.astype(np.int64), (gh, gw)


def iter_latent_maps(
    store: PatchStore,
    sae: LatentEncoder,
    latents: Sequence[int],
    image_indices: Sequence[int],
    *,
    batch_rows: int = 8192,
) -> Iterator[np.ndarray]:
    """Yield `(n_latents, grid_h, grid_w)` float32 maps, one per image, in the given order.

    Rows of consecutive images are encoded together, up to `batch_rows` per SAE call (an SAE
    encodes every latent, so each call holds `batch_rows × h` floats: 8192 × 16384 ≈ 0.5 GB).
    """
    lat = _check_latents(sae, latents)
    grids = _grids(store)
    pending: list[tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]] = []
    n_rows = 0

    def flush() -> Iterator[np.ndarray]:
        z_nl = _encode_rows(sae, np.concatenate([p[0] for p in pending]), lat)
        start = 0
        for _, rows_p, cols_p, (gh, gw) in pending:
            maps_lhw = np.zeros((len(lat), gh, gw), dtype=np.float32)
            maps_lhw[:, rows_p, cols_p] = z_nl[start : start + len(rows_p)].T
            start += len(rows_p)
            yield maps_lhw

    for i in image_indices:
        item = _load_patches(store, int(i), grids)
        if pending and n_rows + len(item[1]) > batch_rows:
            yield from flush()
            pending, n_rows = [], 0
        pending.append(item)
        n_rows += len(item[1])
    if pending:
        yield from flush()


def latent_maps(
    store: PatchStore,
    sae: LatentEncoder,
    latents: Sequence[int],
    image_indices: Sequence[int],
    *,
    batch_rows: int = 8192,
) -> list[np.ndarray]:
    """Maps of `latents` for `image_indices`: a list (one per image) of `(n_lat, gh, gw)` arrays.

    A list, not one array, because images of different sizes have different grids; when they
    share a grid, `np.stack(latent_maps(...))` gives `(n_img, n_lat, gh, gw)`.
    """
    return list(iter_latent_maps(store, sae, latents, image_indices, batch_rows=batch_rows))


class LinearMap:
    """A linear head on pooled features seen per cell: `encode` gives w · f of each vector, so
    `latent_maps(store, LinearMap(w), [0], ...)` is the classifier's own activation map (its
    logit is b + the mean of that map over the cells)."""

    h = 1

    def __init__(self, w_d: np.ndarray) -> None:
        self.w_d = torch.as_tensor(np.asarray(w_d, dtype=np.float64).reshape(-1))

    def encode(self, x_nd: torch.Tensor) -> torch.Tensor:
        return (x_nd.double() @ self.w_d.to(x_nd.device))[:, None]


UPSAMPLINGS = ("bilinear", "nearest")


def upsample(
    map_hw: np.ndarray,
    frame_hw: tuple[int, int],
    centres: tuple[np.ndarray, np.ndarray] | None = None,
    mode: str = "bilinear",
) -> np.ndarray:
    """Bilinear (or nearest-cell) upsampling of `(h, w)` or `(n, h, w)` maps to the frame.

    `centres` = (row, column) pixel coordinates where each cell's value belongs, normally its
    receptive-field centre (`receptive_field_centres`): the map is interpolated linearly
    between them, and held constant beyond the outer ones. Without them the cells are laid
    evenly over the frame, i.e. torch's `align_corners=False` (the released code), which puts
    cell i at (i + 0.5)·H/h − 0.5: 15.5 px before its receptive-field centre on the phantom's
    encoder, up to ≈ 8 px off on B5 at 1520×912 (docs/localization.md).

    `mode="nearest"` gives each pixel the value of the cell whose centre is nearest (ties: the
    earlier cell), so the heatmap is piecewise constant and a threshold keeps whole cells.
    """
    if mode not in UPSAMPLINGS:
        raise MammoSaeError(f"unknown upsampling {mode!r}; valid: {', '.join(UPSAMPLINGS)}")
    arr = np.asarray(map_hw, dtype=np.float32)
    if arr.ndim not in (2, 3):
        raise MammoSaeError(f"map must be (h, w) or (n, h, w), got shape {arr.shape}")
    H, W = (int(v) for v in frame_hw)
    if H < 1 or W < 1:
        raise MammoSaeError(f"invalid frame size {frame_hw}")
    if mode == "nearest" and centres is None:  # the even layout's cell positions
        centres = (cell_centres(arr.shape[-2], H), cell_centres(arr.shape[-1], W))
    if centres is not None:
        rows_hh = _interpolation_matrix(centres[0], arr.shape[-2], H, mode)
        cols_ww = _interpolation_matrix(centres[1], arr.shape[-1], W, mode)
        return np.matmul(np.matmul(rows_hh, arr), cols_ww.T)  # (H, h) @ (.., h, w) @ (w, W)
    x = torch.from_numpy(np.ascontiguousarray(arr)).reshape(1, -1, *arr.shape[-2:])
    out = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)
    return out.reshape(*arr.shape[:-2], H, W).numpy()


def _interpolation_matrix(
    centres: np.ndarray, n_cells: int, n_pixels: int, mode: str = "bilinear"
) -> np.ndarray:
    """(n_pixels, n_cells) weights of linear (or nearest-cell) interpolation between the cells'
    pixel positions."""
    c = np.asarray(centres, dtype=np.float64).reshape(-1)
    if len(c) != n_cells:
        raise MammoSaeError(f"{len(c)} cell centres for a map axis of {n_cells} cells")
    if n_cells > 1 and not (np.diff(c) > 0).all():
        raise MammoSaeError("cell centres must increase")
    out = np.zeros((n_pixels, n_cells), dtype=np.float32)
    if n_cells == 1:
        out[:, 0] = 1.0
        return out
    x = np.arange(n_pixels, dtype=np.float64)
    k = np.clip(np.searchsorted(c, x, side="right") - 1, 0, n_cells - 2)
    t = np.clip((x - c[k]) / (c[k + 1] - c[k]), 0.0, 1.0)
    if mode == "nearest":
        t = (t > 0.5).astype(np.float64)
    out[np.arange(n_pixels), k] = 1.0 - t
    out[np.arange(n_pixels), k + 1] += t
    return out


def cell_centres(grid_len: int, frame_len: int) -> np.ndarray:
    """Pixel coordinate where bilinear `align_corners=False` upsampling puts each cell's value."""
    return (np.arange(grid_len) + 0.5) * frame_len / grid_len - 0.5


@functools.lru_cache(maxsize=256)
def _arch_centres(
    arch: str, layer: str, height: int, width: int
) -> tuple[np.ndarray, np.ndarray] | None:
    from ..models.registry import ARCHS, create_encoder

    if arch not in ARCHS:
        return None
    with torch.device("meta"):  # the geometry needs the pad table, not the weights
        encoder = create_encoder(arch)
    return encoder.receptive_field_centres(height, width, layer)


def receptive_field_centres(
    store: PatchStore, frame_hw: tuple[int, int], grid_hw: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray] | None:
    """(rows, cols) receptive-field centres, in frame pixels, of a store image's map cells, from
    the encoder architecture and layer in the store's manifest; None when the architecture is
    not one of ours (e.g. a synthetic store), for which cells are laid evenly over the frame."""
    manifest = getattr(store, "manifest", None) or {}
    model = manifest.get("model") if isinstance(manifest, dict) else None
    arch = model.get("arch") if isinstance(model, dict) else None
    if not isinstance(arch, str):
        return None
    centres = _arch_centres(
        arch, str(manifest.get("layer", "final")), int(frame_hw[0]), int(frame_hw[1])
    )
    if centres is None:
        return None
    if (len(centres[0]), len(centres[1])) != tuple(int(v) for v in grid_hw):
        raise StoreError(
            f"{arch} maps a {frame_hw[0]}x{frame_hw[1]} input to a "
            f"{len(centres[0])}x{len(centres[1])} grid, but the store has "
            f"{grid_hw[0]}x{grid_hw[1]}: the record's frame is not the extracted one"
        )
    return centres


ALIGNMENTS = ("receptive-field", "even")


def heatmap_centres(
    store: PatchStore,
    frame_hw: tuple[int, int],
    grid_hw: tuple[int, int],
    align: str = "receptive-field",
) -> tuple[np.ndarray, np.ndarray] | None:
    """The `centres` to give `upsample` for an alignment: `receptive-field` (each cell at its
    receptive-field centre, evenly laid when the store's architecture is unknown) or `even`
    (the released code's `align_corners=False`)."""
    if align not in ALIGNMENTS:
        raise MammoSaeError(f"unknown cell alignment {align!r}; valid: {', '.join(ALIGNMENTS)}")
    return receptive_field_centres(store, frame_hw, grid_hw) if align == "receptive-field" else None


__all__ = [
    "ALIGNMENTS",
    "UPSAMPLINGS",
    "LinearMap",
    "cell_centres",
    "heatmap_centres",
    "iter_latent_maps",
    "latent_maps",
    "receptive_field_centres",
    "upsample",
]
