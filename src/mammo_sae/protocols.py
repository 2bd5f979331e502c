"""What the analyses need of a store and an SAE, written down once as structural types.

`activations.store.ActivationStore` and `sae.model.SparseAutoencoder` satisfy them; so do the
small stand-ins tests build. Type hints (runtime-checkable only for the test that keeps the real
classes in step with them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import torch

    from .data.records import ImageRecord


@runtime_checkable
class PatchStore(Protocol):
    """An activation store as the analyses read it: one row of `images` per image index,
    each image's patch vectors with their grid cells."""

    @property
    def n_images(self) -> int: ...

    @property
    def d(self) -> int: ...

    @property
    def manifest(self) -> dict[str, Any]: ...

    @property
    def manifest_sha256(self) -> str: ...

    @property
    def images(self) -> pd.DataFrame: ...

    def records(self) -> list[ImageRecord]: ...

    def image_patches(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(patch vectors (p, d), their grid rows (p,), their grid cols (p,)) of image i."""
        ...


@runtime_checkable
class LatentEncoder(Protocol):
    """What a patch map needs of an SAE: latent codes (n, h) of activation rows (n, d). An `h`
    attribute, when present, bounds the latent indices asked for."""

    def encode(self, x_nd: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class SAELike(LatentEncoder, Protocol):
    """An SAE as the summaries and explanations use it: sizes, codes and reconstructions."""

    @property
    def d(self) -> int: ...

    @property
    def h(self) -> int: ...

    def decode(self, z_nh: torch.Tensor) -> torch.Tensor: ...
