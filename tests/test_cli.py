import subprocess
import sys

import pytest

from mammo_sae.cli import build_parser, main


def _commands() -> list[list[str]]:
    parser = build_parser()
    out: list[list[str]] = []
    for action in parser._subparsers._group_actions:  # type: ignore[union-attr]
        for name, sub in action.choices.items():
            out.append([name])
            for inner in getattr(sub, "_subparsers", None)._group_actions if sub._subparsers else []:
                out.extend([name, n] for n in inner.choices)
    return out


def test_top_level_help_lists_commands() -> None:
    proc = subprocess.run([sys.executable, "-m", "mammo_sae.cli", "--help"], capture_output=True, text=True)
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
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, EvalConfig)
    for text in ("512x320", "512,320"):
        ns = parser.parse_args(["--data", "d", "--model", "m", "--concept", "Mass", "--image-size", text])
        assert ns.image_size == [512, 320]
