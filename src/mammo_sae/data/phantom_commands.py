"""`mammo-sae phantom`: write the synthetic VinDr-layout dataset (see docs/phantom.md)."""

from __future__ import annotations

import argparse
import json

from ..cli import add_command
from ..io import writer_lock
from .phantom import PhantomConfig


def run_phantom(cfg: PhantomConfig, progress: bool = True) -> int:
    from .phantom import generate

    with writer_lock(cfg.out):
        summary = generate(cfg, progress=progress)
    print(json.dumps({"out": str(cfg.out), **summary}, indent=2))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this subpackage's commands to the `mammo-sae` parser."""
    add_command(
        sub,
        "phantom",
        PhantomConfig,
        run_phantom,
        "make the synthetic phantom dataset (VinDr folds-CSV layout, planted findings and confounder)",
    )
