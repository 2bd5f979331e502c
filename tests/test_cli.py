import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mammo_sae.cli import build_parser, main


def _commands() -> list[list[str]]:
    parser = build_parser()
    out: list[list[str]] = []
    for action in parser._subparsers._group_actions:  # type: ignore[union-attr]
        for name, sub in action.choices.items():
            out.append([name])
            for inner in (
                getattr(sub, "_subparsers", None)._group_actions if sub._subparsers else []
            ):
                out.extend([name, n] for n in inner.choices)
    return out


def test_top_level_help_lists_commands() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mammo_sae.cli", "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0
    assert "mammo-sae" in proc.stdout


@pytest.mark.parametrize("argv", _commands(), ids=lambda a: " ".join(a))
def test_every_command_has_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_image_sizes_read_the_same_in_every_command() -> None:
    """`--image-size` takes 512x320 and 512,320 alike (classifier and extract commands)."""
    import argparse

    from mammo_sae.activations.extract import parse_size
    from mammo_sae.config import add_dataclass_args
    from mammo_sae.models.train import EvalConfig

    assert parse_size("512x320") == parse_size("512,320") == (512, 320)
    from mammo_sae.errors import MammoSaeError

    with pytest.raises(MammoSaeError, match="at least 32x32"):  # smaller failed inside the encoder
        parse_size("8x8")
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, EvalConfig)
    for text in ("512x320", "512,320"):
        ns = parser.parse_args(
            ["--data", "d", "--model", "m", "--concept", "Mass", "--image-size", text]
        )
        assert ns.image_size == [512, 320]


def test_config_values_are_typed_and_typos_fail_at_dry_run(tmp_path, capsys) -> None:
    """YAML reads `1e-3` as a string: converted to the field's type; a wrong value or a misspelled
    option inside any section is named by `run --dry-run`, before any stage runs."""
    from pathlib import Path

    from mammo_sae.config import from_dict
    from mammo_sae.errors import MammoSaeError
    from mammo_sae.sae.train import SAETrainConfig

    cfg = from_dict(
        SAETrainConfig, {"lr": "1e-3", "epochs": "10", "bf16": "false", "batch_size": 1024.0}
    )
    assert (cfg.lr, cfg.epochs, cfg.bf16, cfg.batch_size) == (1e-3, 10, False, 1024)
    with pytest.raises(MammoSaeError, match="epochs: expected int, got 'ten'"):
        from_dict(SAETrainConfig, {"epochs": "ten"})
    base = Path("configs/phantom.yaml").read_text()
    cases = [
        (base.replace("  expansion: 4", "  expansoin: 4"), "unknown key(s) ['expansoin']"),
        (base.replace("  lr: 1.0e-3", "  lr: fast"), "sae.lr: expected float, got 'fast'"),
        (base.replace("    n_images: 480", "    n_imagse: 480"), "data.phantom: unknown key(s)"),
    ]
    for i, (text, message) in enumerate(cases):
        assert text != base
        path = tmp_path / f"c{i}.yaml"
        path.write_text(text)
        assert main(["run", str(path), "--out", str(tmp_path / f"r{i}"), "--dry-run"]) == 2
        assert message in capsys.readouterr().err
    path = tmp_path / "ok.yaml"
    path.write_text(base.replace("  lr: 1.0e-3", "  lr: 1e-3"))
    assert main(["run", str(path), "--out", str(tmp_path / "ok"), "--dry-run"]) == 0


def test_no_progress_is_accepted_by_commands_without_a_progress_option(tmp_path) -> None:
    for cmd in (["extract"], ["phantom"], ["preprocess"]):
        assert (
            "--no-progress"
            in subprocess.run(
                [sys.executable, "-m", "mammo_sae", *cmd, "--help"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        ), cmd
    assert (
        main(
            [
                "phantom",
                "--out",
                str(tmp_path / "ph"),
                "--n-images",
                "4",
                "--height",
                "128",
                "--width",
                "80",
                "--no-progress",
            ]
        )
        == 0
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["sae", "train", "--store", "s", "--out", "o", "--lr", "-1"],
            "--lr must be > 0.0, got -1.0",
        ),
        (
            ["sae", "train", "--store", "s", "--out", "o", "--epochs", "0"],
            "--epochs must be ≥ 1, got 0",
        ),
        (
            ["sae", "train", "--store", "s", "--out", "o", "--l1-coeff", "nan"],
            "--l1-coeff must be a number",
        ),
        (
            [
                "classifier",
                "train",
                "--data",
                "d",
                "--concept",
                "Mass",
                "--out",
                "o",
                "--init",
                "x",
                "--dropout",
                "1",
            ],
            "--dropout must be < 1.0",
        ),
        (
            ["extract", "--data", "d", "--model", "m", "--out", "o", "--max-images", "-3"],
            "--max-images must be ≥ 1",
        ),
        (
            [
                "probe",
                "--store",
                "s",
                "--sae",
                "x",
                "--concept",
                "Mass",
                "--out",
                "o",
                "--top",
                "-5",
            ],
            "--top must be ≥ 1",
        ),
        (
            [
                "intervene",
                "--store",
                "s",
                "--sae",
                "x",
                "--classifier",
                "c",
                "--concept",
                "Mass",
                "--rankings",
                "r",
                "--out",
                "o",
                "--n-boot",
                "-5",
            ],
            "--n-boot must be ≥ 0",
        ),
        (
            [
                "separation",
                "--sae",
                "x",
                "--concept",
                "Mass",
                "--stores",
                "a,b",
                "--out",
                "o",
                "--confounder-threshold",
                "-2",
            ],
            "--confounder-threshold must be ≥ 0.0",
        ),
    ],
)
def test_out_of_range_options_fail_before_any_work(
    tmp_path, capsys, monkeypatch, argv, message
) -> None:
    monkeypatch.chdir(tmp_path)  # the relative --out o would land here
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_out_of_range_config_values_are_named_by_their_key(tmp_path, capsys) -> None:
    from pathlib import Path

    base = Path("configs/phantom.yaml").read_text()
    for i, (old, new, message) in enumerate(
        [
            ("  lr: 1.0e-3", "  lr: -1.0e-3", "sae.lr must be > 0.0"),
            ("  epochs: 30", "  epochs: 0", "sae.epochs must be ≥ 1"),
        ]
    ):
        assert old in base
        path = tmp_path / f"c{i}.yaml"
        path.write_text(base.replace(old, new))
        assert main(["run", str(path), "--out", str(tmp_path / f"r{i}"), "--dry-run"]) == 2
        assert message in capsys.readouterr().err


def test_file_system_refusals_are_messages_not_tracebacks(tmp_path, capsys) -> None:
    (tmp_path / "a_file").write_text("x")
    assert (
        main(
            [
                "phantom",
                "--out",
                str(tmp_path / "a_file" / "ph"),
                "--n-images",
                "4",
                "--height",
                "64",
                "--width",
                "64",
                "--no-progress",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "a_file" in err and "Traceback" not in err


def test_atomic_writes_name_the_file_and_leave_no_temporary(tmp_path, monkeypatch) -> None:
    from mammo_sae import io
    from mammo_sae.errors import MammoSaeError

    def failing_write(message: str) -> None:
        with io.atomic_path(tmp_path / "out.bin") as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError(message)

    with pytest.raises(MammoSaeError, match=r"could not write .*out\.bin.*unexpected pos"):
        failing_write("[enforce fail at inline_container.cc:672] . unexpected pos 7360 vs 7254")
    with pytest.raises(RuntimeError, match="a bug"):  # plenty of disk: not a write failure
        failing_write("a bug")
    monkeypatch.setattr(io, "free_bytes", lambda folder: 1024)
    with pytest.raises(MammoSaeError, match="0.0 MiB free"):  # nearly full: said so
        failing_write("some library's own words")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    (tmp_path / "blocker").write_text("")
    with pytest.raises(MammoSaeError, match=r"could not write .*blocker"):  # a file, not a folder
        with io.atomic_path(tmp_path / "blocker" / "y"):
            pass


def test_device_names_are_checked_in_one_place() -> None:
    import torch

    from mammo_sae.devices import resolve_device
    from mammo_sae.errors import MammoSaeError

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "gpu0", "cuda:99"):
        with pytest.raises(MammoSaeError, match=f"--device {bad}"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(MammoSaeError, match="no CUDA device is available"):
            resolve_device("cuda")
    else:
        assert resolve_device("cuda", local_rank=0) == torch.device("cuda", 0)


# ------------------------------------------------------------------ the CLI surface, frozen
# tests/fixtures/cli_surface.json was written by the CLI before the command table moved into
# cli.py (issue 13): every command name, flag, default, choice and help text must stay the same.
# After an intended change to the CLI, regenerate it with
#   PYTHONPATH=src:. python -c "import tests.test_cli as t; t.write_surface()"
SURFACE = Path(__file__).parent / "fixtures" / "cli_surface.json"


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)


def _action(action: argparse.Action) -> dict[str, Any]:
    return {
        "flags": list(action.option_strings),
        "dest": action.dest,
        "default": _plain(action.default),
        "help": action.help,
        "choices": _plain(action.choices),
        "required": action.required,
        "nargs": _plain(action.nargs),
        "metavar": _plain(action.metavar),
    }


def cli_surface() -> dict[str, Any]:
    """Every (sub)command's description, subcommand help lines, options and positionals."""
    out: dict[str, Any] = {}

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        entry: dict[str, Any] = {"description": parser.description, "options": [], "args": []}
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                entry["commands"] = {c.dest: c.help for c in action._choices_actions}
                for name, child in action.choices.items():
                    walk(child, f"{path} {name}".strip())
            elif action.option_strings:
                entry["options"].append(_action(action))
            else:
                entry["args"].append(_action(action))
        out[path or "mammo-sae"] = entry

    walk(build_parser(), "")
    return dict(sorted(out.items()))


def write_surface(path: Path = SURFACE) -> None:
    """The surface as JSON, one argument per line (diffs stay readable)."""

    def dump(value: Any) -> str:
        return json.dumps(value, ensure_ascii=False)

    lines = ["{"]
    items = list(cli_surface().items())
    for i, (name, entry) in enumerate(items):
        lines.append(f"  {json.dumps(name)}: {{")
        lines.append(f'    "description": {dump(entry["description"])},')
        if "commands" in entry:
            lines.append(f'    "commands": {dump(entry["commands"])},')
        for key in ("options", "args"):
            rows = [dump(a) for a in entry[key]]
            end = "," if key == "options" else ""
            lines.append(f'    "{key}": [' + ",".join(f"\n      {r}" for r in rows) + "]" + end)
        lines.append("  }" + ("," if i < len(items) - 1 else ""))
    lines.append("}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_cli_surface_is_unchanged() -> None:
    expected = json.loads(SURFACE.read_text(encoding="utf-8"))
    now = cli_surface()
    assert sorted(now) == sorted(expected), "commands added or removed"
    for name in expected:
        assert now[name] == expected[name], name


SRC = Path(__file__).parents[1] / "src" / "mammo_sae"


def _imports(path: Path) -> list[tuple[int, list[str]]]:
    """(line, imported names) of every import statement in a module, at any depth."""
    import ast

    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            out.append((node.lineno, [node.module or ""] + [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out.append((node.lineno, [a.name for a in node.names]))
    return out


def test_domain_modules_do_not_import_the_cli() -> None:
    """The library sits under the CLI: only cli.py (and `python -m`) know the command table."""
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name in ("cli.py", "__main__.py") and path.parent == SRC:
            continue
        for line, names in _imports(path):
            if any(n == "cli" or n.endswith(".cli") for n in names):
                offenders.append(f"{path.relative_to(SRC)}:{line}")
    assert offenders == []


def test_analysis_does_not_import_the_report() -> None:
    """analysis sits below report: the HTML blocks both use live in `html_blocks`, below both."""
    offenders = [
        f"{path.relative_to(SRC)}:{line}"
        for path in sorted((SRC / "analysis").rglob("*.py"))
        for line, names in _imports(path)
        if any(n == "report" or n.startswith(("report.", "mammo_sae.report")) for n in names)
    ]
    assert offenders == []


def test_an_option_can_be_spelled_other_than_its_field() -> None:
    """`opt(flag="--from")` (a Python keyword as field name): parsed, bound-checked and named."""
    from dataclasses import dataclass

    from mammo_sae.config import add_dataclass_args, from_namespace, opt
    from mammo_sae.errors import MammoSaeError

    @dataclass
    class Cfg:
        start: int = opt(0, flag="--from", min=0, help="first step")

    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, Cfg)
    assert from_namespace(Cfg, parser.parse_args(["--from", "3"])).start == 3
    with pytest.raises(MammoSaeError, match="--from must be ≥ 0, got -1"):
        from_namespace(Cfg, parser.parse_args(["--from", "-1"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["--start", "3"])
    ns = build_parser().parse_args(["run", "c.yaml", "--from", "sae"])
    assert (ns.config, ns.start) == (Path("c.yaml"), "sae")


def test_every_command_runs_from_its_config_alone() -> None:
    """One way to pass an option: every run function takes only its config (no `progress=`
    passed around it), and `--progress` is a config field that never changes a result."""
    import dataclasses
    import inspect

    from mammo_sae.cli import COMMANDS

    for command in COMMANDS:
        name = " ".join(command.name)
        assert len(inspect.signature(command.run).parameters) == 1, name
        fields = {f.name: f for f in dataclasses.fields(command.config)}
        if name in ("extract", "store verify", "preprocess", "ingest", "phantom"):
            assert fields["progress"].metadata["affects_result"] is False, name
