"""`mammo-sae convert`: any supported encoder/classifier checkpoint -> the package's own format."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..config import opt
from ..io import writer_lock


@dataclass
class ConvertConfig:
    """Reads a Mammo-CLIP pre-training .tar, a Mammo-CLIP downstream classifier .pth or a
    mammo-sae model directory through the restricted unpickler, checks every key and shape,
    and writes OUT/model.safetensors + OUT/config.json (see docs/models.md)."""

    model: Path = opt(help="checkpoint to convert (.tar, .pth or a mammo-sae model directory)")
    out: Path = opt(help="output directory")
    concept: str | None = opt(
        None, help="concept name to record for a classifier (Mammo-CLIP files do not store it)"
    )


def run_convert(cfg: ConvertConfig) -> int:
    from .checkpoints import convert

    with writer_lock(cfg.out):
        config = convert(cfg.model, cfg.out, concept=cfg.concept)
    print(json.dumps({"out": str(cfg.out), **config}, indent=2))
    return 0
