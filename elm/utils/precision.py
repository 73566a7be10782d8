"""Which precision a stage really runs in, decided once per run and said in one line.

``precision=bf16`` (the default) means *bf16 where the hardware computes it natively*:

- **CUDA**: ``torch.autocast(bfloat16)`` (weights fp32, matmuls in bf16).
- **CPU with native bf16** (x86 ``avx512_bf16`` or ``amx_bf16``, Arm ``bf16``): bf16 too. On such
  a CPU autocast alone gained 1.19x on an encoder training step while the whole step in bf16
  gained 2.05x (issue #15), so the stages that own their training loop use
  :class:`elm.utils.master.Bf16Master`: the forward and backward run on a bf16 copy of the
  weights, the optimiser updates fp32 master weights. The rest (fine-tuning through the HF
  Trainer, the causal stages) uses autocast, which is what those loops support.
- **CPU without it** (AVX2-only x86, e.g. the AMD EPYC this project's CI runs on): fp32, and one
  info line says so: emulated bf16 ran a matmul >100x and a search step 6x slower (docs/benchmarks.md).

``ELM_CPU_BF16=1`` / ``=0`` overrides the CPU detection (tests use ``=1`` to check the bf16 path's
losses on any CPU; it is slow where bf16 is emulated).
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
from dataclasses import dataclass
from functools import lru_cache

import torch

from .settings import check_choice

log = logging.getLogger("elm")
PRECISIONS = ("bf16", "fp32")
_TOLD: set[tuple[str, str]] = set()  # (stage, device type) already told that bf16 runs as fp32
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 /proc/cpuinfo flags; Arm reports "bf16" in Features


@lru_cache(maxsize=1)
def _cpuinfo_flags() -> frozenset[str]:
    try:
        text = open("/proc/cpuinfo", encoding="utf-8", errors="replace").read()
    except OSError:  # not Linux
        return frozenset()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags)


def cpu_bf16_native() -> bool:
    """Whether this CPU computes bf16 natively (``ELM_CPU_BF16`` = 1/0 overrides)."""
    forced = os.environ.get("ELM_CPU_BF16", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    flags = _cpuinfo_flags()
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "bf16" in flags
    return any(f in flags for f in CPU_BF16_FLAGS)


@dataclass(frozen=True)
class Precision:
    """What ``precision=<requested>`` resolved to on ``device``.

    ``mode``: ``fp32`` | ``autocast`` (CUDA, or a CPU loop that cannot hold bf16 weights) |
    ``master`` (CPU: bf16 weights for compute, fp32 master weights in the optimiser).
    """

    requested: str
    mode: str
    device_type: str

    @property
    def bf16(self) -> bool:
        return self.mode != "fp32"

    def autocast(self):
        """Autocast context of the ``autocast`` mode; a no-op for ``fp32`` and ``master``."""
        if self.mode != "autocast":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=torch.bfloat16)


def resolve_precision(precision: str, device: torch.device | str, *, master: bool = False,
                      stage: str = "elm") -> Precision:  # fmt: skip
    """``precision`` (bf16 | fp32) on ``device``; ``master``: the caller can train bf16 weights with
    fp32 masters on CPU. Says in one info line when bf16 was asked for but runs as fp32."""
    check_choice("precision", precision, PRECISIONS)
    device_type = torch.device(device).type
    if precision == "fp32":
        return Precision(precision, "fp32", device_type)
    if device_type == "cuda":
        return Precision(precision, "autocast", device_type)
    if device_type == "cpu" and cpu_bf16_native():
        return Precision(precision, "master" if master else "autocast", device_type)
    if (stage, device_type) not in _TOLD:
        _TOLD.add((stage, device_type))
        log.info("[%s] precision=bf16 runs as fp32 here: this %s has no native bf16 (%s); fp32 is several "
                 "times faster than emulated bf16", stage, "CPU" if device_type == "cpu" else device_type,
                 "looked for " + "/".join(CPU_BF16_FLAGS) if device_type == "cpu" else "no bf16 kernels")
    return Precision(precision, "fp32", device_type)
