"""Concept classifier: encoder + linear head on the spatial mean of the final map.

`logit = w . mean_hw(F) + b` (sigmoid for binary concepts, softmax for density), the
Mammo-CLIP downstream head (`classifier.classification_head`).
"""

from __future__ import annotations

import torch
from torch import nn

from .efficientnet import EfficientNet


class ConceptClassifier(nn.Module):
    def __init__(self, encoder: EfficientNet, n_class: int, concept: str | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.out_channels, n_class)
        self.n_class = n_class
        self.concept = concept

    @property
    def arch(self) -> str:
        return self.encoder.arch

    def features(self, x_b3hw: torch.Tensor) -> torch.Tensor:
        """Raw final map (B, C, h, w)."""
        return self.encoder(x_b3hw)

    def pooled(self, x_b3hw: torch.Tensor) -> torch.Tensor:
        """Spatial mean of the final map (B, C)."""
        return self.encoder(x_b3hw).mean(dim=(2, 3))

    def logits_from_map(self, final_bchw: torch.Tensor) -> torch.Tensor:
        """Head applied to a (possibly edited) final map: (B, n_class)."""
        return self.head(final_bchw.mean(dim=(2, 3)))

    def logits_from_layer(self, map_bchw: torch.Tensor, layer: str) -> torch.Tensor:
        """Head on the final map that the rest of the network computes from a (possibly edited)
        map at `layer`: (B, n_class). At `final` this is `logits_from_map`."""
        return self.logits_from_map(self.encoder.forward_from(map_bchw, layer))

    def forward(self, x_b3hw: torch.Tensor) -> torch.Tensor:
        return self.head(self.pooled(x_b3hw))
