"""`mammo-sae classifier pretrain | train | eval` (registered by mammo_sae.cli)."""

from __future__ import annotations

import argparse
from typing import Any


def _pretrain(cfg: Any) -> int:
    from .train import pretrain

    pretrain(cfg)
    return 0


def _train(cfg: Any) -> int:
    from .train import train_classifier

    train_classifier(cfg)
    return 0


def _eval(cfg: Any) -> int:
    from .train import evaluate_classifier

    evaluate_classifier(cfg)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `classifier` with its subcommands to the `mammo-sae` parser."""
    from ..cli import add_command, add_group
    from .train import EvalConfig, PretrainConfig, TrainConfig

    group = add_group(
        sub,
        "classifier",
        "concept classifiers: pretext pre-training, linear probe / finetune, evaluation",
    )
    add_command(
        group,
        "pretrain",
        PretrainConfig,
        _pretrain,
        "pretext pre-training without finding labels (density, view, laterality) -> encoder",
    )
    add_command(
        group,
        "train",
        TrainConfig,
        _train,
        "train a concept classifier (linear probe or finetune); selects on a patient-level "
        "validation split",
    )
    add_command(
        group,
        "eval",
        EvalConfig,
        _eval,
        "AUROC / AUPRC with bootstrap 95 percent CIs of a classifier on one split (JSON out)",
    )
