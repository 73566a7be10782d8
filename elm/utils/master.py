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

[issue #15] The replica is *compact*: modules with a ``compact_()`` hook (the supernet's elastic
attention and FFNs, ``elm.supernet.elastic``) keep only their active heads and units in it. The
forward and backward then run on contiguous weights of the active size, instead of slices of the
maxima whose backward zero-fills and copies a max-size gradient for every elastic weight; the
hand-over adds the compact gradients into the active part of the fp32 ``.grad`` (zero elsewhere,
as a full-size replica's would be) and the refresh copies only the active part. The fp32 master
weights, the optimiser and what it sees are unchanged.
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
        """A fresh compact replica of ``module``: parameters in bf16 (the active part only where a
        module has ``compact_``); buffers (bases, variances) and plain attributes as they are."""
        self.compute = copy.deepcopy(self.module)
        parts: dict[str, Index] = {}
        for name, sub in self.compute.named_modules():
            if hasattr(sub, "compact_"):
                parts.update({f"{name}.{key}" if name else key: index for key, index in sub.compact_().items()})
        for p in self.compute.parameters():
            p.data = p.data.to(torch.bfloat16)
        self.compute.train(self.module.training)
        masters = dict(self.module.named_parameters())
        self._params = [(masters[name], low, parts.get(name)) for name, low in self.compute.named_parameters()]
        self._trained = [item for item in self._params if item[0].requires_grad]
        self._buffers: dict[int, torch.Tensor] = {}  # compacted parameters' gradient buffers

    def gradients_to_master(self) -> None:
        """Add the replica's gradients (bf16) to the fp32 parameters' ``.grad`` and clear them. A
        compacted parameter's ``.grad`` is a full-size buffer kept across steps: zero outside the
        active part, which the step's first hand-over overwrites (no zero-fill of the maxima)."""
        for i, (master, low, index) in enumerate(self._trained):
            if low.grad is None:
                continue
            if index is None:
                if master.grad is None:
                    master.grad = low.grad.float()
                else:
                    master.grad.add_(low.grad)
            elif master.grad is None:  # the step's first micro-batch
                if i not in self._buffers:
                    self._buffers[i] = torch.zeros_like(master)
                master.grad = self._buffers[i]
                _add_at(master.grad, index, low.grad, overwrite=True)
            else:
                _add_at(master.grad, index, low.grad)
            low.grad = None

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the fp32 weights into the replica (after each optimiser step or a loaded state). Only
        the replica's own slices: new active widths (growth, pruning, a state that has others) need
        :meth:`rebuild`, which the search runs at every epoch start."""
        for master, low, index in self._params:
            low.copy_(take(master, index))


Index = tuple  # where a compact part lies in a full tensor: a slice per dimension, or row indices first


def take(t: torch.Tensor, index: Index | None) -> torch.Tensor:
    """``t`` at ``index`` (a view unless rows are indices); None = all of ``t``."""
    if index is None:
        return t
    rows, *rest = index
    t = t.index_select(0, rows) if torch.is_tensor(rows) else t[rows]
    return t[(slice(None), *rest)]


def _add_at(t: torch.Tensor, index: Index, value: torch.Tensor, overwrite: bool = False) -> None:
    """``t[index] += value`` (``overwrite``: ``= value``) in place."""
    rows, *rest = index
    part = t[(slice(None), *rest)]
    if torch.is_tensor(rows):
        (part.index_copy_ if overwrite else part.index_add_)(0, rows, value.to(t.dtype))
    else:
        (part[rows].copy_ if overwrite else part[rows].add_)(value)


def bf16_teacher(teacher: Any) -> Any:
    """A bf16 copy of a frozen ``elm.teacher.Teacher`` (its outputs are cast to fp32 by the callers)."""
    return dataclasses.replace(teacher, model=copy.deepcopy(teacher.model).to(torch.bfloat16))
