"""CLI commands of this subpackage (registered by mammo_sae.cli)."""

from __future__ import annotations

import argparse


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add this subpackage's commands to the `mammo-sae` parser."""
