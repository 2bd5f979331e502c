"""SAE training throughput: patches/s and MFU of mammo-sae's trainer step vs alternatives.

Compared on the same random data, same shapes, same device:
  ours          mammo_sae Trainer step, relu-l1, default settings (fused relu-l1 backward,
                parallel-gradient removal, Adam, decoder renormalisation, on-device counters;
                bf16 matmul operands on GPU, and on a CPU with bf16 instructions for d·h ≥ 2^22)
  ours-fp32     the same with --no-bf16
  ours-bf16     the same with bf16 matmul operands forced (any size, any CPU)
  topk          our TopK step (k 32): on CPU the sparse decoder/backward, same matmul dtype as ours
  batchtopk     our BatchTopK step (k 32), likewise
  naive         a straightforward PyTorch module of the relu-l1 math: autograd, a gradient hook for
                the projection, torch.optim.Adam defaults, renormalisation after the step (fp32;
                on GPU with torch.autocast(bf16) so the comparison is about the implementation)
  saelens       SAELens StandardTrainingSAE.training_forward_pass + backward + Adam (its "standard"
                L1 SAE: norm-weighted L1, no column constraint; same FLOP class); optional

Repetitions are interleaved (round r times every implementation once, `--steps` steps each, after
one untimed warm-up step each), so load from other processes hits all of them alike; the table
gives the median patches/s over rounds with the min–max spread, and each ratio is the median of
the per-round ratios (min–max). MFU = 10·d·h FLOPs per patch × patches/s ÷ the rate of one
(B × d) @ (d × h) fp32 matmul measured at start-up (so a bf16 step can exceed 100 %).
Figures are printed, never asserted.

    python benchmarks/sae_train.py --threads 2                        # small + mammo configs
    python benchmarks/sae_train.py --configs mammo --rounds 3 --impls ours,ours-fp32,topk,naive
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from mammo_sae.sae.train import SAETrainConfig, TensorSource, Trainer, measure_matmul_flops

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


def _time(
    step: Callable[[torch.Tensor], None],
    data: torch.Tensor,
    batch: int,
    steps: int,
    offset: int,
    device: torch.device,
) -> float:
    """Patches per second over `steps` steps, batches taken from `offset` on."""
    n = data.shape[0]
    _sync(device)
    t0 = time.perf_counter()
    for i in range(offset, offset + steps):
        step(data[(i * batch) % (n - batch + 1) :][:batch])
    _sync(device)
    return steps * batch / (time.perf_counter() - t0)


def _median(v: list[float]) -> float:
    return statistics.median(v)


Step = Callable[[torch.Tensor], None]


def make_ours(
    d: int,
    h: int,
    batch: int,
    data: torch.Tensor,
    device: torch.device,
    tmp: str,
    architecture: str = "relu-l1",
    bf16: bool | None = None,
    compile: bool = False,
) -> Step:
    """Our trainer's step. bf16 None: the trainer's default rule; True/False: forced."""
    cfg = SAETrainConfig(
        out=Path(tmp) / architecture,
        h=h,
        batch_size=batch,
        device=str(device),
        progress=False,
        measure_matmul=False,
        eval_patches=0,
        compile=compile,
        architecture=architecture,
        k=32,  # type: ignore[arg-type]
        bf16=bf16 is not False,
    )
    trainer = Trainer(cfg, TensorSource(data[:batch]))
    if bf16:
        trainer.sae.mm_dtype = torch.bfloat16
    return lambda x: trainer._train_step(x, x.shape[0])


def make_naive(
    d: int, h: int, batch: int, data: torch.Tensor, device: torch.device, tmp: str
) -> Step:
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

    return step


def make_saelens(
    d: int, h: int, batch: int, data: torch.Tensor, device: torch.device, tmp: str
) -> Step | None:
    try:
        from sae_lens.saes.sae import TrainStepInput
        from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    except Exception as exc:  # noqa: BLE001 — optional comparison
        print(f"  saelens: not available ({exc})")
        return None
    sae = StandardTrainingSAE(
        StandardTrainingSAEConfig(d_in=d, d_sae=h, l1_coefficient=0.06, device=str(device))
    )
    sae.to(device)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-4)

    def step(x: torch.Tensor) -> None:
        opt.zero_grad()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = sae.training_forward_pass(
                TrainStepInput(
                    sae_in=x,
                    coefficients={"l1": 0.06},
                    dead_neuron_mask=None,
                    n_training_steps=0,
                    is_logging_step=False,
                )
            )
        out.loss.backward()
        opt.step()

    return step


IMPLS: dict[str, Callable[..., Step | None]] = {
    "ours": make_ours,
    "ours-fp32": lambda *a: make_ours(*a, bf16=False),
    "ours-bf16": lambda *a: make_ours(*a, bf16=True),
    "topk": lambda *a: make_ours(*a, architecture="topk"),
    "batchtopk": lambda *a: make_ours(*a, architecture="batchtopk"),
    "naive": make_naive,
    "saelens": make_saelens,
}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--configs", default="small,mammo", help="comma list of: " + ", ".join(CONFIGS))
    ap.add_argument(
        "--impls",
        default="ours,ours-fp32,topk,naive,saelens",
        help="comma list of: " + ", ".join(IMPLS) + " (and ours+compile)",
    )
    ap.add_argument(
        "--steps",
        type=int,
        default=0,
        help="timed steps per round (0: 1 for mammo on CPU, 10 small, 100 tiny; 50 on GPU)",
    )
    ap.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds (the median is reported)"
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    device = torch.device(args.device)
    names = [i for i in args.impls.split(",") if i]
    unknown = set(names) - set(IMPLS) - {"ours+compile"}
    if unknown:
        ap.error(f"unknown --impls {sorted(unknown)}; valid: {', '.join(IMPLS)}, ours+compile")
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    print(f"device: {name}; torch {torch.__version__}; rounds {args.rounds}, interleaved")
    table = []
    for cfg_name in args.configs.split(","):
        d, h, batch = CONFIGS[cfg_name]
        cpu_steps = {"tiny": 100, "small": 10}.get(cfg_name, 1)
        steps = args.steps or (50 if device.type == "cuda" else cpu_steps)
        rate = measure_matmul_flops(d, h, min(batch, 2048), device, torch.float32)
        rate_bf16 = measure_matmul_flops(d, h, min(batch, 2048), device, torch.bfloat16)
        data = torch.randn(batch * 2, d, device=device).relu()
        print(
            f"\n[{cfg_name}] d={d} h={h} batch={batch} steps/round={steps}; one matmul: "
            f"{rate / 1e9:.1f} GFLOP/s fp32, {rate_bf16 / 1e9:.1f} bf16"
        )
        pps: dict[str, list[float]] = {}
        with tempfile.TemporaryDirectory() as tmp:
            steppers: dict[str, Step] = {}
            for impl in names:
                make = (
                    (lambda *a: make_ours(*a, compile=True))
                    if impl == "ours+compile"
                    else IMPLS[impl]
                )
                step = make(d, h, batch, data, device, tmp)
                if step is not None:
                    step(data[:batch])  # warm-up (allocations, compilation)
                    steppers[impl] = step
                    pps[impl] = []
            for r in range(args.rounds):
                for impl, step in steppers.items():
                    pps[impl].append(_time(step, data, batch, steps, r * steps, device))
                print(
                    f"  round {r + 1}: " + ", ".join(f"{i} {v[-1]:.0f}" for i, v in pps.items()),
                    flush=True,
                )
        for impl, v in pps.items():
            med = _median(v)
            print(
                f"  {impl:12s} {med:12.1f} patches/s (min {min(v):.1f}, max {max(v):.1f})   "
                f"MFU(fp32) {100 * 10 * d * h * med / rate:5.1f} %   "
                f"{1e6 * batch / med:11.1f} µs/step"
            )
        ratios = {}
        for base in ("naive", "saelens", "ours-fp32"):
            for impl in pps:
                if impl != base and base in pps:
                    rs = [a / b for a, b in zip(pps[impl], pps[base], strict=True)]
                    ratios[(impl, base)] = rs
                    print(
                        f"  {impl} / {base}: {_median(rs):.2f}× "
                        f"(rounds {min(rs):.2f}–{max(rs):.2f})"
                    )
        table.append((cfg_name, pps, ratios))
    print("\n| config | implementation | patches/s (median, min–max) | vs naive | vs saelens |")
    print("| --- | --- | --- | --- | --- |")
    for cfg_name, pps, ratios in table:
        for impl, v in pps.items():
            cells = []
            for base in ("naive", "saelens"):
                rs = ratios.get((impl, base))
                cells.append(f"{_median(rs):.2f}× ({min(rs):.2f}–{max(rs):.2f})" if rs else "–")
            print(
                f"| {cfg_name} | {impl} | {_median(v):.0f} ({min(v):.0f}–{max(v):.0f}) | "
                + " | ".join(cells)
                + " |"
            )


if __name__ == "__main__":
    main()
