"""Named EfficientNet family members: the lukemelas B0-B5 plus a tiny CPU member for the phantom."""

from __future__ import annotations

from ..errors import MammoSaeError, choices_message
from .efficientnet import ArchParams, EfficientNet, Padding

# lukemelas `efficientnet_params`: (width, depth, nominal image size, dropout).
ARCHS: dict[str, ArchParams] = {
    "efficientnet-b0": ArchParams("efficientnet-b0", 1.0, 1.0, 224, 0.2),
    "efficientnet-b1": ArchParams("efficientnet-b1", 1.0, 1.1, 240, 0.2),
    "efficientnet-b2": ArchParams("efficientnet-b2", 1.1, 1.2, 260, 0.3),
    "efficientnet-b3": ArchParams("efficientnet-b3", 1.2, 1.4, 300, 0.3),
    "efficientnet-b4": ArchParams("efficientnet-b4", 1.4, 1.8, 380, 0.4),
    "efficientnet-b5": ArchParams("efficientnet-b5", 1.6, 2.2, 456, 0.4),
    # Not in lukemelas: half-width, half-depth B0 (10 blocks, 640 output channels) so the phantom
    # pretext + probe + finetune cycle runs in CPU minutes. Same code path, own pad table.
    "efficientnet-phantom": ArchParams("efficientnet-phantom", 0.5, 0.5, 256, 0.2),
}

# Mammo-CLIP config `model.image_encoder.name` -> architecture (reference §2.1).
MAMMO_CLIP_NAMES: dict[str, str] = {
    "tf_efficientnet_b5_ns-detect": "efficientnet-b5",
    "tf_efficientnetv2-detect": "efficientnet-b2",
}


def list_archs() -> list[str]:
    return list(ARCHS)


def arch_params(arch: str) -> ArchParams:
    if arch not in ARCHS:
        raise MammoSaeError(choices_message("architecture", arch, list_archs()))
    return ARCHS[arch]


def create_encoder(arch: str, *, padding: Padding = "static") -> EfficientNet:
    """A randomly initialised encoder; `padding="dynamic"` exists only to show it is wrong."""
    return EfficientNet(arch_params(arch), padding=padding)
