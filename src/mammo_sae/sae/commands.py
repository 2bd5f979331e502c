"""`mammo-sae sae train | import | export | info`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..config import opt
from ..io import dumps_json
from .train import SAETrainConfig


@dataclass
class ImportConfig:
    """Converts a released MammoSAE `sparse_autoencoder_final.pt` (1.3.0 or later key names) or a
    SAELens folder into a native SAE directory (sae.safetensors + cfg.json). Weights are copied
    as stored, without renormalisation."""

    src: Path = opt(help="MammoSAE .pt file or SAELens folder")
    out: Path = opt(help="output directory")


@dataclass
class ExportConfig:
    """Writes an SAE (any loadable format) as a SAELens v6 folder: cfg.json + sae_weights.safetensors,
    with any input normalisation folded into the weights."""

    sae: Path = opt(help="SAE checkpoint (native directory or MammoSAE .pt)")
    out: Path = opt(help="output directory")
    to: Literal["saelens"] = opt("saelens", help="target format")


@dataclass
class InfoConfig:
    """Prints an SAE's configuration, training record and final metrics as JSON."""

    sae: Path = opt(help="SAE checkpoint (native directory, SAELens folder or MammoSAE .pt)")


def run_train(cfg: SAETrainConfig) -> int:
    from .train import train_sae

    out = train_sae(cfg)
    meta = json.loads((out / "cfg.json").read_text()) if (out / "cfg.json").is_file() else {}
    print(
        dumps_json(
            {
                "out": str(out),
                "final_metrics": meta.get("final_metrics", {}),
                "training": {k: v for k, v in meta.get("training", {}).items() if k != "config"},
            }
        ),
        end="",
    )
    return 0


def run_import(cfg: ImportConfig) -> int:
    from .checkpoints import load_sae, sae_sha256, save_sae

    sae = load_sae(cfg.src)
    save_sae(
        sae, cfg.out, extra={"imported_from": {"path": str(cfg.src), "sha256": sae_sha256(cfg.src)}}
    )
    print(
        dumps_json({"out": str(cfg.out), "d": sae.d, "h": sae.h, "architecture": sae.architecture}),
        end="",
    )
    return 0


def run_export(cfg: ExportConfig) -> int:
    from .checkpoints import export_saelens, load_sae, sae_sha256

    sae = load_sae(cfg.sae)
    export_saelens(sae, cfg.out, metadata={"mammo_sae_source_sha256": sae_sha256(cfg.sae)})
    print(dumps_json({"out": str(cfg.out), "format": cfg.to}), end="")
    return 0


def run_info(cfg: InfoConfig) -> int:
    from .checkpoints import describe

    print(dumps_json(describe(cfg.sae)), end="")
    return 0
