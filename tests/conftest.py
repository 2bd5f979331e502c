"""Shared test fixtures. Tests that need ../shared skip with a reason when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MAMMO_SAE_SHARED", ROOT.parent / "shared"))

torch.set_flush_denormal(True)


def need_shared(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the project's ../shared folder)")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return need_shared()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small phantom dataset (40 images, 256x160, seed 0), generated once per session.

    Layout: `vindr_detection_v1_folds.csv` + `images_png/` + `phantom.json` (see docs/phantom.md).
    Treat it as read-only: other tests share it.
    """
    from mammo_sae.data.phantom import PhantomConfig, generate

    out = tmp_path_factory.mktemp("tiny_phantom")
    generate(
        PhantomConfig(out=out, n_images=40, height=256, width=160, seed=0, workers=1),
        progress=False,
    )
    return out


def save_he_encoder(folder: Path) -> Path:
    """A phantom encoder with He-initialised convolutions saved in our format. Torch's default
    init collapses the final map to ~1e-13, so every image would get the same features."""
    import torch

    from mammo_sae.models.checkpoints import save_model
    from mammo_sae.models.registry import create_encoder

    torch.manual_seed(0)
    encoder = create_encoder("efficientnet-phantom")
    for m in encoder.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    save_model(encoder, folder)
    return folder


def train_mass_linear_probe(data: Path, root: Path, *extra: str) -> Path:
    """A Mass linear probe on a He-initialised phantom encoder (`save_he_encoder`: torch's
    default init would give every image the same features), trained through the CLI into
    ROOT/clf; `extra` are further `classifier train` flags (epochs, image size, ...). Returns
    the model folder."""
    from mammo_sae.cli import main

    save_he_encoder(root / "encoder")
    args = ["classifier", "train", "--data", str(data), "--concept", "Mass"]
    args += ["--init", str(root / "encoder"), "--mode", "linear-probe", "--lr", "1e-2"]
    args += ["--out", str(root / "clf"), "--device", "cpu", "--no-progress", *extra]
    assert main(args) == 0
    return root / "clf" / "model"


def write_checkpoint_config(
    path: Path,
    data: Path,
    checkpoints: dict,
    *,
    name: str = "one-model",
    pointing: bool = False,
    extract: dict | None = None,
    **extra: object,
) -> Path:
    """A tiny `mammo-sae run` config over given checkpoints ({Concept: {variant: path}}) and a
    Mammo-CLIP-layout data folder: 128x80 images, a 1x SAE for 2 epochs, few bootstrap draws;
    `extract` adds extract-section keys (e.g. layers), `extra` top-level sections."""
    import yaml

    cfg = {
        "name": name,
        "device": "cpu",
        "data": {"kind": "folds", "path": str(data), "image_size": [128, 80]},
        "models": {
            "kind": "checkpoints",
            "concepts": list(checkpoints),
            "checkpoints": checkpoints,
            "eval": {"n_boot": 10},
        },
        "extract": {"options": {"workers": 0}, "sae_source": "Mass/finetuned", **(extract or {})},
        "sae": {
            "expansion": 1,
            "epochs": 2,
            "batch_size": 256,
            "resample_every": 0,
            "eval_patches": 256,
            "measure_matmul": False,
            "log_every": 1,
        },
        "analysis": {
            "intervene": {"n_boot": 10, "ks": [0, 1, 5]},
            "fidelity": {"n_boot": 10},
            "localize": {"figure_images": 1, "top": 3},
            "localize_pointing": pointing,
        },
        **extra,
    }
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path
