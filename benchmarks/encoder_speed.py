"""Encoder throughput: images/s for Mammo-CLIP B5 / B2 at 1520x912 and the phantom backbone.

    python benchmarks/encoder_speed.py                       # CPU defaults (slow: B5 full size)
    python benchmarks/encoder_speed.py --device cuda --iters 20
    python benchmarks/encoder_speed.py --cases phantom --variants fp32,fp32-cl,bf16-cl,fp32-denormals

Weights are random (speed does not depend on them, except through denormals, which the
`fp32-denormals` variant shows by leaving flush-to-zero off). Prints figures and ratios; asserts
nothing. On a shared machine the numbers move with other people's load: the load average is
printed next to them.
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import nullcontext

import torch

from mammo_sae.models.classifier import ConceptClassifier
from mammo_sae.models.registry import create_encoder

# name -> (arch, height, width, batch)
CASES = {
    "b5": ("efficientnet-b5", 1520, 912, 1),
    "b2": ("efficientnet-b2", 1520, 912, 1),
    "phantom": ("efficientnet-phantom", 256, 160, 16),
}
VARIANTS = ("fp32", "fp32-cl", "bf16-cl", "fp32-denormals", "train")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(
    arch: str,
    hw: tuple[int, int],
    batch: int,
    variant: str,
    device: torch.device,
    warmup: int,
    iters: int,
) -> float:
    """Images per second for one (arch, size, variant)."""
    torch.manual_seed(0)
    torch.set_flush_denormal(variant != "fp32-denormals")
    model = ConceptClassifier(create_encoder(arch), 1).to(device)
    x = torch.randn(batch, 3, *hw, device=device)
    channels_last = variant.endswith("-cl") or variant == "train"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if variant.startswith("bf16")
        else nullcontext()
    )

    if variant == "train":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step() -> None:
            loss = model(x).float().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    else:
        model.eval()

        def step() -> None:
            with torch.inference_mode(), autocast:
                model.features(x)

    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    sync(device)
    return batch * iters / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cases", default="b5,b2,phantom", help=f"comma list of {', '.join(CASES)}")
    p.add_argument(
        "--variants", default="fp32,fp32-cl", help=f"comma list of {', '.join(VARIANTS)}"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument(
        "--phantom-train",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time a phantom forward+backward+AdamW step (batch 16)",
    )
    args = p.parse_args()
    device = torch.device(args.device)
    print(
        f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"cpu_count={os.cpu_count()} loadavg_before={os.getloadavg()[0]:.1f}"
    )
    if device.type == "cuda":
        print(f"gpu={torch.cuda.get_device_name(device)}")
    for case in args.cases.split(","):
        arch, h, w, batch = CASES[case]
        variants = args.variants.split(",")
        if case == "phantom" and args.phantom_train and "train" not in variants:
            variants.append("train")
        base = None
        for variant in variants:
            ips = measure(arch, (h, w), batch, variant, device, args.warmup, args.iters)
            base = base or ips
            print(
                f"{arch:22s} {h}x{w} batch {batch:2d} {variant:15s} {ips:9.2f} images/s "
                f"({ips / base:5.2f}x {variants[0]})  loadavg={os.getloadavg()[0]:.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
