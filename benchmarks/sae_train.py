"""SAE training throughput: patches/s and MFU of mammo-sae's trainer step vs alternatives.

Compared on the same random data, same shapes, same device:
  ours      mammo_sae Trainer step (fused relu-l1 backward, parallel-gradient removal, Adam,
            decoder renormalisation, on-device counters); bf16 matmul operands on GPU
  naive     a straightforward PyTorch module of the same math: autograd, a gradient hook for the
            projection, torch.optim.Adam defaults, renormalisation after the step (fp32; on GPU
            with torch.autocast(bf16) so the comparison is about the implementation)
  saelens   SAELens StandardTrainingSAE.training_forward_pass + backward + Adam (its "standard"
            L1 SAE: norm-weighted L1, no column constraint; same FLOP class)

MFU = 10·d·h FLOPs per patch × patches/s ÷ the rate of one (B × d) @ (d × h) matmul measured
at start-up in the training dtype. Figures are printed, never asserted.

    python benchmarks/sae_train.py                   # small + Mammo-SAE-sized configs, few steps
    python benchmarks/sae_train.py --configs small --steps 50
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from mammo_sae.sae.train import TensorSource, TrainConfig, Trainer, measure_matmul_flops

# d, h, batch. "tiny" does almost no arithmetic: its step time is the fixed per-step cost (Python,
# kernel launches, synchronisations) that dominates small SAEs on a GPU; its MFU means nothing
# (the reference matmul is itself overhead-bound) — read its µs/step.
CONFIGS = {"tiny": (32, 128, 64), "small": (256, 2048, 4096), "mammo": (2048, 16384, 4096)}


class NaiveSAE(nn.Module):
    """The reference math written the obvious way."""

    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.W_enc = nn.Parameter(torch.randn(h, d) * 0.01)
        self.b_enc = nn.Parameter(torch.zeros(h))
        W_dec = torch.randn(d, h)
        self.W_dec = nn.Parameter(W_dec / W_dec.norm(dim=0))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.W_dec.register_hook(self._project)

    def _project(self, g: torch.Tensor) -> torch.Tensor:
        unit = self.W_dec / self.W_dec.norm(dim=0, keepdim=True)
        return g - unit * (g * unit).sum(0, keepdim=True)

    def loss(self, x: torch.Tensor, l1: float) -> torch.Tensor:
        z = torch.relu((x - self.b_dec) @ self.W_enc.t() + self.b_enc)
        x_hat = z @ self.W_dec.t() + self.b_dec
        return ((x - x_hat).pow(2).mean(-1) + l1 * z.sum(-1)).mean()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(step: Callable[[torch.Tensor], None], data: torch.Tensor, batch: int, steps: int,
          warmup: int, device: torch.device) -> float:
    """Patches per second over `steps` timed steps after `warmup` untimed ones."""
    n = data.shape[0]
    for i in range(warmup):
        step(data[(i * batch) % (n - batch + 1):][:batch])
    _sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        step(data[(i * batch) % (n - batch + 1):][:batch])
    _sync(device)
    return steps * batch / (time.perf_counter() - t0)


def bench_ours(d: int, h: int, batch: int, data: torch.Tensor, steps: int, warmup: int,
               device: torch.device, compile: bool = False) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(out=Path(tmp), h=h, batch_size=batch, device=str(device), progress=False,
                          measure_matmul=False, eval_patches=0, compile=compile)
        trainer = Trainer(cfg, TensorSource(data[:batch]))
        return _time(lambda x: trainer._train_step(x, x.shape[0]), data, batch, steps, warmup, device)


def bench_naive(d: int, h: int, batch: int, data: torch.Tensor, steps: int, warmup: int,
                device: torch.device) -> float:
    sae = NaiveSAE(d, h).to(device)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-4)

    def step(x: torch.Tensor) -> None:
        opt.zero_grad()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = sae.loss(x, 3e-5)
        loss.backward()
        opt.step()
        with torch.no_grad():
            sae.W_dec.div_(sae.W_dec.norm(dim=0, keepdim=True))

    return _time(step, data, batch, steps, warmup, device)


def bench_saelens(d: int, h: int, batch: int, data: torch.Tensor, steps: int, warmup: int,
                  device: torch.device) -> float | None:
    try:
        from sae_lens.saes.sae import TrainStepInput
        from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    except Exception as exc:  # noqa: BLE001 — optional comparison
        print(f"  saelens: not available ({exc})")
        return None
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d, d_sae=h, l1_coefficient=0.06,
                                                        device=str(device)))
    sae.to(device)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-4)

    def step(x: torch.Tensor) -> None:
        opt.zero_grad()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={"l1": 0.06},
                                                           dead_neuron_mask=None, n_training_steps=0,
                                                           is_logging_step=False))
        out.loss.backward()
        opt.step()

    return _time(step, data, batch, steps, warmup, device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="small,mammo", help="comma list of: " + ", ".join(CONFIGS))
    ap.add_argument("--steps", type=int, default=0, help="timed steps (0: 20 small / 2 mammo on CPU, 50 on GPU)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--skip", default="", help="comma list of implementations to skip (naive, saelens)")
    ap.add_argument("--compile", action="store_true", help="also time our step with --compile "
                                                           "(torch.compile of the loss; warm-up compiles)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    device = torch.device(args.device)
    skip = set(filter(None, args.skip.split(",")))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}")
    rows = []
    for cfg_name in args.configs.split(","):
        d, h, batch = CONFIGS[cfg_name]
        steps = args.steps or (50 if device.type == "cuda" else {"tiny": 200, "small": 20}.get(cfg_name, 2))
        mm_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        rate = measure_matmul_flops(d, h, min(batch, 2048), device, mm_dtype)
        data = torch.randn(batch * 2, d, device=device).relu()
        print(f"\n[{cfg_name}] d={d} h={h} batch={batch} steps={steps}; matmul rate "
              f"{rate / 1e9:.1f} GFLOP/s ({str(mm_dtype).removeprefix('torch.')})")
        results: dict[str, float | None] = {}
        impls: list[tuple[str, Callable[..., float | None]]] = [("ours", bench_ours)]
        if args.compile:
            impls.append(("ours+compile", lambda *a: bench_ours(*a, compile=True)))
        impls += [("naive", bench_naive), ("saelens", bench_saelens)]
        for impl, fn in impls:
            if impl in skip:
                continue
            pps = fn(d, h, batch, data, steps, args.warmup, device)
            results[impl] = pps
            if pps is not None:
                mfu = 10 * d * h * pps / rate
                print(f"  {impl:12s} {pps:12.1f} patches/s   MFU {100 * mfu:5.1f} %   "
                      f"{1e6 * batch / pps:9.1f} µs/step")
        ours = results.get("ours")
        for other in ("naive", "saelens"):
            if ours and results.get(other):
                print(f"  ours / {other}: {ours / results[other]:.2f}×")
        rows.append((cfg_name, results))
    print("\n| config | ours patches/s | naive | saelens | ours/naive | ours/saelens |")
    print("| --- | --- | --- | --- | --- | --- |")
    for cfg_name, r in rows:
        fmt = lambda v: f"{v:.0f}" if v else "–"  # noqa: E731
        ratio = lambda o: f"{r['ours'] / r[o]:.2f}" if r.get("ours") and r.get(o) else "–"  # noqa: E731
        print(f"| {cfg_name} | {fmt(r.get('ours'))} | {fmt(r.get('naive'))} | {fmt(r.get('saelens'))} "
              f"| {ratio('naive')} | {ratio('saelens')} |")


if __name__ == "__main__":
    main()
