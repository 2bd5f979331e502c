"""`mammo-sae` command line: one subcommand per stage, each a thin wrapper over the library.

Every command is declared with `add_command(subparsers, name, ConfigDataclass, run_fn)`:
the options are generated from the config dataclass (see `config.py`), and `run_fn(cfg)`
does the work. Subpackages register their commands in their own `commands.py`.
A `MammoSaeError` is printed as `error: ...` with exit status 2; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import sys
from collections.abc import Callable
from typing import Any

from . import __version__
from .config import add_dataclass_args, from_namespace
from .errors import MammoSaeError

# Modules that contribute subcommands, in the order they appear in `--help`.
COMMAND_MODULES = (
    "mammo_sae.data.commands",
    "mammo_sae.data.phantom_commands",
    "mammo_sae.models.commands",
    "mammo_sae.models.train_commands",
    "mammo_sae.activations.commands",
    "mammo_sae.sae.commands",
    "mammo_sae.analysis.commands",
    "mammo_sae.analysis.localize_commands",
    "mammo_sae.analysis.explain_commands",
    "mammo_sae.analysis.atlas_commands",
    "mammo_sae.analysis.retrieve_commands",
    "mammo_sae.report.commands",
    "mammo_sae.pipeline",
)


def add_command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    cfg_cls: type,
    run: Callable[[Any], Any],
    help: str,
    *,
    positional: tuple[str, ...] = (),
) -> argparse.ArgumentParser:
    """Declare a subcommand whose options are the fields of `cfg_cls`."""
    doc = (cfg_cls.__doc__ or "").strip()
    p = sub.add_parser(
        name,
        help=help,
        description=f"{help}\n\n{doc}" if doc else help,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_dataclass_args(p, cfg_cls, positional=positional)
    has_field = "progress" in {f.name for f in dataclasses.fields(cfg_cls)}
    if not has_field and "progress" in inspect.signature(run).parameters:
        # Commands whose config has no `progress` field (it would change a store's identity)
        # still take --no-progress, passed to the run function.
        p.add_argument(
            "--progress",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="show progress bars (default: True)",
        )
        p.set_defaults(_run=lambda ns: run(from_namespace(cfg_cls, ns), progress=ns.progress))
    else:
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
    for module_name in COMMAND_MODULES:
        module = importlib.import_module(module_name)
        module.register(sub)
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
