"""Loaders never run code from a file (docs/security.md): TorchScript archives and pickles naming
unsafe globals are refused, through every entry point that reads a model, an SAE or a training
state, with a message naming the problem; our own files are checked against their recorded hash."""

from __future__ import annotations

import dataclasses
import os
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from mammo_sae.cli import main
from mammo_sae.errors import CheckpointError, MammoSaeError
from mammo_sae.io import load_torch_weights
from mammo_sae.models.checkpoints import convert, load_classifier, load_image_encoder, save_model

# --- payloads: each creates the file `target` when loaded the unsafe way -----------------------


class _Evil(torch.nn.Module):
    """Scripted, its __setstate__ runs inside torch.jit.load and creates `target` (from_file with
    shared=True opens the path for writing)."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target
        self.probe = torch.zeros(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> tuple[str, torch.Tensor, bool]:
        return (self.target, self.probe, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, torch.Tensor, bool]) -> None:
        self.target = state[0]
        self.training = state[2]
        self.probe = torch.from_file(self.target, shared=True, size=1)


class _Exec:
    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self) -> Any:  # builtins.exec
        return (exec, (f"open({self.target!r}, 'w').write('pwned')",))


class _System:
    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self) -> Any:  # os.system (pickled as posix.system on Linux)
        return (os.system, (f"touch '{self.target}'",))


PAYLOADS = {  # name -> what the refusal must name
    "torchscript": "TorchScript archive",
    "exec-zip": "builtins.exec",
    "system-legacy": f"{os.system.__module__}.system",
}


def write_payload(kind: str, path: Path, target: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "torchscript":
        torch.jit.save(torch.jit.script(_Evil(str(target))), str(path))
    elif kind == "exec-zip":
        sd = {"image_encoder._conv_stem.weight": torch.zeros(1)}
        torch.save({"model": sd, "x": _Exec(target)}, path)
    else:
        torch.save(
            {"W_enc": torch.zeros(1), "x": _System(target)},
            path,
            _use_new_zipfile_serialization=False,
        )
    return path


@pytest.fixture(params=list(PAYLOADS))
def payload(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, Path, str]:
    """(payload file, the file it would create, what the refusal names)."""
    target = tmp_path / "created_by_payload"
    path = write_payload(request.param, tmp_path / "in" / "evil.pt", target)
    return path, target, PAYLOADS[request.param]


def _check_message(message: str, names: str, path: Path) -> None:
    assert names in message and str(path) in message, message
    assert "weights_only" not in message and "add_safe_globals" not in message, message


@pytest.mark.parametrize("kind", list(PAYLOADS))
def test_payloads_are_live(tmp_path: Path, kind: str) -> None:
    """Loaded the unsafe way, each payload does create its file (so the tests below can fail)."""
    target = tmp_path / "created"
    path = write_payload(kind, tmp_path / "evil.pt", target)
    if kind == "torchscript":
        torch.jit.load(str(path))
    else:
        torch.load(path, weights_only=False)
    assert target.exists()


# --- library entry points ----------------------------------------------------------------------


def _load_head(p: Path, tmp: Path) -> Any:
    from mammo_sae.analysis.intervene import load_head

    return load_head(p)


def _load_encoder(p: Path, tmp: Path) -> Any:
    from mammo_sae.models.checkpoints import load_encoder

    return load_encoder(str(p), flag="--init")[0]


def _load_sae(p: Path, tmp: Path) -> Any:
    from mammo_sae.sae.checkpoints import load_sae

    return load_sae(p)


def _load_mammosae_pt(p: Path, tmp: Path) -> Any:
    from mammo_sae.sae.checkpoints import load_mammosae_pt

    return load_mammosae_pt(p)


LIBRARY: dict[str, Callable[[Path, Path], Any]] = {
    "load_image_encoder": lambda p, tmp: load_image_encoder(p),
    "load_classifier": lambda p, tmp: load_classifier(p),
    "convert": lambda p, tmp: convert(p, tmp / "converted"),
    "intervene.load_head": _load_head,
    "checkpoints.load_encoder": _load_encoder,
    "load_sae": _load_sae,
    "load_mammosae_pt": _load_mammosae_pt,
    "load_torch_weights": lambda p, tmp: load_torch_weights(p, "a checkpoint"),
}


@pytest.mark.parametrize("entry", list(LIBRARY))
def test_library_loaders_refuse_payloads(
    tmp_path: Path, payload: tuple[Path, Path, str], entry: str
) -> None:
    path, target, names = payload
    with pytest.raises(CheckpointError) as err:
        LIBRARY[entry](path, tmp_path)
    assert not target.exists()
    _check_message(str(err.value), names, path)
    assert not (tmp_path / "converted").exists()


# --- CLI entry points (exit 2, message on stderr) ----------------------------------------------


@pytest.fixture(scope="module")
def tiny_sae(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mammo_sae.sae.checkpoints import save_sae
    from mammo_sae.sae.model import SAEConfig, SparseAutoencoder

    return save_sae(
        SparseAutoencoder(SAEConfig(architecture="relu-l1", d=8, h=16), seed=0),
        tmp_path_factory.mktemp("sae") / "sae",
    )


def _run_config(tmp: Path, data: Path, model: Path) -> str:
    config = tmp / "pipeline.yaml"
    config.write_text(
        f"name: evil\ndevice: cpu\ndata: {{kind: folds, path: {data}}}\n"
        f"models:\n  kind: checkpoints\n  concepts: [Mass]\n  checkpoints:\n"
        f"    Mass: {{pretrained: {model}, finetuned: {model}}}\n"
        "extract: {sae_source: Mass/finetuned}\n"
    )
    return str(config)


# (model, data, sae, tmp) -> argv
CLI: dict[str, Callable[[Path, Path, Path, Path], list[str]]] = {
    "convert": lambda m, d, s, t: ["convert", "--model", str(m), "--out", str(t / "out")],
    "extract": lambda m, d, s, t: [
        "extract",
        "--data",
        str(d),
        "--model",
        str(m),
        "--out",
        str(t / "out"),
        "--no-progress",
    ],
    "classifier eval": lambda m, d, s, t: [
        "classifier",
        "eval",
        "--data",
        str(d),
        "--model",
        str(m),
        "--concept",
        "Mass",
        "--out",
        str(t / "e.json"),
    ],
    "classifier train --init": lambda m, d, s, t: [
        "classifier",
        "train",
        "--data",
        str(d),
        "--init",
        str(m),
        "--concept",
        "Mass",
        "--out",
        str(t / "out"),
        "--no-progress",
    ],
    "intervene": lambda m, d, s, t: [
        "intervene",
        "--store",
        str(t / "store"),
        "--sae",
        str(s),
        "--classifier",
        str(m),
        "--out",
        str(t / "out"),
    ],
    "fidelity": lambda m, d, s, t: [
        "fidelity",
        "--stores",
        str(t / "store"),
        "--classifiers",
        str(m),
        "--sae",
        str(s),
        "--out",
        str(t / "out"),
    ],
    "sae import": lambda m, d, s, t: ["sae", "import", "--src", str(m), "--out", str(t / "out")],
    "sae info": lambda m, d, s, t: ["sae", "info", "--sae", str(m)],
    "run (models.kind: checkpoints)": lambda m, d, s, t: [
        "run",
        _run_config(t, d, m),
        "--out",
        str(t / "out"),
        "--no-progress",
    ],
}


@pytest.mark.parametrize("command", list(CLI))
def test_cli_refuses_payloads(
    tmp_path: Path,
    payload: tuple[Path, Path, str],
    command: str,
    tiny_phantom: Path,
    tiny_sae: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, target, names = payload
    assert main(CLI[command](path, tiny_phantom, tiny_sae, tmp_path)) == 2
    assert not target.exists()
    _check_message(capsys.readouterr().err, names, path)


# --- training states (sae train --resume, classifier train --resume) ----------------------------


@pytest.fixture(scope="module")
def sae_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mammo_sae.sae.train import SAETrainConfig, TensorSource, train_sae

    out = tmp_path_factory.mktemp("sae_run") / "run"
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(0)).relu() + 0.1
    train_sae(
        SAETrainConfig(
            out=out,
            expansion=2,
            batch_size=50,
            epochs=1,
            max_steps=2,
            progress=False,
            measure_matmul=False,
            eval_patches=64,
        ),
        TensorSource(x),
    )
    return out


def test_sae_training_state_refuses_payloads(
    tmp_path: Path, payload: tuple[Path, Path, str], sae_run: Path
) -> None:
    from mammo_sae.sae.train import STATE_FILE, SAETrainConfig, TensorSource, train_sae

    path, target, names = payload
    run = shutil.copytree(sae_run, tmp_path / "run")
    shutil.copyfile(path, run / STATE_FILE)
    cfg = SAETrainConfig(
        out=run,
        expansion=2,
        batch_size=50,
        epochs=1,
        max_steps=2,
        progress=False,
        measure_matmul=False,
        eval_patches=64,
        resume=True,
    )
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(0)).relu() + 0.1
    with pytest.raises(CheckpointError) as err:
        train_sae(cfg, TensorSource(x))
    assert not target.exists()
    _check_message(str(err.value), names, run / STATE_FILE)


@pytest.fixture(scope="module")
def classifier_run(tiny_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from mammo_sae.models import train as T

    cfg = T.ClassifierTrainConfig(
        data=tiny_phantom,
        concept="Mass",
        out=tmp_path_factory.mktemp("clf") / "run",
        init="efficientnet-phantom",
        epochs=1,
        batch_size=8,
        image_size=[128, 80],
        progress=False,
        val_fraction=0.3,
        seed=1,
    )
    T.train_classifier(cfg)
    return cfg


def test_classifier_training_state_refuses_payloads(
    payload: tuple[Path, Path, str], classifier_run: Any
) -> None:
    from mammo_sae.models import train as T

    path, target, names = payload
    # the run records its out dir, so it is not copied: each test replaces its state file
    state = classifier_run.out / "checkpoints" / "last" / T.STATE_NAME
    assert state.is_file()
    shutil.copyfile(path, state)
    with pytest.raises(MammoSaeError) as err:
        T.train_classifier(dataclasses.replace(classifier_run, resume=True))
    assert not target.exists()
    _check_message(str(err.value), names, state)


# --- other refusals before torch sees the file -------------------------------------------------


def test_non_checkpoint_files_are_refused_by_name(tmp_path: Path) -> None:
    archive = tmp_path / "notes.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("notes/readme.txt", "hello")
    with pytest.raises(CheckpointError, match=r"notes\.zip.*checkpoint \(no data\.pkl\)"):
        load_image_encoder(archive)
    script = tmp_path / "model.py"
    script.write_text("import os\n")
    with pytest.raises(CheckpointError, match=r"model\.py.*not a torch checkpoint"):
        load_classifier(script)


def test_safetensors_file_loads_as_a_state_dict(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    sd = {"encoder.w": torch.arange(6.0).reshape(2, 3)}
    save_file(sd, str(tmp_path / "w.bin"))
    loaded = load_torch_weights(tmp_path / "w.bin", "weights")
    assert list(loaded) == ["encoder.w"] and torch.equal(loaded["encoder.w"], sd["encoder.w"])


# --- integrity of our own files ----------------------------------------------------------------


def test_own_format_flipped_weight_byte_is_refused(tmp_path: Path) -> None:
    from mammo_sae.models.classifier import ConceptClassifier
    from mammo_sae.models.registry import create_encoder

    torch.manual_seed(0)
    model = ConceptClassifier(create_encoder("efficientnet-phantom"), 1, concept="Mass")
    out = save_model(model, tmp_path / "c")
    weights = out / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-5] ^= 0x01  # inside the tensor data: safetensors itself still reads the file
    weights.write_bytes(bytes(raw))
    for load in (load_classifier, load_image_encoder):
        with pytest.raises(
            CheckpointError, match=r"model\.safetensors: checksum differs from .*config\.json"
        ):
            load(out)
    assert main(["convert", "--model", str(out), "--out", str(tmp_path / "copy")]) == 2
    assert not (tmp_path / "copy").exists()
