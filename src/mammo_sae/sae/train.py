"""SAE trainer: streamed or device-resident data, resumable, logged, torchrun-aware.

One step: batch → loss (fp32 master weights; bf16 matmul operands on GPU and on large SAEs on a
CPU with bf16 instructions) → backward →
(DDP: weighted all-reduce of gradients) → remove the decoder-parallel gradient → Adam →
renormalise decoder columns. relu-l1 follows Mammo-SAE exactly (docs/sae.md); topk/batchtopk
add AuxK on latents that have not fired for `dead_window_patches` patches.

State (weights, Adam moments, RNG states, data cursor, latent counters) is saved atomically to
OUT/train_state.pt; rerunning the same command continues from it bit-identically on CPU, because
the data order is a pure function of (seed, epoch, batch) and every random draw uses a seeded
generator. A state made with other settings or data is refused (naming them); `overwrite=True`
discards it; `resume=True` insists on a state to continue.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from ..config import changed_settings, device_opt, opt, progress_opt, to_dict
from ..devices import DistContext, cpu_has_native_bf16, resolve_device
from ..errors import CheckpointError, MammoSaeError, StoreError
from ..io import (
    atomic_path,
    dumps_json_line,
    load_torch_weights,
    portable_path,
    write_json,
    writer_lock,
)
from .model import SAEConfig, SAEHyperParams, SparseAutoencoder

STATE_FILE = "train_state.pt"
LOG_FILE = "train_log.jsonl"
STATE_VERSION = 1
DENSE_FREQUENCY = 0.1  # a latent firing on more than 10 % of patches counts as dense
# bf16 matmuls on CPU from this many SAE weights (d·h) up (Mammo-SAE's 2048 × 16,384 is 2^25).
# bf16 measured faster from d 256 × h 2048 (2^19) on, but the phantom-sized SAEs (≤ 3.3 M weights)
# stay fp32 so that their documented reference figures hold (docs/sae.md).
CPU_BF16_MIN_WEIGHTS = 2**22


# ---------------------------------------------------------------------------- data
@runtime_checkable
class BatchSource(Protocol):
    """What the trainer reads: `ActivationStore` satisfies it, as does `TensorSource`."""

    d: int
    n_patches: int

    def batches_per_epoch(
        self, batch_size: int, world_size: int = 1, drop_last: bool = False
    ) -> int: ...

    def stream(
        self,
        batch_size: int,
        *,
        seed: int,
        epoch: int,
        start_batch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> Iterator[Tensor]: ...


class TensorSource:
    """An in-memory (N, d) tensor, possibly on the GPU, served in seeded shuffled batches.

    Under DDP, global batch i (the same rows a single process would see) is split across
    ranks with `tensor_split`, so 2 ranks × B/2 reproduce 1 process × B up to summation order.
    """

    def __init__(self, acts_nd: Tensor, manifest_sha256: str | None = None) -> None:
        if acts_nd.dim() != 2:
            raise MammoSaeError(f"training data must be (N, d), got shape {tuple(acts_nd.shape)}")
        self.acts_nd = acts_nd
        self.d = int(acts_nd.shape[1])
        self.n_patches = int(acts_nd.shape[0])
        self.manifest_sha256 = manifest_sha256

    def batches_per_epoch(
        self, batch_size: int, world_size: int = 1, drop_last: bool = False
    ) -> int:
        return self.n_patches // batch_size if drop_last else -(-self.n_patches // batch_size)

    def stream(
        self,
        batch_size: int,
        *,
        seed: int,
        epoch: int,
        start_batch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> Iterator[Tensor]:
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
        # Drawn on the CPU (the same order on every device), moved once per epoch: a per-batch
        # copy of indices from pageable memory would stall the GPU at every step.
        perm = torch.randperm(self.n_patches, generator=gen).to(self.acts_nd.device)
        for b in range(start_batch, self.batches_per_epoch(batch_size, 1, drop_last)):
            idx = perm[b * batch_size : (b + 1) * batch_size]
            if world_size > 1:
                idx = torch.tensor_split(idx, world_size)[rank]
            yield self.acts_nd[idx]


# ---------------------------------------------------------------------------- config
@dataclass
class SAETrainConfig(SAEHyperParams):
    """Train an SAE on an activation store. Defaults reproduce Mammo-SAE (relu-l1, expansion 8,
    λ 3e-5 in the reference convention, batch 4096, 200 epochs, Adam, resampling every 10 epochs;
    lr 3e-4 as on the paper's page — the released code used 5e-4). The SAE's own
    hyper-parameters come from `SAEHyperParams`. `affects_result=False`: left out of the
    pipeline's key and of the resume check (the store is checked by its manifest hash instead);
    `resumable=True`: changes the result, but may change when a run is continued."""

    store: Path | None = opt(
        None, affects_result=False, help="activation store directory (mammo-sae extract)"
    )
    out: Path = opt(
        Path("sae_run"),
        affects_result=False,
        help="output directory (final SAE, train_state.pt, train_log.jsonl)",
    )
    batch_size: int = opt(4096, min=1, help="global batch size (split across DDP ranks)")
    epochs: int = opt(200, resumable=True, min=1, help="passes over the data")
    lr: float = opt(3e-4, gt=0.0, help="Adam learning rate (constant)")
    beta1: float = opt(0.9, min=0.0, lt=1.0, help="Adam β1")
    beta2: float = opt(0.999, min=0.0, lt=1.0, help="Adam β2")
    eps: float = opt(1e-8, gt=0.0, help="Adam ε")
    seed: int = opt(49, help="seed for init, data order and resampling (Mammo-SAE used 49)")
    drop_last: bool = opt(
        False, help="drop the last partial batch of each epoch (the reference keeps it)"
    )
    resample_every: int = opt(
        10, min=0, help="relu-l1: resample dead latents every N epochs (0 = never)"
    )
    resample_inputs: int = opt(
        20000,
        min=1,
        help="relu-l1: inputs scored for resampling (rounded down to whole batches, ≥ 1)",
    )
    dead_window_patches: int = opt(
        10_000_000,
        min=1,
        help="a latent is dead after this many "
        "patches without firing (AuxK, dead fraction); at most one "
        "epoch of patches",
    )
    log_every: int = opt(
        50, resumable=True, min=1, help="log to JSONL and the progress bar every N steps"
    )
    checkpoint_every: int = opt(
        0,
        resumable=True,
        min=0,
        help="save full state every N steps (0 = at epoch ends, at most every --checkpoint-seconds)",
    )
    checkpoint_seconds: float = opt(
        600.0,
        resumable=True,
        min=0.0,
        help="minimum seconds between epoch-end checkpoints when --checkpoint-every is 0",
    )
    max_steps: int | None = opt(
        None, resumable=True, min=1, help="stop (and save) after this many steps in total"
    )
    resume: bool = opt(
        False,
        affects_result=False,
        help="require OUT/train_state.pt and continue it (a plain rerun "
        "continues a state of the same settings anyway)",
    )
    overwrite: bool = opt(
        False,
        affects_result=False,
        help="discard the training run in --out (state, log, SAE) and start again",
    )
    device: str = device_opt(affects_result=False)
    bf16: bool = opt(
        True,
        help="bf16 matmul operands (weights, accumulation and Adam stay fp32) "
        "on GPU, and on a CPU with bf16 instructions (AVX512-BF16/AMX) for "
        "SAEs of d·h ≥ 2^22 weights, where it is faster; --no-bf16: fp32",
    )
    compile: bool = opt(False, resumable=True, help="torch.compile the loss")
    data_in_memory: Literal["auto", "yes", "no"] = opt(
        "auto",
        resumable=True,
        help="load the whole store onto the device when it fits (auto) or stream it",
    )
    measure_matmul: bool = opt(
        True, resumable=True, help="time a matmul at start-up for the MFU figure"
    )
    eval_patches: int = opt(
        65536, resumable=True, min=0, help="patches for the final metrics in cfg.json (0 = skip)"
    )
    progress: bool = progress_opt("show a progress bar")

    def sae_config(self, d: int) -> SAEConfig:
        """The SAE's config: every inherited hyper-parameter, with the store's d."""
        return SAEConfig(d=d, **{f.name: getattr(self, f.name) for f in fields(SAEHyperParams)})


# ---------------------------------------------------------------------------- helpers
def measure_matmul_flops(
    d: int,
    h: int,
    batch: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    reps: int = 3,
) -> float:
    """FLOP/s of one (batch × d) @ (d × h) matmul on `device`: the denominator of MFU."""
    a = torch.randn(batch, d, device=device, dtype=dtype)
    b = torch.randn(d, h, device=device, dtype=dtype)
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2.0 * batch * d * h * reps / max(time.perf_counter() - t0, 1e-9)


def matmul_dtype(cfg: SAETrainConfig, device: torch.device, n_weights: int) -> torch.dtype | None:
    """bf16 operands (None: fp32) for the SAE's matmuls: `--bf16` on a GPU, or on a CPU that
    multiplies bf16 in hardware for SAEs of at least CPU_BF16_MIN_WEIGHTS weights."""
    if not cfg.bf16:
        return None
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and n_weights >= CPU_BF16_MIN_WEIGHTS and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def flops_per_patch(sae: SparseAutoencoder) -> float:
    """Dense training FLOPs per patch, 10·d·h (encoder 2dh, decoder 2dh, backward 6dh)."""
    return 10.0 * sae.d * sae.h


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(int(v) for v in state["python"]), None))
    np.random.set_state(
        ("MT19937", state["numpy"].numpy().astype(np.uint32), int(state["numpy_pos"]), 0, 0.0)
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _open_source(cfg: SAETrainConfig, device: torch.device, dist: DistContext) -> BatchSource:
    if cfg.store is None:
        raise MammoSaeError("no training data: pass --store STORE (or a BatchSource to train_sae)")
    from ..activations.store import ActivationStore

    store = ActivationStore(cfg.store)
    if cfg.data_in_memory == "no" or (cfg.data_in_memory == "auto" and device.type == "cpu"):
        return store
    need = store.n_patches * store.d * 4
    if cfg.data_in_memory == "auto":
        free, _ = torch.cuda.mem_get_info(device)
        if need > 0.6 * free:
            return store
    return TensorSource(
        store.load_all(device, torch.float32), manifest_sha256=store.manifest_sha256
    )


# ---------------------------------------------------------------------------- trainer
class Trainer:
    """Holds the SAE, optimiser, data cursor and counters; `run()` trains to the end."""

    def __init__(self, cfg: SAETrainConfig, source: BatchSource | None = None) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.device = resolve_device(cfg.device)
        self.dist = DistContext.from_env(self.device)
        self.source = source if source is not None else _open_source(cfg, self.device, self.dist)
        if cfg.batch_size < self.dist.world_size:
            raise MammoSaeError(
                f"batch size {cfg.batch_size} is smaller than the world size {self.dist.world_size}"
            )
        # TensorSource splits each global batch across ranks; other sources (the store) give each
        # rank its own share of the data, served in local batches of batch_size / world_size.
        self.stream_batch = (
            cfg.batch_size
            if isinstance(self.source, TensorSource)
            else cfg.batch_size // self.dist.world_size
        )
        self.n_batches = self.source.batches_per_epoch(
            self.stream_batch, self.dist.world_size, cfg.drop_last
        )
        if self.n_batches < 1:
            raise StoreError(
                f"training data has {self.source.n_patches} patches: not one batch of {cfg.batch_size}"
            )
        # Dead = no firing for the window, capped at one epoch of patches: on small data the 10 M
        # default outlasts the whole run, and every latent would count as alive to the end.
        self.dead_window = min(
            cfg.dead_window_patches, self.source.n_patches, self.n_batches * cfg.batch_size
        )
        self.sae_cfg = cfg.sae_config(self.source.d)
        self.sae = SparseAutoencoder(self.sae_cfg, seed=cfg.seed).to(self.device)
        self.sae.train()
        self.sae.mm_dtype = matmul_dtype(cfg, self.device, self.sae.d * self.sae.h)
        # torch.compile traces the dense topk/batchtopk path (sparse tensors break its graphs).
        self.sae.sparse = not cfg.compile
        # Fused Adam on CPU and CUDA alike: on this project's CPU it steps 5x (d 2048, h 16,384:
        # 151 → 29 ms) to 7x (d 256, h 2048) faster than foreach, which loops per tensor on CPU.
        self.opt = torch.optim.Adam(
            self.sae.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True
        )
        h = self.sae.h
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.patches_seen = 0
        # Firings since the last resampling (relu-l1) and patches since each latent last fired.
        self.fired_since_resample_h = torch.zeros(h, dtype=torch.int64, device=self.device)
        self.since_fired_h = torch.zeros(h, dtype=torch.int64, device=self.device)
        self.n_resamples = 0
        self.n_latents_resampled = 0
        self.loss_fn = torch.compile(self.sae.loss) if cfg.compile else self.sae.loss
        self._last_checkpoint_time = time.monotonic()
        self._reset_log_acc()
        self.matmul_flops: float | None = None
        self.last_log: dict[str, Any] = {}

    @property
    def matmul_dtype_name(self) -> str:
        return str(self.sae.mm_dtype or torch.float32).removeprefix("torch.")

    @property
    def sparse_step(self) -> bool:
        """topk/batchtopk steps run on sparse codes (CPU, not compiled)."""
        return (
            self.sae.sparse and self.sae_cfg.architecture != "relu-l1" and self.device.type == "cpu"
        )

    # --------------------------------------------------------------- setup
    def _check_data(self) -> None:
        d_store = self.source.d
        if d_store != self.sae.d:
            raise StoreError(
                f"store has vectors of d={d_store} but the SAE being resumed has d={self.sae.d}"
            )

    @torch.no_grad()
    def _fit_normalisation(self) -> None:
        """μ (per channel) and s (E‖x − μ‖ = √d) from up to 64 batches of epoch 0's order."""
        mode = self.sae_cfg.normalisation
        if mode == "none":
            return
        total = torch.zeros(self.sae.d, dtype=torch.float64, device=self.device)
        rows: list[Tensor] = []
        n = 0
        for i, x in enumerate(
            self.source.stream(self.cfg.batch_size, seed=self.cfg.seed + 7919, epoch=0)
        ):
            x = x.to(self.device, torch.float64)
            total += x.sum(0)
            n += x.shape[0]
            rows.append(x)
            if i >= 63:
                break
        mean_d = total / n
        scale = 1.0
        if mode == "centre-scale":
            norms = torch.cat([(r - mean_d).norm(dim=1) for r in rows])
            scale = float(norms.mean() / math.sqrt(self.sae.d))
            if not math.isfinite(scale) or scale <= 0:
                raise StoreError(
                    f"cannot normalise: mean input norm is {scale * math.sqrt(self.sae.d)}"
                )
        self.sae.set_normalisation(mean_d.float(), scale)

    # --------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "train_config": to_dict(self.cfg),
            "sae_config": to_dict(self.sae_cfg),
            "sae": {k: v.detach().cpu() for k, v in self.sae.state_dict().items()},
            "optimizer": self.opt.state_dict(),
            "rng": _rng_state(),
            "cursor": {
                "step": self.step,
                "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch,
                "patches_seen": self.patches_seen,
                "n_resamples": self.n_resamples,
                "n_latents_resampled": self.n_latents_resampled,
            },
            "fired_since_resample_h": self.fired_since_resample_h.cpu(),
            "since_fired_h": self.since_fired_h.cpu(),
            # The data's identity (the store's manifest hash): the path may move, the data may not.
            "source_manifest_sha256": getattr(self.source, "manifest_sha256", None),
        }

    def save_state(self) -> None:
        if not self.dist.main:
            return
        # Backstop: never replace the last good state with non-finite weights.
        if not all(bool(torch.isfinite(p).all()) for p in self.sae.parameters()):
            raise MammoSaeError(
                f"the SAE's weights are NaN/Inf at step {self.step}; not saving: "
                f"{self.out / STATE_FILE} keeps the last good state"
            )
        with atomic_path(self.out / STATE_FILE) as tmp:
            torch.save(self.state_dict(), tmp)
        self._last_checkpoint_time = time.monotonic()

    def load_state(self) -> None:
        path = self.out / STATE_FILE
        if not path.is_file():
            raise CheckpointError(
                f"--resume: no training state at {path} to continue; "
                "run without --resume to start one"
            )
        state = load_torch_weights(path, "a training state")
        try:
            if state.get("version") != STATE_VERSION:
                raise CheckpointError(
                    f"{path}: state version {state.get('version')!r}, expected {STATE_VERSION}"
                )
            saved_cfg = state["train_config"]
            cursor = state["cursor"]
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 — any read failure is a corrupt file
            raise CheckpointError(f"corrupt training state {path}: {exc}") from exc
        now = to_dict(self.cfg)
        diffs = [
            f"{k}: {saved_cfg.get(k)!r} → {now.get(k)!r}"
            for k in changed_settings(self.cfg, saved_cfg, resuming=True)
        ]
        if diffs:
            raise MammoSaeError(
                f"{self.out} holds a training run with different settings "
                f"({'; '.join(diffs)}): rerun with its settings to continue it, "
                f"or pass --overwrite to discard it, or use another --out"
            )
        saved_source = state.get("source_manifest_sha256")
        source = getattr(self.source, "manifest_sha256", None)
        if "source_manifest_sha256" in state and saved_source != source:
            raise MammoSaeError(
                f"{self.out} holds a training run on other training data: it was "
                f"trained on the store {saved_cfg.get('store')} (manifest sha256 "
                f"{str(saved_source)[:16]}), --store {self.cfg.store} has "
                f"{str(source)[:16]}; pass --overwrite to discard it, or use "
                "another --out"
            )
        sd = state["sae"]
        if tuple(sd["W_enc"].shape) != (self.sae.h, self.sae.d):
            raise StoreError(
                f"store has d={self.source.d} but {path} holds an SAE with "
                f"W_enc {tuple(sd['W_enc'].shape)}"
            )
        self.sae.load_state_dict(sd)
        self.opt.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
        self.step = int(cursor["step"])
        self.epoch = int(cursor["epoch"])
        self.batch_in_epoch = int(cursor["batch_in_epoch"])
        self.patches_seen = int(cursor["patches_seen"])
        self.n_resamples = int(cursor["n_resamples"])
        self.n_latents_resampled = int(cursor["n_latents_resampled"])
        self.fired_since_resample_h = state["fired_since_resample_h"].to(self.device)
        self.since_fired_h = state["since_fired_h"].to(self.device)

    # --------------------------------------------------------------- logging
    # Per-step statistics summed on the device in one float64 vector (no synchronisation until a
    # log line): loss, recon, sparsity, aux, Σ squared error, Σ variance, L0.
    _STATS = ("loss", "recon", "sparsity", "aux", "sq_err", "var", "l0")

    def _reset_log_acc(self) -> None:
        dev = getattr(self, "device", torch.device("cpu"))
        self._acc_stats = torch.zeros(len(self._STATS), dtype=torch.float64, device=dev)
        self._acc_n = 0
        self._acc_steps = 0
        self._acc_first_step = getattr(self, "step", 0)
        self._acc_first_epoch = getattr(self, "epoch", 0)
        self._acc_fired_h: Tensor | None = None
        self._acc_t0 = time.perf_counter()

    def _log(self, bar: Any) -> None:
        self._raise_if_bad()
        if self._acc_steps == 0:
            return
        acc = dict(zip(self._STATS, self._acc_stats.tolist()))
        acc["steps"], n = self._acc_steps, self._acc_n
        # Batches of > 1 vector, all equal. Single process only: under DDP one rank raising
        # alone would leave the others waiting in their all-reduce.
        if acc["var"] == 0 and n > self._acc_steps and self.dist.world_size == 1:
            raise MammoSaeError(
                f"the training vectors of steps {self._acc_first_step}–{self.step - 1} are all equal "
                "(e.g. all zeros: activations below float16's range stored as 0); an SAE cannot "
                "learn from them: check the store (`mammo-sae extract` with --dtype bfloat16)"
            )
        dt = max(time.perf_counter() - self._acc_t0, 1e-9)
        patches_per_s = n * self.dist.world_size / dt
        fired = self._acc_fired_h.float() / n if self._acc_fired_h is not None else None
        scale2 = float(self.sae.norm_scale) ** 2 if self.sae_cfg.normalisation != "none" else 1.0
        rec = {
            "step": self.step,
            "epoch": self.epoch,
            "patches_seen": self.patches_seen,
            "loss": acc["loss"] / acc["steps"],
            "recon": acc["recon"] / acc["steps"],
            "sparsity": acc["sparsity"] / acc["steps"],
            "aux": acc["aux"] / acc["steps"],
            "mse": acc["sq_err"] / (n * self.sae.d) * scale2,
            "fvu": acc["sq_err"] / acc["var"] if acc["var"] > 0 else float("nan"),
            "l0": acc["l0"] / acc["steps"],
            "dead_fraction": float((self.since_fired_h >= self.dead_window).float().mean()),
            "dead_window_patches": self.dead_window,
            "dense_fraction": float((fired > DENSE_FREQUENCY).float().mean())
            if fired is not None
            else float("nan"),
            "patches_per_s": patches_per_s,
            "mfu": (
                flops_per_patch(self.sae)
                * patches_per_s
                / (self.matmul_flops * self.dist.world_size)
                if self.matmul_flops
                else None
            ),
            "lr": self.opt.param_groups[0]["lr"],
            "n_resamples": self.n_resamples,
            "matmul_dtype": self.matmul_dtype_name,
        }
        self.last_log = rec
        if self.dist.main:
            with open(self.out / LOG_FILE, "a", encoding="utf-8") as f:
                f.write(dumps_json_line(rec))
            if bar is not None:
                bar.set_postfix(
                    loss=f"{rec['loss']:.4g}",
                    fvu=f"{rec['fvu']:.3f}",
                    l0=f"{rec['l0']:.1f}",
                    dead=f"{rec['dead_fraction']:.2f}",
                    pps=f"{patches_per_s:.3g}",
                )
        self._reset_log_acc()

    def _nonfinite_since_log(self) -> bool:
        """A NaN/Inf loss in any step since the last log line poisons the accumulated sum. Local
        to this rank (ranks may reach checkpoints at different times, so no collective here);
        under DDP another rank's bad step reaches these weights, which `save_state` checks."""
        return self._acc_steps > 0 and not math.isfinite(float(self._acc_stats[0]))

    def _raise_if_bad(self) -> None:
        if self._nonfinite_since_log():
            epochs = (
                f"epoch {self._acc_first_epoch}"
                if self._acc_first_epoch == self.epoch
                else f"epochs {self._acc_first_epoch}–{self.epoch}"
            )
            raise MammoSaeError(
                f"non-finite loss in steps {self._acc_first_step}–{self.step - 1} ({epochs}): "
                f"the batch or the model produced NaN/Inf "
                f"(check the activation store for NaN/Inf vectors; the last good state is kept in "
                f"{self.out / STATE_FILE} if one was saved)"
            )

    # --------------------------------------------------------------- step
    def _train_step(self, x_bd: Tensor, n_global: int) -> None:
        x_bd = x_bd.to(self.device, torch.float32, non_blocking=True)
        n_local = x_bd.shape[0]
        if self.device.type == "cpu" and not bool(torch.isfinite(x_bd).all()):
            hint = (
                f"; `mammo-sae store verify --store {self.cfg.store}` checks the store"
                if self.cfg.store
                else ""
            )
            raise MammoSaeError(
                f"batch {self.batch_in_epoch} of epoch {self.epoch} contains NaN or Inf "
                f"values{hint}; the last good state is kept in {self.out / STATE_FILE} "
                "if one was saved"
            )
        dead_h = None
        if self.sae_cfg.architecture != "relu-l1":
            dead_h = self.since_fired_h >= self.dead_window
            if not bool(dead_h.any()):  # decided outside the (possibly compiled) loss
                dead_h = None
        self.opt.zero_grad(set_to_none=True)
        if n_local > 0:
            out = self.loss_fn(x_bd, dead_h)
            out.total.backward()
            fired_h = out.fired_h.to(torch.int64)
        else:  # an empty share of an uneven last batch under DDP
            out = None
            for p in self.sae.parameters():
                p.grad = torch.zeros_like(p)
            fired_h = torch.zeros(self.sae.h, dtype=torch.int64, device=self.device)
        if self.dist.world_size > 1:
            self._all_reduce_grads(n_local / n_global)
            import torch.distributed as dist

            dist.all_reduce(fired_h)
        self.sae.remove_parallel_grads_()
        self.opt.step()
        self.sae.normalise_decoder_()

        # Counters and log accumulators (stay on the device: no synchronisation here).
        self.fired_since_resample_h += fired_h
        self.since_fired_h += n_global
        self.since_fired_h.masked_fill_(fired_h > 0, 0)
        self._acc_fired_h = fired_h if self._acc_fired_h is None else self._acc_fired_h + fired_h
        if out is not None:
            xn = self.sae.normalise(x_bd)
            var = (xn - xn.mean(0)).square().sum()
            self._acc_stats += torch.stack(
                [out.total.detach(), out.recon, out.sparsity, out.aux, out.sq_err, var, out.l0]
            ).double()
            self._acc_n += n_local
            self._acc_steps += 1
        self.step += 1
        self.patches_seen += n_global

    def _all_reduce_grads(self, weight: float) -> None:
        """Σ_r (n_r / N) ∇L_r: the gradient of the global batch mean, also for uneven shares."""
        import torch.distributed as dist

        grads = [p.grad for p in self.sae.parameters()]
        flat = torch.cat([g.reshape(-1) for g in grads]) * weight
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    # --------------------------------------------------------------- resampling
    def _should_resample(self, finished_epoch: int) -> bool:
        r = self.cfg.resample_every
        return (
            self.sae_cfg.architecture == "relu-l1"
            and r > 0
            and (finished_epoch + 1) % r == 0
            and finished_epoch + r < self.cfg.epochs - 1
        )

    @torch.no_grad()
    def resample_dead(self, finished_epoch: int) -> int:
        """Anthropic-2023 resampling as Mammo-SAE does it; returns the number of latents reset.

        Dead = no firing since the last resampling. Inputs (whole batches, ≥ 1, of the same
        seeded order on every rank) are scored by their per-item loss; one input per dead latent
        is drawn ∝ loss² without replacement; the decoder column becomes the unit input, the
        encoder row the unit input × 0.2 × mean alive encoder-row norm, the encoder bias 0, and
        Adam's moments for those entries are zeroed.
        """
        sae, cfg = self.sae, self.cfg
        dead_idx = torch.nonzero(self.fired_since_resample_h == 0).flatten()
        self.fired_since_resample_h.zero_()
        self.n_resamples += 1
        if dead_idx.numel() == 0:
            return 0
        n_batches = max(1, cfg.resample_inputs // cfg.batch_size)
        xs, losses = [], []
        stream = self.source.stream(cfg.batch_size, seed=cfg.seed + 104729, epoch=finished_epoch)
        for i, x in enumerate(stream):
            xn = sae.normalise(x.to(self.device, torch.float32))
            z = torch.relu(sae.pre_acts(xn))
            per_item = (sae.decode_normalised(z) - xn).square().sum(
                1
            ) * self.sae_cfg.recon_scale + self.sae_cfg.l1_coeff * z.sum(1)
            xs.append(xn)
            losses.append(per_item)
            if i + 1 >= n_batches:
                break
        x_nd, loss_n = torch.cat(xs), torch.cat(losses).double()
        n_draw = min(dead_idx.numel(), x_nd.shape[0])
        dead_idx = dead_idx[:n_draw]
        weights = loss_n.square()
        if not torch.isfinite(weights).all() or float(weights.sum()) == 0.0:
            weights = torch.ones_like(weights)
        gen = torch.Generator(device=weights.device).manual_seed(cfg.seed * 7919 + finished_epoch)
        pick = torch.multinomial(weights, n_draw, replacement=False, generator=gen)
        unit_nd = x_nd[pick] / x_nd[pick].norm(dim=1, keepdim=True).clamp_min(1e-12)
        alive = torch.ones(sae.h, dtype=torch.bool, device=self.device)
        alive[dead_idx] = False
        enc_norm = (
            sae.W_enc[alive].norm(dim=1).mean()
            if bool(alive.any())
            else torch.ones((), device=self.device)
        )
        sae.W_dec[:, dead_idx] = unit_nd.t()
        sae.W_enc[dead_idx] = unit_nd * (0.2 * enc_norm)
        sae.b_enc[dead_idx] = 0.0
        for param, index in (
            (sae.W_dec, (slice(None), dead_idx)),
            (sae.W_enc, dead_idx),
            (sae.b_enc, dead_idx),
        ):
            state = self.opt.state.get(param, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][index] = 0.0
        self.n_latents_resampled += int(n_draw)
        return int(n_draw)

    # --------------------------------------------------------------- final metrics
    @torch.no_grad()
    def evaluate(self, max_patches: int) -> dict[str, Any]:
        """MSE (raw units), FVU (vs the sample mean), L0, dead and dense fractions on a sample."""
        sae = self.sae
        was_training = sae.training
        sae.eval()
        sq = var_sum = l0 = 0.0
        n = 0
        fired_h = torch.zeros(sae.h, dtype=torch.float64, device=self.device)
        sum_d = torch.zeros(sae.d, dtype=torch.float64, device=self.device)
        sumsq = 0.0
        for x in self.source.stream(
            min(self.cfg.batch_size, max_patches), seed=self.cfg.seed + 31, epoch=0
        ):
            x = x.to(self.device, torch.float32)
            z, xh = sae(x)
            sq += float((x.double() - xh.double()).square().sum())
            sum_d += x.double().sum(0)
            sumsq += float(x.double().square().sum())
            act = z > 0
            l0 += float(act.sum())
            fired_h += act.sum(0).double()
            n += x.shape[0]
            if n >= max_patches:
                break
        sae.train(was_training)
        if n == 0:
            return {}
        var_sum = sumsq - float(sum_d.square().sum()) / n
        freq = fired_h / n
        return {
            "eval_patches": n,
            "mse": sq / (n * sae.d),
            "fvu": sq / var_sum if var_sum > 0 else float("nan"),
            "l0": l0 / n,
            "dead_fraction_in_sample": float((freq == 0).float().mean()),
            "dense_fraction": float((freq > DENSE_FREQUENCY).float().mean()),
            "decoder_norm_max_deviation": float((sae.W_dec.norm(dim=0) - 1).abs().max()),
        }

    # --------------------------------------------------------------- main loop
    def _discard(self) -> None:
        """--overwrite: remove the previous run's files (a crash before the new run finishes
        must not leave its SAE looking finished)."""
        from .checkpoints import CFG_FILE, WEIGHTS_FILE

        if self.dist.main:
            for name in (STATE_FILE, LOG_FILE, "train_config.json", CFG_FILE, WEIGHTS_FILE):
                (self.out / name).unlink(missing_ok=True)

    def run(self) -> Path:
        cfg = self.cfg
        if cfg.resume and cfg.overwrite:
            raise MammoSaeError("--resume and --overwrite contradict each other; pass one")
        self.out.mkdir(parents=True, exist_ok=True)
        if cfg.overwrite:
            self._discard()
        # The same command after a crash continues (load_state refuses other settings or data).
        if cfg.resume or (not cfg.overwrite and (self.out / STATE_FILE).exists()):
            self.load_state()
        else:
            self._fit_normalisation()
            if self.dist.main:
                write_json(self.out / "train_config.json", {"schema_version": 1, **to_dict(cfg)})
        self._check_data()
        if self.dead_window < cfg.dead_window_patches and self.dist.main:
            print(
                f"dead latents: no firing for {self.dead_window:,} patches (one epoch; "
                f"--dead-window-patches {cfg.dead_window_patches:,} is longer than the data)",
                flush=True,
            )
        if cfg.measure_matmul:
            dt = self.sae.mm_dtype or torch.float32
            self.matmul_flops = measure_matmul_flops(
                self.sae.d, self.sae.h, min(cfg.batch_size, 2048), self.device, dt
            )
        total_steps = cfg.epochs * self.n_batches
        stop_at = min(total_steps, cfg.max_steps) if cfg.max_steps is not None else total_steps
        bar = None
        if cfg.progress and self.dist.main:
            from tqdm import tqdm

            bar = tqdm(
                total=stop_at, initial=min(self.step, stop_at), unit="step", desc="sae train"
            )
        self._reset_log_acc()
        try:
            while self.epoch < cfg.epochs and self.step < stop_at:
                stream = self.source.stream(
                    self.stream_batch,
                    seed=cfg.seed,
                    epoch=self.epoch,
                    start_batch=self.batch_in_epoch,
                    rank=self.dist.rank,
                    world_size=self.dist.world_size,
                    drop_last=cfg.drop_last,
                )
                for x_bd in self._global_batches(stream):
                    x_local, n_global = x_bd
                    self._train_step(x_local, n_global)
                    self.batch_in_epoch += 1
                    if bar is not None:
                        bar.update(1)
                    if self.step % cfg.log_every == 0:
                        self._log(bar)
                    if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                        self._raise_if_bad()
                        self.save_state()
                    if self.step >= stop_at:
                        break
                if self.batch_in_epoch < self.n_batches:
                    break  # stopped early (max_steps)
                finished = self.epoch
                self.epoch += 1
                self.batch_in_epoch = 0
                if self._should_resample(finished):
                    self._raise_if_bad()
                    self.resample_dead(finished)
                if not cfg.checkpoint_every and (
                    time.monotonic() - self._last_checkpoint_time >= cfg.checkpoint_seconds
                    or self.epoch == cfg.epochs
                ):
                    self._raise_if_bad()
                    self.save_state()
            self._log(bar)
            self.save_state()
        except KeyboardInterrupt:
            if not self._nonfinite_since_log():
                self.save_state()
            raise
        finally:
            if bar is not None:
                bar.close()
        out = self._finish(complete=self.epoch >= cfg.epochs)
        self.dist.finish()
        return out

    def _global_batches(self, stream: Iterator[Tensor]) -> Iterator[tuple[Tensor, int]]:
        """Pair each local batch with the global batch size (for the DDP gradient weights)."""
        for x in stream:
            n = x.shape[0]
            if self.dist.world_size > 1:
                import torch.distributed as dist

                t = torch.tensor([n], dtype=torch.int64, device=self.device)
                dist.all_reduce(t)
                n = int(t)
            yield x, n

    def _finish(self, *, complete: bool) -> Path:
        from .checkpoints import save_sae

        metrics = self.evaluate(self.cfg.eval_patches) if self.cfg.eval_patches > 0 else {}
        if not self.dist.main:
            return self.out
        extra = {
            # Relative to this folder when the store lies beside it (a run), else absolute.
            "source_store": portable_path(self.cfg.store, self.out) if self.cfg.store else None,
            "source_store_manifest_sha256": getattr(self.source, "manifest_sha256", None),
            "training": {
                "config": to_dict(self.cfg),
                "steps": self.step,
                "epochs_done": self.epoch,
                "patches_seen": self.patches_seen,
                "n_resamples": self.n_resamples,
                "dead_window_patches": self.dead_window,
                "n_latents_resampled": self.n_latents_resampled,
                "complete": complete,
                "world_size": self.dist.world_size,
                "device": str(self.device),
                "bf16_matmuls": self.sae.mm_dtype is not None,
                "matmul_dtype": self.matmul_dtype_name,
                "sparse_topk_step": self.sparse_step,
            },
            "final_metrics": metrics,
            "last_log": self.last_log,
        }
        return save_sae(self.sae, self.out, extra=extra)


def train_sae(cfg: SAETrainConfig, source: BatchSource | None = None) -> Path:
    """Train (or resume) an SAE; returns the output directory, a native SAE checkpoint.
    Holds --out's writer lock throughout (rank 0 for all ranks under torchrun)."""
    with writer_lock(cfg.out, enabled=int(os.environ.get("RANK", "0")) == 0):
        return Trainer(cfg, source).run()


__all__ = [
    "SAETrainConfig",
    "Trainer",
    "train_sae",
    "BatchSource",
    "TensorSource",
    "measure_matmul_flops",
    "flops_per_patch",
]
