"""bf16 compute with fp32 master weights, for CPUs with native bf16 (see :mod:`elm.utils.precision`).

[project decision] On such a CPU autocast alone gains little (1.19x on an encoder training step in
issue #15: every op casts its fp32 weights, and elementwise work stays fp32), while the whole step
in bf16 gained 2.05x but pure bf16 *weights* lose small updates (lr x update < bf16's 8-bit
mantissa). :class:`Bf16Master` keeps both: the model the optimiser sees stays fp32 (checkpoints,
exports, growth and pruning are unchanged), and every forward and backward runs on a bf16 replica
whose weights are refreshed from the fp32 ones after each optimiser step. Losses, reductions and
the statistics (PCA/CKA) stay fp32: the callers cast outputs with ``.float()`` before them.

One step::

    out = master.compute(**inputs)     # bf16 kernels
    loss = criterion(out.float(), ...)
    loss.backward()                    # bf16 gradients on the replica
    master.gradients_to_master()       # accumulated into the fp32 parameters' .grad
    optimizer.step()                   # fp32 update
    master.refresh()                   # fp32 -> bf16 replica

Anything that changes the fp32 module outside the optimiser (loading a state, elastic growth or
pruning, which also change plain attributes such as the active widths) is followed by
:meth:`Bf16Master.rebuild`.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import nn


class Bf16Master:
    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.rebuild()

    def rebuild(self) -> None:
        """A fresh replica of ``module``: parameters in bf16; buffers (bases, variances) and plain
        attributes (active widths) as they are."""
        self.compute = copy.deepcopy(self.module)
        for p in self.compute.parameters():
            p.data = p.data.to(torch.bfloat16)
        self.compute.train(self.module.training)
        self._params = list(zip(self.module.parameters(), self.compute.parameters(), strict=True))
        self._trained = [(m, low) for m, low in self._params if m.requires_grad]

    def gradients_to_master(self) -> None:
        """Add the replica's gradients (bf16) to the fp32 parameters' ``.grad`` and clear them."""
        for master, low in self._trained:
            if low.grad is None:
                continue
            if master.grad is None:
                master.grad = low.grad.float()
            else:
                master.grad.add_(low.grad)
            low.grad = None

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the fp32 weights into the replica (after each optimiser step or a loaded state)."""
        for master, low in self._params:
            low.copy_(master)


def bf16_teacher(teacher: Any) -> Any:
    """A bf16 copy of a frozen ``elm.teacher.Teacher`` (its outputs are cast to fp32 by the callers)."""
    return dataclasses.replace(teacher, model=copy.deepcopy(teacher.model).to(torch.bfloat16))
