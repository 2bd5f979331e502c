"""`mammo-sae` command line: one subcommand per stage, each a thin wrapper over the library.

`COMMANDS` below is the whole command table: each entry names a command, its config dataclass
(the options are generated from its fields, see `config.py`), the library function `run(cfg)`
that does the work, its help line and its positional arguments. Domain packages only define
config dataclasses and run functions; none of them imports this module.
A `MammoSaeError` is printed as `error: ...` with exit status 2; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import __version__, pipeline
from .activations import commands as activations
from .activations.extract import ExtractConfig
from .analysis import atlas_commands, explain_commands, localize_commands, retrieve_commands
from .analysis import commands as analysis
from .config import add_dataclass_args, from_namespace
from .data import commands as data
from .data import phantom_commands
from .data.phantom import PhantomConfig
from .errors import MammoSaeError
from .models import commands as models
from .models import train as classifier
from .report import commands as report
from .sae import commands as sae


@dataclass(frozen=True)
class Command:
    """One `mammo-sae` command: `name` is its words (`("sae", "train")` for a group's member)."""

    name: tuple[str, ...]
    config: type
    run: Callable[..., Any]
    help: str
    positional: tuple[str, ...] = ()


# Command groups (`mammo-sae sae train`) and their help lines.
GROUPS = {
    "data": "inspect datasets (VinDr folds CSV, official CSV, phantom)",
    "classifier": "concept classifiers: pretext pre-training, linear probe / finetune, evaluation",
    "store": "inspect and verify activation stores",
    "sae": "train, import, export and inspect sparse autoencoders",
}

# In the order of `mammo-sae --help` (a group appears where its first member does).
COMMANDS = (
    Command(
        ("data", "summary"),
        data.SummaryConfig,
        data.run_summary,
        "JSON counts per split: rows, images, patients, positives, boxes",
    ),
    Command(
        ("preprocess",),
        data.PreprocessConfig,
        data.run_preprocess,
        "VinDr DICOM tree -> Mammo-CLIP PNG layout + folds-style CSV",
    ),
    Command(
        ("ingest",),
        data.IngestConfig,
        data.run_ingest,
        "your own DICOM folder -> the tool's dataset layout (hashed ids, headers only)",
        positional=("dicom_dir",),
    ),
    Command(
        ("phantom",),
        PhantomConfig,
        phantom_commands.run_phantom,
        "make the synthetic phantom dataset (VinDr folds-CSV layout, planted findings and "
        "confounder)",
    ),
    Command(
        ("convert",),
        models.ConvertConfig,
        models.run_convert,
        "write a Mammo-CLIP (or own-format) encoder/classifier checkpoint in mammo-sae's own "
        "format",
    ),
    Command(
        ("classifier", "pretrain"),
        classifier.PretrainConfig,
        classifier.pretrain,
        "pretext pre-training without finding labels (density, view, laterality) -> encoder",
    ),
    Command(
        ("classifier", "train"),
        classifier.ClassifierTrainConfig,
        classifier.train_classifier,
        "train a concept classifier (linear probe or finetune); selects on a patient-level "
        "validation split",
    ),
    Command(
        ("classifier", "eval"),
        classifier.EvalConfig,
        classifier.evaluate_classifier,
        "AUROC / AUPRC with bootstrap 95 percent CIs of a classifier on one split (JSON out)",
    ),
    Command(
        ("extract",),
        ExtractConfig,
        activations.run_extract,
        "encoder layer → activation store (resumable, torchrun-aware)",
    ),
    Command(
        ("store", "info"),
        activations.StoreInfoConfig,
        activations.run_store_info,
        "print a store's manifest summary (JSON)",
    ),
    Command(
        ("store", "verify"),
        activations.StoreVerifyConfig,
        activations.run_store_verify,
        "recompute every checksum of a store; name the first corrupted file",
    ),
    Command(
        ("sae", "train"),
        sae.SAETrainConfig,
        sae.run_train,
        "train an SAE on an activation store (resumable)",
    ),
    Command(
        ("sae", "import"),
        sae.ImportConfig,
        sae.run_import,
        "convert a MammoSAE .pt (or SAELens folder) to the native format",
    ),
    Command(
        ("sae", "export"),
        sae.ExportConfig,
        sae.run_export,
        "export an SAE to another library's format (SAELens)",
    ),
    Command(("sae", "info"), sae.InfoConfig, sae.run_info, "print an SAE's config and metrics"),
    Command(
        ("summarize",),
        analysis.SummarizeConfig,
        analysis.run_summarize,
        "encode a store with an SAE once: cached per-image latent summaries",
    ),
    Command(
        ("probe",),
        analysis.ProbeConfig,
        analysis.run_probe,
        "class-wise latent scores and rankings",
    ),
    Command(
        ("intervene",),
        analysis.InterveneConfig,
        analysis.run_intervene,
        "top-k activated / deactivated sweeps, or a targeted latent edit",
    ),
    Command(
        ("fidelity",),
        analysis.FidelityConfig,
        analysis.run_fidelity,
        "AUROC with original vs SAE-reconstructed features (Table 1)",
    ),
    Command(
        ("separation",),
        analysis.SeparationConfig,
        analysis.run_separation,
        "class-mean latent vectors of several models; confounding-latent flags",
    ),
    Command(
        ("localize",),
        localize_commands.LocalizeConfig,
        localize_commands.run_localize,
        "localisation AP@IoU per latent for a concept (Table 2) and Figure-3 grids",
    ),
    Command(
        ("explain",),
        explain_commands.ExplainConfig,
        explain_commands.run_explain,
        "explain your own images: concept score, top SAE latents, heatmaps (HTML)",
        positional=("paths",),
    ),
    Command(
        ("atlas",),
        atlas_commands.AtlasConfig,
        atlas_commands.run_atlas,
        "describe every latent: activity, label associations (FDR), spatial profile, "
        "logit effects, automatic names, co-activation clusters",
    ),
    Command(
        ("retrieve",),
        retrieve_commands.RetrieveConfig,
        retrieve_commands.run_retrieve,
        "nearest images by SAE latent fingerprint vs raw pooled features; images where given "
        "latents fire; label precision@k",
    ),
    Command(
        ("report",),
        report.ReportConfig,
        report.run_report,
        "static offline HTML report of a run directory (figures + JSON beside it)",
    ),
    Command(
        ("run",),
        pipeline.RunConfig,
        pipeline.run_pipeline,
        "run every stage of a pipeline config",
        positional=("config",),
    ),
    Command(
        ("demo",),
        pipeline.DemoConfig,
        pipeline.run_demo,
        "the phantom pipeline end to end (CPU minutes)",
    ),
)


def add_command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], command: Command
) -> argparse.ArgumentParser:
    """Declare a subcommand whose options are the fields of `command.config`."""
    cfg_cls, run, help = command.config, command.run, command.help
    doc = (cfg_cls.__doc__ or "").strip()
    p = sub.add_parser(
        command.name[-1],
        help=help,
        description=f"{help}\n\n{doc}" if doc else help,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_dataclass_args(p, cfg_cls, positional=command.positional)
    p.set_defaults(_run=lambda ns: run(from_namespace(cfg_cls, ns)))
    return p


def add_group(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help: str
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """A command with its own subcommands (`mammo-sae sae train`, `mammo-sae data summary`)."""
    p = sub.add_parser(name, help=help, description=help)
    inner = p.add_subparsers(dest=f"{name}_command", metavar="COMMAND", required=True)
    return inner


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mammo-sae",
        description="Sparse autoencoders for mammography foundation models (Mammo-SAE).",
    )
    parser.add_argument("--version", action="version", version=f"mammo-sae {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction[argparse.ArgumentParser]] = {}
    for command in COMMANDS:
        where = sub
        if len(command.name) == 2:
            group = command.name[0]
            if group not in groups:
                groups[group] = add_group(sub, group, GROUPS[group])
            where = groups[group]
        add_command(where, command)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        result = ns._run(ns)
    except MammoSaeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # The file system refused (read-only, full, a file where a folder should be, ...):
        # the user's environment, not a bug, so a message rather than a traceback.
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted; finished work is kept (see this command's --help for how to resume)",
            file=sys.stderr,
        )
        return 130
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
