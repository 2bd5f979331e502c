"""The one place a `--device` value becomes a torch.device, and a process's place in a
torchrun group (`DistContext`)."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

from .errors import MammoSaeError


def module_device(module: Any) -> Any:
    """The device of a module's first parameter (an SAE, a classifier); the CPU for objects
    without parameters (e.g. a reference-format SAE held as arrays)."""
    import torch

    try:
        return next(module.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


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


@dataclass
class DistContext:
    """This process's place in a torchrun group: rank 0 of 1 outside torchrun (WORLD_SIZE unset
    or 1), where every method is a no-op. `device` is where the group's collectives run: a CUDA
    device (NCCL, the SAE's gradient all-reduce) or None (gloo on CPU tensors, e.g. extraction's
    control messages, which stay on gloo even on GPUs)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this process initialised the group (torchrun CLI), so it ends it
    device: Any = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(
        cls, device: Any = None, *, timeout: datetime.timedelta | None = None
    ) -> DistContext:
        """Join (or reuse) torchrun's process group: NCCL when `device` is a CUDA device, gloo
        otherwise. `timeout`: how long a collective may wait (torch's default when None)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        cuda = device is not None and device.type == "cuda"
        owns = not dist.is_initialized()
        if owns:
            kw = {"timeout": timeout} if timeout is not None else {}
            dist.init_process_group("nccl" if cuda else "gloo", **kw)
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return cls(
            dist.get_rank(), dist.get_world_size(), local_rank, owns, device if cuda else None
        )

    def all_ok(self, ok: bool) -> bool:
        """Barrier that also tells every rank whether all ranks succeeded."""
        if self.world_size == 1:
            return ok
        import torch
        import torch.distributed as dist

        flag = torch.tensor([0 if ok else 1], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) == 0

    def barrier(self) -> None:
        if self.world_size == 1:
            return
        import torch.distributed as dist

        # NCCL's barrier must be told this rank's GPU, or it picks GPU 0 for every rank.
        if self.device is not None:
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def close(self) -> None:
        """Tear down a group this process made (a caller's own group is left alone)."""
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.owns_group = False

    def finish(self) -> None:
        """After a successful run: wait for every rank, then `close`. Without the barrier a rank
        could destroy its group while a peer's last collective is in flight (seen as an
        occasional SIGABRT, 'terminate called without an active exception')."""
        self.barrier()
        self.close()
