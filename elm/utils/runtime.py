"""Seeding, device and precision choices shared by every stage."""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

# glibc mallopt parameters (malloc.h) and what keep_freed_memory sets them to
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP = {_M_MMAP_THRESHOLD: 32 << 20, _M_TRIM_THRESHOLD: 1 << 30}
_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed blocks for reuse instead of returning them to the kernel.

    [project decision, issue #15] A training step allocates and frees the same activation-sized
    blocks (MBs) every time; with glibc's defaults many go back to the kernel (mmap'd blocks,
    heap trimming) and are faulted in again on the next step: ~40k page faults per 12 search
    steps. Blocks under 32 MB now come from the heap, which keeps up to 1 GiB free: the bf16
    search step was 2.4% faster (4 paired runs, docs/benchmarks.md). The stage commands and
    ``elm.bench`` call this; ``import elm`` does not. Skipped off glibc, where the user set
    ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` or ``ELM_KEEP_FREED_MEMORY=0``.
    Returns whether it applied."""
    if os.environ.get("ELM_KEEP_FREED_MEMORY", "1") == "0" or any(k in os.environ for k in _MALLOC_ENV):
        return False
    try:
        import ctypes

        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows)
        return False
    return all(mallopt(param, value) == 1 for param, value in _KEEP.items())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` = this rank's GPU (``LOCAL_RANK`` under torchrun) when CUDA is available, else CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    if not isinstance(device, str) or device.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r} is unknown; valid: auto, cpu, cuda, cuda:<index>")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available; use device=cpu or device=auto")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ValueError(f"device={device!r} is not a device; valid: auto, cpu, cuda, cuda:<index>") from None


def autocast(device: torch.device, precision: str = "bf16"):
    """bf16 autocast where ``precision=bf16`` has native bf16 (CUDA, CPUs with AVX512-BF16/AMX);
    full precision elsewhere (``elm.utils.precision``)."""
    from .precision import resolve_precision

    return resolve_precision(precision, device).autocast()


def dist_info() -> tuple[int, int]:
    """(rank, world_size) from torchrun's environment (0, 1 when not distributed)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_distributed() -> bool:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU); False when not launched by torchrun."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend)
    return True


def reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a copy; identity when not distributed)."""
    if dist_info()[1] > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


def reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (identity when not distributed)."""
    return reduce_sum(x) / dist_info()[1] if dist_info()[1] > 1 else x


def broadcast_object(obj: Any) -> Any:
    """Rank 0's (picklable) object on every rank (identity when not distributed)."""
    if dist_info()[1] > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's object, in rank order, on every rank (``[obj]`` when not distributed)."""
    if dist_info()[1] > 1:
        out: list[Any] = [None] * dist_info()[1]
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def any_rank(flag: bool, device: Any = "cpu") -> bool:
    """True on every rank when ``flag`` is true on one of them (``flag`` when not distributed)."""
    if dist_info()[1] == 1:
        return flag
    return bool(reduce_sum(torch.tensor([float(flag)], device=device)).item() > 0)


def barrier() -> None:
    if dist_info()[1] > 1:
        dist.barrier()


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
