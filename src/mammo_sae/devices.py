"""The one place a `--device` value becomes a torch.device."""

from __future__ import annotations

import os
from typing import Any

from .errors import MammoSaeError


def resolve_device(name: str, *, local_rank: int | None = None) -> Any:
    """`auto` → this process's GPU when CUDA is available (LOCAL_RANK under torchrun), else the
    CPU; `cuda` without an index → the same GPU; anything else is checked, so an unknown name, a
    GPU index that does not exist or CUDA on a machine without it is a MammoSaeError naming it."""
    import torch

    rank = local_rank if local_rank is not None else int(os.environ.get("LOCAL_RANK", "0"))
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise MammoSaeError(
            f"--device {name} is not a device name (cpu, cuda, cuda:N, mps, auto)"
        ) from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MammoSaeError(f"--device {name}: no CUDA device is available here")
        count = torch.cuda.device_count()
        if device.index is None:  # modulo: a launcher may show each rank only its own GPU
            device = torch.device("cuda", rank % count)
        if device.index >= count:
            raise MammoSaeError(f"--device {name}: this machine has {count} CUDA device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise MammoSaeError(f"--device {name}: MPS is not available here")
    elif device.type != "cpu":
        raise MammoSaeError(f"--device {name}: only cpu, cuda and mps are supported")
    return device


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX): there a bf16 matmul
    runs 2.5–4× as fast as fp32 (2-core AMD EPYC, docs/sae.md); without it oneDNN emulates bf16,
    slower than fp32. Linux only (reads /proc/cpuinfo); False elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False
