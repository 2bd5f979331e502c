"""`mammo-sae phantom`: write the synthetic VinDr-layout dataset (see docs/phantom.md)."""

from __future__ import annotations

import json

from ..io import writer_lock
from .phantom import PhantomConfig


def run_phantom(cfg: PhantomConfig) -> int:
    from .phantom import generate

    with writer_lock(cfg.out):
        summary = generate(cfg, progress=cfg.progress)
    print(json.dumps({"out": str(cfg.out), **summary}, indent=2))
    return 0
