"""SAE checkpoints: the native format, the released MammoSAE `.pt`, and SAELens folders.

Native directory (schema version 1, docs/sae.md):
    sae.safetensors   W_enc (h, d), b_enc (h), W_dec (d, h), b_dec (d), norm_mean (d),
                      norm_scale (), threshold ()
    cfg.json          format, schema_version, architecture, config (every hyper-parameter), d, h,
                      normalisation, plus what the caller adds (source store manifest hash,
                      training settings, final metrics)
cfg.json is written last, so its presence marks a complete checkpoint.

Weights are always used as stored: nothing is renormalised at load time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import from_dict, to_dict
from ..errors import CheckpointError, MammoSaeError
from ..io import atomic_path, load_torch_weights, read_json, sha256_file, verify_sha256, write_json
from .model import SAEConfig, SparseAutoencoder

NATIVE_FORMAT = "mammo-sae-sae"
SCHEMA_VERSION = 1
WEIGHTS_FILE = "sae.safetensors"
CFG_FILE = "cfg.json"
SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"
NATIVE_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec", "norm_mean", "norm_scale", "threshold")

# Released MammoSAE keys: sparse-autoencoder 1.3.0 names and the later (≥ 1.5) names.
_MAMMOSAE_ALIASES = {
    "W_enc": ("encoder._weight", "encoder.weight"),
    "b_enc": ("encoder._bias", "encoder.bias"),
    "W_dec": ("decoder._weight", "decoder.weight"),
}
_MAMMOSAE_TIED = (
    "tied_bias",
    "pre_encoder_bias._bias_reference",
    "post_decoder_bias._bias_reference",
)


# ---------------------------------------------------------------------------- save
def save_sae(
    sae: SparseAutoencoder,
    out_dir: str | os.PathLike[str],
    *,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write `out_dir/sae.safetensors` then `out_dir/cfg.json` (atomically); return out_dir."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: getattr(sae, name).detach().to("cpu", torch.float32).contiguous()
        for name in NATIVE_TENSORS
    }
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": NATIVE_FORMAT})
    cfg = sae.cfg
    record: dict[str, Any] = {
        "format": NATIVE_FORMAT,
        "schema_version": SCHEMA_VERSION,
        "architecture": cfg.architecture,
        "d": sae.d,
        "h": sae.h,
        "config": to_dict(cfg),
        "l1_coeff_reference": cfg.l1_coeff_reference,
        "normalisation": {
            "mode": cfg.normalisation,
            "folded": False,
            "scale": float(sae.norm_scale),
            "mean": "norm_mean in sae.safetensors",
        },
        "threshold": float(sae.threshold),
        "weights_sha256": sha256_file(out / WEIGHTS_FILE),
    }
    if extra:
        overlap = set(extra) & set(record)
        if overlap:
            raise MammoSaeError(
                f"save_sae: extra keys {sorted(overlap)} would overwrite the checkpoint's own"
            )
        record.update(extra)
    write_json(out / CFG_FILE, record)
    return out


# ---------------------------------------------------------------------------- load
def load_sae(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Load a native directory, a SAELens folder or a released MammoSAE `.pt` (eval mode)."""
    p = Path(path)
    if p.is_dir():
        cfg_path = p / CFG_FILE
        if not cfg_path.is_file():
            raise CheckpointError(f"{p}: not an SAE checkpoint directory (no {CFG_FILE})")
        meta = read_json(cfg_path)
        if isinstance(meta, dict) and meta.get("format") == NATIVE_FORMAT:
            sae = _load_native(p, meta)
        elif (p / SAELENS_WEIGHTS_FILE).is_file():
            sae = _load_saelens(p, meta)
        else:
            raise CheckpointError(
                f"{p}: {CFG_FILE} is neither a mammo-sae SAE (format {NATIVE_FORMAT!r}) "
                f"nor a SAELens folder (no {SAELENS_WEIGHTS_FILE})"
            )
    elif p.is_file():
        if p.name == CFG_FILE or p.suffix == ".safetensors":
            return load_sae(p.parent, device)
        sae = load_mammosae_pt(p)
    else:
        raise CheckpointError(f"SAE checkpoint not found: {p}")
    return sae.to(device).eval()


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"missing weights file: {path}")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"corrupt weights file {path}: {exc}") from exc


def _load_native(p: Path, meta: dict[str, Any]) -> SparseAutoencoder:
    version = meta.get("schema_version")
    if version != SCHEMA_VERSION:
        raise CheckpointError(
            f"{p / CFG_FILE}: schema_version {version!r}; this mammo-sae reads {SCHEMA_VERSION}"
        )
    try:
        cfg = from_dict(SAEConfig, meta["config"], where=f"{p / CFG_FILE}:config")
    except KeyError as exc:
        raise CheckpointError(f"{p / CFG_FILE}: missing key {exc}") from exc
    except MammoSaeError as exc:
        raise CheckpointError(str(exc)) from exc
    expected = meta.get("weights_sha256")
    weights_path = p / WEIGHTS_FILE
    if expected and weights_path.is_file():
        verify_sha256(weights_path, expected, str(p / CFG_FILE))
    tensors = _read_safetensors(weights_path)
    return _build(cfg, tensors, str(weights_path))


def _build(cfg: SAEConfig, tensors: Mapping[str, Tensor], where: str) -> SparseAutoencoder:
    sae = SparseAutoencoder(cfg)
    state = sae.state_dict()
    missing = [k for k in ("W_enc", "b_enc", "W_dec", "b_dec") if k not in tensors]
    if missing:
        raise CheckpointError(f"{where}: missing tensors {missing}; found {sorted(tensors)}")
    for name, value in tensors.items():
        if name not in state:
            raise CheckpointError(f"{where}: unexpected tensor {name!r}")
        if tuple(value.shape) != tuple(state[name].shape):
            raise CheckpointError(
                f"{where}: {name} has shape {tuple(value.shape)}, expected "
                f"{tuple(state[name].shape)} for d={cfg.d}, h={cfg.n_latents}"
            )
        if not torch.isfinite(value).all():
            raise CheckpointError(f"{where}: {name} contains NaN or Inf")
        state[name] = value.to(torch.float32)
    sae.load_state_dict(state)
    return sae


def load_mammosae_pt(path: str | os.PathLike[str]) -> SparseAutoencoder:
    """The released MammoSAE `sparse_autoencoder_final.pt` (or a file of its layout)."""
    p = Path(path)
    obj = load_torch_weights(p, "a MammoSAE SAE checkpoint")
    if isinstance(obj, Mapping) and "train_config" in obj and "cursor" in obj:
        raise CheckpointError(
            f"{p} is a training state (for `sae train --resume`), not an SAE; "
            f"the trained SAE is the directory holding it"
        )
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{p}: expected a state dict, found {type(obj).__name__}")
    sd = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    return from_mammosae_state_dict(sd, where=str(p))


def _pick(sd: Mapping[str, Tensor], names: tuple[str, ...], where: str) -> Tensor:
    for name in names:
        if name in sd:
            return sd[name]
    raise CheckpointError(f"{where}: none of the keys {list(names)} found; keys: {sorted(sd)}")


def _squeeze_component(t: Tensor, ndim: int, name: str, where: str) -> Tensor:
    if t.dim() == ndim + 1:
        if t.shape[0] != 1:
            raise CheckpointError(
                f"{where}: {name} has {t.shape[0]} components; only 1 is supported"
            )
        t = t[0]
    if t.dim() != ndim:
        raise CheckpointError(
            f"{where}: {name} has shape {tuple(t.shape)}; expected {ndim} dims "
            "(plus an optional leading component axis of 1)"
        )
    return t


def from_mammosae_state_dict(
    sd: Mapping[str, Tensor], where: str = "state dict"
) -> SparseAutoencoder:
    """Flatten the component axis and the aliased tied bias into a relu-l1 SAE."""
    tied = [sd[k] for k in _MAMMOSAE_TIED if k in sd]
    if not tied:
        raise CheckpointError(
            f"{where}: no tied bias (keys {list(_MAMMOSAE_TIED)}); keys: {sorted(sd)}"
        )
    for other in tied[1:]:
        if other.shape != tied[0].shape or not torch.equal(other, tied[0]):
            raise CheckpointError(
                f"{where}: the aliased tied-bias keys differ; the file is inconsistent"
            )
    b_dec = _squeeze_component(tied[0], 1, "tied_bias", where)
    W_enc = _squeeze_component(
        _pick(sd, _MAMMOSAE_ALIASES["W_enc"], where), 2, "encoder weight", where
    )
    b_enc = _squeeze_component(
        _pick(sd, _MAMMOSAE_ALIASES["b_enc"], where), 1, "encoder bias", where
    )
    W_dec = _squeeze_component(
        _pick(sd, _MAMMOSAE_ALIASES["W_dec"], where), 2, "decoder weight", where
    )
    h, d = W_enc.shape
    if W_dec.shape != (d, h) or b_enc.shape != (h,) or b_dec.shape != (d,):
        raise CheckpointError(
            f"{where}: inconsistent shapes: encoder {tuple(W_enc.shape)}, decoder "
            f"{tuple(W_dec.shape)}, encoder bias {tuple(b_enc.shape)}, tied bias {tuple(b_dec.shape)}"
        )
    cfg = SAEConfig(architecture="relu-l1", d=d, h=h, expansion=max(1, h // d))
    return _build(cfg, {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}, where)


# ---------------------------------------------------------------------------- SAELens
_SAELENS_ARCH = {"relu-l1": "standard", "topk": "topk", "batchtopk": "jumprelu"}


def export_saelens(
    sae: SparseAutoencoder,
    out_dir: str | os.PathLike[str],
    *,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """SAELens v6 folder (cfg.json + sae_weights.safetensors), normalisation folded in.

    relu-l1 → "standard", topk → "topk" (k), batchtopk → "jumprelu" with θ on every latent."""
    from safetensors.torch import save_file

    folded = sae.folded().cpu()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        "W_enc": folded.W_enc.detach().t().contiguous(),
        "b_enc": folded.b_enc.detach().clone(),
        "W_dec": folded.W_dec.detach().t().contiguous(),
        "b_dec": folded.b_dec.detach().clone(),
    }
    cfg = sae.cfg
    arch = _SAELENS_ARCH[cfg.architecture]
    if arch == "jumprelu":
        tensors["threshold"] = folded.threshold.detach().expand(sae.h).clone()
    with atomic_path(out / SAELENS_WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp))
    record: dict[str, Any] = {
        "architecture": arch,
        "d_in": sae.d,
        "d_sae": sae.h,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "model_name": "mammo-clip",
            "hook_name": "final",
            "mammo_sae": {
                "architecture": cfg.architecture,
                "config": to_dict(cfg),
                "normalisation_folded": cfg.normalisation != "none",
            },
            **(dict(metadata) if metadata else {}),
        },
    }
    if arch == "topk":
        record["k"] = cfg.k
    write_json(out / CFG_FILE, record)
    return out


def _load_saelens(p: Path, meta: dict[str, Any]) -> SparseAutoencoder:
    arch = meta.get("architecture", "standard")
    ours = {v: k for k, v in _SAELENS_ARCH.items()}.get(arch)
    if ours is None:
        raise CheckpointError(
            f"{p}: SAELens architecture {arch!r} is not supported; valid: "
            f"{', '.join(_SAELENS_ARCH.values())}"
        )
    if (
        meta.get("normalize_activations", "none") != "none"
        or meta.get("apply_b_dec_to_input", True) is not True
    ):
        raise CheckpointError(
            f"{p}: only SAELens SAEs with normalize_activations='none' and "
            "apply_b_dec_to_input=true are supported"
        )
    tensors = _read_safetensors(p / SAELENS_WEIGHTS_FILE)
    try:
        d, h = int(meta["d_in"]), int(meta["d_sae"])
        W_enc, W_dec = tensors["W_enc"].t(), tensors["W_dec"].t()
        ours_t = {
            "W_enc": W_enc,
            "b_enc": tensors["b_enc"],
            "W_dec": W_dec,
            "b_dec": tensors["b_dec"],
        }
    except KeyError as exc:
        raise CheckpointError(f"{p}: missing {exc} in SAELens checkpoint") from exc
    kw: dict[str, Any] = {"architecture": ours, "d": d, "h": h}
    if ours == "topk":
        kw["k"] = int(meta.get("k", 32))
    if ours == "batchtopk":
        theta = tensors.get("threshold")
        if theta is None or not torch.all(theta == theta.reshape(-1)[0]):
            raise CheckpointError(
                f"{p}: a JumpReLU SAE with per-latent thresholds is not a batchtopk SAE"
            )
        ours_t["threshold"] = theta.reshape(-1)[0].clone()
        kw["k"] = int(meta.get("metadata", {}).get("mammo_sae", {}).get("config", {}).get("k", 32))
    return _build(SAEConfig(**kw), ours_t, str(p))


# ---------------------------------------------------------------------------- hashing
def sae_sha256(path: str | os.PathLike[str]) -> str:
    """Content hash of an SAE: its weights file (native/SAELens directory) or the `.pt` file."""
    p = Path(path)
    if p.is_dir():
        for name in (WEIGHTS_FILE, SAELENS_WEIGHTS_FILE):
            if (p / name).is_file():
                return sha256_file(p / name)
        raise CheckpointError(
            f"{p}: no SAE weights file ({WEIGHTS_FILE} or {SAELENS_WEIGHTS_FILE})"
        )
    if not p.is_file():
        raise CheckpointError(f"SAE checkpoint not found: {p}")
    return sha256_file(p)


def describe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What `mammo-sae sae info` prints: config and metrics (native) or the inferred config."""
    p = Path(path)
    sae = load_sae(p)
    info: dict[str, Any] = {
        "path": str(p),
        "sha256": sae_sha256(p),
        "architecture": sae.architecture,
        "d": sae.d,
        "h": sae.h,
        "config": to_dict(sae.cfg),
    }
    if p.is_dir():
        meta = read_json(p / CFG_FILE)
        info["cfg.json"] = meta
    norms = sae.W_dec.detach().norm(dim=0)
    info["decoder_column_norm"] = {"min": float(norms.min()), "max": float(norms.max())}
    return info


__all__ = [
    "save_sae",
    "load_sae",
    "load_mammosae_pt",
    "from_mammosae_state_dict",
    "export_saelens",
    "sae_sha256",
    "describe",
    "NATIVE_FORMAT",
    "SCHEMA_VERSION",
]
