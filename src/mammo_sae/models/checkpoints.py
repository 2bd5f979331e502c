"""Load image encoders and concept classifiers safely; write the package's own format.

Accepted inputs (see docs/models.md):
- Mammo-CLIP pre-training checkpoint (`b5-model-best-epoch-7.tar`, `b2-model-best-epoch-10.tar`):
  `{"model": {"image_encoder.*", ...}, "config": {"model": {"image_encoder": {"name": ...}}}, ...}`
  -> encoder; B5 vs B2 from the config name.
- Mammo-CLIP downstream classifier (`*_best_aucroc_ver084.pth`, `*_best_acc_cancer_ver084.pth`):
  `{"model": {"image_encoder.*", "classifier.classification_head.{weight,bias}"}, ...}`
  -> classifier (n_class from the head weight); its encoder for `load_image_encoder`.
- Our own format: a directory with `config.json` (schema-versioned) + `model.safetensors`.

Third-party files are read by `io.load_torch_weights` (docs/security.md): TorchScript archives
are refused, pickles go through torch's weights-only unpickler with a small allow-list (numpy
arrays, the omegaconf / typing objects of the Mammo-CLIP config as inert stand-ins), so a
crafted file cannot run code. Our own format's weights are checked against the sha256 its
config.json records. Nothing loads partially: keys and shapes are checked against the
architecture and every problem is reported by name.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, MammoSaeError, choices_message
from ..io import (
    atomic_path,
    load_torch_weights,
    read_json,
    sha256_file,
    torch_file_kind,
    verify_sha256,
    write_json,
)
from .classifier import ConceptClassifier
from .efficientnet import EfficientNet
from .registry import MAMMO_CLIP_NAMES, arch_params, create_encoder, list_archs

SCHEMA_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
ENCODER_PREFIX = "image_encoder."
HEAD_PREFIX = "classifier.classification_head."

# ---------------------------------------------------------------------------------------------
# Layout detection


@dataclass
class CheckpointInfo:
    """Provenance attached to every loaded model as `model.checkpoint_info`."""

    path: str
    layout: str  # mammo-clip-pretrain | mammo-clip-classifier | mammo-sae
    sha256: str
    arch: str
    n_class: int | None = None
    concept: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Parsed:
    layout: str
    arch: str
    encoder_sd: dict[str, torch.Tensor]
    head_sd: dict[str, torch.Tensor] | None
    concept: str | None
    meta: dict[str, Any]
    sha256: str


def checkpoint_sha256(path: str | Path) -> str:
    """Content hash of a checkpoint: the file, or for our own format its weights file."""
    path = Path(path)
    if path.is_dir():
        weights = path / WEIGHTS_FILE
        if not weights.is_file():
            raise CheckpointError(f"{path} is a directory without {WEIGHTS_FILE}")
        return sha256_file(weights)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return sha256_file(path)


def _describe_keys(keys: list[str]) -> str:
    sample = ", ".join(repr(k) for k in keys[:4])
    return f"{len(keys)} keys, e.g. {sample}"


def _foreign_layout(keys: list[str]) -> str:
    """Name a layout we recognise but do not accept."""
    kset = set(keys)
    if "conv_stem.weight" in kset or any(k.startswith("blocks.0.0.") for k in keys):
        return "a timm-style EfficientNet state dict (keys like 'conv_stem.weight', 'blocks.0.0.conv_dw.weight')"
    if any(k.startswith("features.") for k in keys):
        return "a torchvision-style EfficientNet state dict (keys like 'features.0.0.weight')"
    if {"tied_bias", "encoder._weight"} <= kset or {"W_enc", "W_dec"} <= kset:
        return "a sparse-autoencoder checkpoint (use load_sae / `mammo-sae sae import`)"
    return f"an unknown layout ({_describe_keys(sorted(keys))})"


def _state_dict_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensor dict inside a torch checkpoint: `obj["model"]`, `obj["state_dict"]` or `obj`."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict checkpoint, found {type(obj).__name__}")
    for key in ("model", "state_dict"):
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    sd = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError(
            f"{path}: no tensors found (top-level keys: {', '.join(map(str, list(obj)[:8]))})"
        )
    if all(k.startswith("module.") for k in sd):  # saved from DistributedDataParallel
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _config_image_encoder_name(obj: Mapping[str, Any]) -> str | None:
    try:
        name = obj["config"]["model"]["image_encoder"]["name"]
    except (KeyError, TypeError):
        return None
    return name if isinstance(name, str) else None


def _plain_config_section(obj: Mapping[str, Any], section: str) -> dict[str, Any]:
    try:
        value = obj["config"][section]
    except (KeyError, TypeError):
        return {}
    if not isinstance(value, Mapping):
        return {}
    return {k: v for k, v in value.items() if isinstance(v, (str, int, float, bool))}


def _infer_arch(encoder_sd: Mapping[str, torch.Tensor]) -> str:
    """The registry architecture whose key set and shapes match (used when no config names it)."""
    stem = encoder_sd.get("_conv_stem.weight")
    head = encoder_sd.get("_conv_head.weight")
    candidates = []
    for arch in list_archs():
        with torch.device("meta"):
            ref = EfficientNet(arch_params(arch)).state_dict()
        if (
            stem is not None
            and head is not None
            and ref["_conv_stem.weight"].shape == stem.shape
            and ref["_conv_head.weight"].shape == head.shape
        ):
            candidates.append(arch)
            if set(ref) == set(encoder_sd):
                return arch
    if (
        candidates
    ):  # closest: same stem and head widths, but keys differ -> strict check reports them
        return candidates[0]
    got = f"stem {tuple(stem.shape) if stem is not None else None}, head {tuple(head.shape) if head is not None else None}"
    raise CheckpointError(
        f"no known EfficientNet matches these weights ({got}); known: {', '.join(list_archs())}"
    )


def _parse_torch_checkpoint(path: Path) -> _Parsed:
    obj = load_torch_weights(path, "a model checkpoint")
    sd = _state_dict_of(obj, path)
    keys = list(sd)
    encoder_sd = {
        k[len(ENCODER_PREFIX) :]: v for k, v in sd.items() if k.startswith(ENCODER_PREFIX)
    }
    if not encoder_sd and "_conv_stem.weight" in sd:  # bare lukemelas encoder state dict
        encoder_sd = {k: v for k, v in sd.items()}
        layout = "lukemelas-state-dict"
    elif not encoder_sd:
        raise CheckpointError(f"{path}: not a Mammo-CLIP checkpoint; found {_foreign_layout(keys)}")
    else:
        layout = (
            "mammo-clip-classifier"
            if any(k.startswith(HEAD_PREFIX) for k in keys)
            else "mammo-clip-pretrain"
        )
    head_sd = {k[len(HEAD_PREFIX) :]: v for k, v in sd.items() if k.startswith(HEAD_PREFIX)} or None
    stray = sorted(k for k in keys if k.startswith("classifier.") and not k.startswith(HEAD_PREFIX))
    if stray:  # a head we do not know how to build: refuse rather than drop it silently
        raise CheckpointError(
            f"{path}: unexpected classifier keys {', '.join(stray[:5])} "
            f"(only {HEAD_PREFIX}weight/bias, a linear head, is supported)"
        )

    meta: dict[str, Any] = {}
    config_name = _config_image_encoder_name(obj) if isinstance(obj, Mapping) else None
    if config_name is not None:
        if config_name not in MAMMO_CLIP_NAMES:
            raise CheckpointError(
                f"{path}: "
                + choices_message(
                    "Mammo-CLIP image encoder name", config_name, list(MAMMO_CLIP_NAMES)
                )
            )
        arch = MAMMO_CLIP_NAMES[config_name]
        meta["image_encoder_name"] = config_name
        if base := _plain_config_section(obj, "base"):
            meta["preprocess"] = {
                k: base[k] for k in ("mean", "std", "image_size_h", "image_size_w") if k in base
            }
    else:
        arch = _infer_arch(encoder_sd)
    if isinstance(obj, Mapping):
        for key in ("epoch", "auroc", "accuracy", "f1"):
            if key in obj:
                value = obj[key]
                meta[key] = value.item() if hasattr(value, "item") else value
    return _Parsed(layout, arch, encoder_sd, head_sd, None, meta, sha256_file(path))


def _own_config(path: Path) -> dict[str, Any]:
    """Our format's config.json, checked (format, schema, padding, arch, kind); no weights read."""
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise CheckpointError(
            f"{path} is a directory but not a mammo-sae model "
            f"(needs {CONFIG_FILE} and {WEIGHTS_FILE})"
        )
    config = read_json(config_path)
    if not isinstance(config, dict) or config.get("format") != "mammo-sae-model":
        raise CheckpointError(
            f"{config_path}: not a mammo-sae model config (missing format: mammo-sae-model)"
        )
    if config.get("schema_version") != SCHEMA_VERSION:
        raise CheckpointError(
            f"{config_path}: schema_version {config.get('schema_version')!r} is not supported "
            f"(this version reads {SCHEMA_VERSION})"
        )
    if config.get("padding", "static") != "static":
        raise CheckpointError(
            f"{config_path}: padding {config.get('padding')!r}; only static models are stored"
        )
    arch_params(str(config.get("arch")))  # raises naming the valid choices
    if config.get("kind") not in ("encoder", "classifier"):
        raise CheckpointError(
            f"{config_path}: "
            + choices_message("kind", config.get("kind"), ["encoder", "classifier"])
        )
    return config


def checkpoint_header(path: str | Path) -> dict[str, Any]:
    """What a checkpoint says about itself without its weights being read or a model built (the
    pipeline's `--dry-run`): our format's checked config.json (kind, arch, concept), or a torch
    file's container format after the same sniff `load_torch_weights` starts with."""
    path = Path(path)
    if path.is_file() and path.name == CONFIG_FILE:
        path = path.parent
    if path.is_dir():
        config = _own_config(path)
        return {
            "layout": "mammo-sae",
            "kind": config["kind"],
            "arch": config["arch"],
            "concept": config.get("concept"),
        }
    return {"layout": "torch", "format": torch_file_kind(path, "a model checkpoint")}


def _parse_own_format(path: Path) -> _Parsed:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    config = _own_config(path)
    arch = config.get("arch")
    sha256 = verify_sha256(weights_path, config.get("weights_sha256"), str(config_path))
    try:
        sd = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {weights_path}: {exc}") from None
    encoder_sd = {k[len("encoder.") :]: v for k, v in sd.items() if k.startswith("encoder.")}
    head_sd = {k[len("head.") :]: v for k, v in sd.items() if k.startswith("head.")} or None
    other = sorted(k for k in sd if not k.startswith(("encoder.", "head.")))
    if other:
        raise CheckpointError(f"{weights_path}: unexpected tensors {', '.join(other[:5])}")
    kind = config.get("kind")
    if (kind == "classifier") != (head_sd is not None):
        raise CheckpointError(
            f"{path}: config says kind={kind} but the weights "
            f"{'have' if head_sd else 'lack'} head.* tensors"
        )
    meta = {k: v for k, v in config.items() if k not in ("weights",)}
    return _Parsed("mammo-sae", str(arch), encoder_sd, head_sd, config.get("concept"), meta, sha256)


def _parse(path: str | Path) -> _Parsed:
    path = Path(path)
    if path.is_file() and path.name == CONFIG_FILE:
        path = path.parent
    if path.is_dir():
        return _parse_own_format(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    return _parse_torch_checkpoint(path)


# ---------------------------------------------------------------------------------------------
# Strict loading


def check_state_dict(module: nn.Module, sd: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise CheckpointError naming every missing, unexpected and mis-shaped key."""
    ref = module.state_dict()
    missing = [k for k in ref if k not in sd]
    unexpected = [k for k in sd if k not in ref]
    misshaped = [
        f"{k} {tuple(sd[k].shape)} (expected {tuple(ref[k].shape)})"
        for k in ref
        if k in sd and tuple(sd[k].shape) != tuple(ref[k].shape)
    ]
    problems = []
    for label, items in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("mis-shaped", misshaped),
    ):
        if items:
            shown = ", ".join(items[:8]) + (
                f", ... ({len(items)} in all)" if len(items) > 8 else ""
            )
            problems.append(f"{label} keys: {shown}")
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems))
    floats = {k: v for k, v in sd.items() if v.is_floating_point()}
    if floats and not bool(
        torch.isfinite(torch.cat([v.reshape(-1).float() for v in floats.values()])).all()
    ):
        # one pass over everything (per-tensor checks cost a second on a busy CPU); name them only on failure
        bad = [k for k, v in floats.items() if not bool(torch.isfinite(v).all())]
        raise CheckpointError(f"{what}: non-finite values in {', '.join(bad[:5])}")


def _build_encoder(parsed: _Parsed, what: str) -> EfficientNet:
    # Built on the meta device and filled by assignment: no random init, no second copy of the weights.
    with torch.device("meta"):
        encoder = create_encoder(parsed.arch)
    check_state_dict(encoder, parsed.encoder_sd, f"{what} ({parsed.arch} encoder)")
    weights = {
        k: v.to(torch.float32).contiguous() if v.is_floating_point() else v
        for k, v in parsed.encoder_sd.items()
    }
    encoder.load_state_dict(weights, strict=True, assign=True)
    return encoder.eval()


def _info(parsed: _Parsed, path: str | Path, n_class: int | None) -> CheckpointInfo:
    return CheckpointInfo(
        str(path), parsed.layout, parsed.sha256, parsed.arch, n_class, parsed.concept, parsed.meta
    )


def _encoder_from(parsed: _Parsed, path: str | Path) -> EfficientNet:
    encoder = _build_encoder(parsed, str(path))
    encoder.checkpoint_info = _info(parsed, path, None)  # type: ignore[assignment]
    return encoder


def _classifier_from(parsed: _Parsed, path: str | Path) -> ConceptClassifier:
    if parsed.head_sd is None:
        raise CheckpointError(
            f"{path}: a {parsed.layout} checkpoint with no concept head "
            "(use load_image_encoder, or train a classifier from it with --init)"
        )
    weight = parsed.head_sd.get("weight")
    if weight is None or weight.ndim != 2:
        raise CheckpointError(
            f"{path}: concept head has no 2-D 'weight' (found {sorted(parsed.head_sd)})"
        )
    encoder = _build_encoder(parsed, str(path))
    model = ConceptClassifier(encoder, int(weight.shape[0]), concept=parsed.concept)
    check_state_dict(model.head, parsed.head_sd, f"{path} (concept head)")
    model.head.load_state_dict(
        {k: v.to(torch.float32) for k, v in parsed.head_sd.items()}, strict=True
    )
    model.checkpoint_info = _info(parsed, path, model.n_class)  # type: ignore[assignment]
    return model.eval()


def load_image_encoder(path: str | Path) -> EfficientNet:
    """An eval-mode encoder from any supported checkpoint (a classifier's own encoder included).

    `encoder.checkpoint_info` (CheckpointInfo) records path, layout, sha256, arch and metadata.
    """
    return _encoder_from(_parse(path), path)


def load_classifier(path: str | Path) -> ConceptClassifier:
    """An eval-mode ConceptClassifier (encoder + linear head) from a classifier checkpoint."""
    return _classifier_from(_parse(path), path)


def load_encoder(
    model: str | Path, *, seed: int | None = None, flag: str = "--model"
) -> tuple[EfficientNet, dict[str, Any]]:
    """An encoder from a checkpoint path (a classifier's encoder first, else an image encoder)
    or, for an arch name, a fresh one (initialised under `seed` without touching the global RNG;
    seed None draws from it). Also returns what it loaded: source, kind, sha256, init_seed, arch.
    `flag` names the option the value came from, for the error message."""
    path = Path(model)
    if path.exists():
        parsed = _parse(path)
        try:
            encoder, kind = _classifier_from(parsed, path).encoder, "classifier"
        except MammoSaeError:
            encoder, kind = _encoder_from(parsed, path), "image_encoder"
        return encoder, {
            "source": str(path),
            "kind": kind,
            "sha256": parsed.sha256,
            "init_seed": None,
            "arch": str(encoder.arch),
        }
    archs = list(list_archs())
    if str(model) not in archs:
        raise MammoSaeError(f"{flag}: no such file, and {choices_message('arch', model, archs)}")
    if seed is None:
        encoder = create_encoder(str(model))
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            encoder = create_encoder(str(model))
    return encoder, {
        "source": None,
        "kind": "random_init",
        "sha256": None,
        "init_seed": seed,
        "arch": str(encoder.arch),
    }


def warn_assumed_concept(path: str | Path, recorded: str | None, assumed: str | None) -> None:
    """Say so (stderr) when a checkpoint that records no concept (a Mammo-CLIP file never does)
    is taken to predict `assumed`: a file for the wrong finding would otherwise pass unnoticed."""
    if assumed and not recorded:
        print(
            f"warning: {path} records no concept; assuming it predicts {assumed!r}", file=sys.stderr
        )


# ---------------------------------------------------------------------------------------------
# Own format


def save_model(model: EfficientNet | ConceptClassifier, out_dir: str | Path, **meta: Any) -> Path:
    """Write `model.safetensors` + `config.json` to `out_dir` (atomically, file by file).

    Tensor names: `encoder.<lukemelas key>` and, for classifiers, `head.weight`, `head.bias`.
    Extra keyword arguments are stored in the config (e.g. source checkpoint, training run).
    """
    from safetensors.torch import save_file

    if isinstance(model, ConceptClassifier):
        encoder, kind = model.encoder, "classifier"
        tensors = {f"encoder.{k}": v for k, v in model.encoder.state_dict().items()}
        tensors.update({f"head.{k}": v for k, v in model.head.state_dict().items()})
    elif isinstance(model, EfficientNet):
        encoder, kind = model, "encoder"
        tensors = {f"encoder.{k}": v for k, v in model.state_dict().items()}
    else:
        raise CheckpointError(
            f"save_model: expected EfficientNet or ConceptClassifier, got {type(model).__name__}"
        )
    if encoder.padding != "static":
        raise CheckpointError("save_model: only static-padding encoders can be saved")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp))
    config: dict[str, Any] = {
        "format": "mammo-sae-model",
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "arch": encoder.arch,
        "padding": "static",
        "nominal_image_size": encoder.params.image_size,
        "out_channels": encoder.out_channels,
        "n_class": model.n_class if isinstance(model, ConceptClassifier) else None,
        "concept": model.concept if isinstance(model, ConceptClassifier) else None,
        "weights_sha256": sha256_file(out_dir / WEIGHTS_FILE),
    }
    config.update(meta)
    write_json(out_dir / CONFIG_FILE, config)
    return out_dir


def convert(path: str | Path, out_dir: str | Path, concept: str | None = None) -> dict[str, Any]:
    """Any supported checkpoint -> own format; returns the written config.

    Classifiers stay classifiers (Mammo-CLIP files do not name their concept: pass `concept`);
    the source file's path, layout and sha256 are recorded under `source`.
    """
    parsed = _parse(path)
    model: EfficientNet | ConceptClassifier
    if parsed.head_sd is not None:
        model = _classifier_from(parsed, path)
        if concept is not None:
            model.concept = concept
    else:
        if concept is not None:
            raise CheckpointError(
                f"{path}: --concept given, but this {parsed.layout} checkpoint has no concept head"
            )
        model = _encoder_from(parsed, path)
    source = {"path": str(Path(path).resolve()), "sha256": parsed.sha256, "layout": parsed.layout}
    if parsed.layout == "mammo-sae" and isinstance(parsed.meta.get("source"), dict):
        source = parsed.meta["source"]  # a copy of our own format keeps the original provenance
    extra = {
        k: v
        for k, v in parsed.meta.items()
        if k in ("image_encoder_name", "preprocess", "epoch", "auroc", "accuracy", "f1")
    }
    save_model(model, out_dir, source=source, **extra)
    return read_json(Path(out_dir) / CONFIG_FILE)
