"""CLI commands of this subpackage (registered by mammo_sae.cli): `mammo-sae extract`."""

from __future__ import annotations

import argparse
import sys

from ..cli import add_command
from .extract import ExtractConfig


def run_extract(cfg: ExtractConfig, progress: bool = True) -> int:
    from .extract import extract
    from .store import ActivationStore

    path = extract(cfg, progress=progress)
    store = ActivationStore(path)
    failed = store.manifest.get("failed_images") or []
    print(f"{path}: {store.n_images} images, {store.n_patches} patches, d={store.d}, "
          f"{store.dtype}, grid={store.manifest.get('grid')}"
          + (f", {len(failed)} image(s) skipped" if failed else ""), file=sys.stderr)
    return 0


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add this subpackage's commands to the `mammo-sae` parser."""
    add_command(sub, "extract", ExtractConfig, run_extract,
                help="encoder layer → activation store (resumable, torchrun-aware)")
