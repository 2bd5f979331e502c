"""Patch-latent maps: chosen SAE latents at every position of chosen images, and their
upsampling to the model-input frame (the heatmaps of the paper's Figure 3).

A store keeps each image's final-layer vectors with their (row, col) cell; encoding them with
the SAE and scattering the chosen latents back gives one `(n_latents, grid_h, grid_w)` map per
image. Images may have different grids (different input sizes), so the maps come back as a
list, one array per image. Localisation needs every cell, i.e. a store extracted with
subsample 1.0; a store missing cells raises `StoreError`.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import MammoSaeError, StoreError


def _grids(store: Any) -> np.ndarray:
    """(n_images, 2) grid sizes, indexed by image index."""
    images = store.images
    missing = {"grid_h", "grid_w"} - set(images.columns)
    if missing:
        raise StoreError(f"store image table lacks column(s) {sorted(missing)}")
    grids = np.zeros((store.n_images, 2), dtype=np.int64)
    index = images["image_index"].to_numpy() if "image_index" in images else np.arange(len(images))
    grids[index] = images[["grid_h", "grid_w"]].to_numpy()
    return grids


def _sae_device(sae: Any) -> torch.device:
    try:
        return next(sae.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


def _encode_rows(sae: Any, acts_nd: np.ndarray, latents: np.ndarray) -> np.ndarray:
    """The chosen latents of `sae.encode` for a batch of rows, as float32 numpy."""
    x_nd = torch.from_numpy(np.ascontiguousarray(acts_nd, dtype=np.float32)).to(_sae_device(sae))
    with torch.no_grad():
        z_nh = sae.encode(x_nd)
        if isinstance(z_nh, torch.Tensor):  # select on the device: copy back 10 columns, not h
            return z_nh[:, torch.as_tensor(latents, device=z_nh.device)].float().cpu().numpy()
    return np.asarray(z_nh, dtype=np.float32)[:, latents]


def _check_latents(sae: Any, latents: Sequence[int]) -> np.ndarray:
    lat = np.asarray([int(j) for j in latents], dtype=np.int64)
    h = getattr(sae, "h", None)
    if lat.size == 0:
        raise MammoSaeError("no latents given")
    if (lat < 0).any() or (h is not None and (lat >= h).any()):
        bad = [int(j) for j in lat if j < 0 or (h is not None and j >= h)]
        raise MammoSaeError(f"latent indices out of range for an SAE with h = {h}: {bad}")
    return lat


def _load_patches(store: Any, i: int, grids: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
    if not 0 <= i < store.n_images:
        raise StoreError(f"image index {i} out of range (store has {store.n_images} images)")
    acts_pd, rows_p, cols_p = store.image_patches(i)
    acts_pd, rows_p, cols_p = np.asarray(acts_pd), np.asarray(rows_p), np.asarray(cols_p)
    gh, gw = int(grids[i, 0]), int(grids[i, 1])
    if len(rows_p) != gh * gw:
        raise StoreError(f"image {i} has {len(rows_p)} of its {gh}x{gw} cells in the store; "
                         "patch maps need a store extracted with subsample 1.0")
    if not np.isfinite(acts_pd).all():
        raise StoreError(f"image {i}: stored activations contain NaN or infinite values")
    return acts_pd, rows_p.astype(np.int64), cols_p.astype(np.int64), (gh, gw)


def iter_latent_maps(store: Any, sae: Any, latents: Sequence[int], image_indices: Sequence[int],
                     *, batch_rows: int = 8192) -> Iterator[np.ndarray]:
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
            maps_lhw[:, rows_p, cols_p] = z_nl[start:start + len(rows_p)].T
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


def latent_maps(store: Any, sae: Any, latents: Sequence[int], image_indices: Sequence[int],
                *, batch_rows: int = 8192) -> list[np.ndarray]:
    """Maps of `latents` for `image_indices`: a list (one per image) of `(n_lat, gh, gw)` arrays.

    A list, not one array, because images of different sizes have different grids; when they
    share a grid, `np.stack(latent_maps(...))` gives `(n_img, n_lat, gh, gw)`.
    """
    return list(iter_latent_maps(store, sae, latents, image_indices, batch_rows=batch_rows))


def upsample(map_hw: np.ndarray, frame_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling to the model-input frame with `align_corners=False` (as the reference).

    Accepts `(h, w)` or `(n, h, w)`. Cell i's value lands at pixel (i + 0.5)·H/h − 0.5, not at
    the cell's receptive-field centre (32i + 7 for B5): an offset of up to ≈ 8 px on 1520×912
    (see docs/localization.md).
    """
    arr = np.asarray(map_hw, dtype=np.float32)
    if arr.ndim not in (2, 3):
        raise MammoSaeError(f"map must be (h, w) or (n, h, w), got shape {arr.shape}")
    H, W = (int(v) for v in frame_hw)
    if H < 1 or W < 1:
        raise MammoSaeError(f"invalid frame size {frame_hw}")
    x = torch.from_numpy(np.ascontiguousarray(arr)).reshape(1, -1, *arr.shape[-2:])
    out = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)
    return out.reshape(*arr.shape[:-2], H, W).numpy()


def cell_centres(grid_len: int, frame_len: int) -> np.ndarray:
    """Pixel coordinate where bilinear `align_corners=False` upsampling puts each cell's value."""
    return (np.arange(grid_len) + 0.5) * frame_len / grid_len - 0.5


__all__ = ["cell_centres", "iter_latent_maps", "latent_maps", "upsample"]
