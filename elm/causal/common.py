"""Shared bits of the causal stages: a time-aware training budget and loading causal models.

:class:`StepBudget` is how the causal trainers stay inside a wall-clock budget on a shared CPU
without cutting their LR schedule off mid-way. [project decision] Training progress is
``p = max(step / steps, elapsed / max_time_s)``; the LR warms up linearly over the first steps,
then follows a cosine in ``p``, and the run ends when ``p`` reaches 1. Without ``max_time_s`` this
is the usual step-based warm-up + cosine schedule; with it, a slow (shared) machine takes fewer
steps but still ends at LR 0 exactly when the time is up, however its speed varied on the way.
The steps actually taken are recorded by every caller.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch


class StepBudget:
    """Progress of a run of at most ``steps`` steps and ``max_time_s`` seconds (None = no limit)."""

    def __init__(self, steps: int, max_time_s: float | None = None, warmup_steps: int = 0) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
        if max_time_s is not None and max_time_s <= 0:
            raise ValueError(f"max_time_s must be > 0 or null, got {max_time_s!r}")
        self.requested, self.max_time_s = steps, max_time_s
        self.warmup = min(max(0, warmup_steps), max(1, steps // 10)) if warmup_steps else 0
        self.start = time.perf_counter()
        self.time_limited = False

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def progress(self, step: int) -> float:
        """Fraction of the run done after ``step`` steps: by steps, or by time when that is further."""
        by_steps = (step - self.warmup) / max(1, self.requested - self.warmup)
        by_time = self.elapsed() / self.max_time_s if self.max_time_s else 0.0
        return max(0.0, by_steps, by_time)

    def finished(self, done: int) -> bool:
        if done >= self.requested:
            return True
        if self.max_time_s is not None and self.elapsed() >= self.max_time_s:
            self.time_limited = True
            return True
        return False

    def lr_factor(self, step: int) -> float:
        """Linear warm-up over ``warmup_steps``, then cosine decay to 0 at progress 1."""
        if self.warmup and step < self.warmup:
            return (step + 1) / self.warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, self.progress(step))))

    def record(self, done: int) -> dict[str, Any]:
        return {"requested_steps": self.requested, "steps": done, "time_limited": self.time_limited,
                "max_time_s": self.max_time_s, "time_s": self.elapsed()}  # fmt: skip


def set_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)`` when given (null = leave torch's default). Why one
    thread is the default on a shared CPU: docs/causal.md, "Timing" under "Stages"."""
    if threads:
        torch.set_num_threads(int(threads))


def load_causal_lm(path: str | Path, device: torch.device | str = "cpu"):
    """An exported causal model (ELM or any HF causal LM) and its tokenizer, in eval mode.

    ``import elm`` registers the ELM classes with ``AutoModelForCausalLM``; causal tokenizers
    get ``pad = eos`` (``elm.teacher.load_tokenizer``).
    """
    from transformers import AutoModelForCausalLM

    import elm  # noqa: F401  (registers ElmForCausalLM with the Auto classes)

    from ..utils.hub import load_tokenizer, resolve_model_path

    resolved = resolve_model_path(str(path), "model")
    model = AutoModelForCausalLM.from_pretrained(  # fp32 as elm.teacher.load_teacher, whatever the file holds
        resolved, local_files_only=Path(resolved).is_dir(), dtype=torch.float32
    )
    return model.to(device).eval(), load_tokenizer(resolved)


def num_parameters(model) -> dict[str, int]:
    """All parameters (tied weights once) and those without the embeddings' vocabulary rows."""
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight.numel()
    return {"total": total, "non_vocab": total - emb}


def move(batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}
