"""Bench cases of the real search step (``SearchTrainer.train_epoch`` on the default space and
teacher): its achieved FLOP/s against the matmul peak of the same precision (the bf16 / fp32
step-time ratios are in :mod:`elm.bench.bf16`).

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on one real step (teacher
forward + every candidate's forward and backward: the matmuls and attention the step runs), so
the count follows the space and the chaining without a hand formula.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile

import torch

from ..utils.precision import Precision
from .cases import _timed_ms, matmul_peak, random_rows


def search_trainer(device, precision: str, *, batch: int = 8, seq: int = 128, teacher_name: str | None = None):
    """A default-space ``SearchTrainer`` on random token rows (the default search's batch and length)."""
    from ..search.trainer import SearchSettings, SearchTrainer
    from ..space import SpaceConfig
    from ..teacher import load_teacher

    teacher = load_teacher(teacher_name, device=device)
    train, held_out = random_rows(len(teacher.tokenizer), 8 * batch, 64, seq)
    space = SpaceConfig().resolve(teacher.hidden_size)
    loop = SearchTrainer.default_loop(batch_size=batch, device=device, precision=precision, progress=False,
                                      run_dir=tempfile.mkdtemp(prefix="elm-bench-"))  # fmt: skip
    settings = SearchSettings(eval_batches=1, analysis_batch_size=8, chain_prob=0.5)
    return SearchTrainer(teacher, space, train, held_out, loop, settings)


def epoch_seconds(trainer, steps: int) -> float:
    """Wall seconds of one ``train_epoch`` of ``steps`` steps (the trainer's counters reset first)."""
    trainer.steps_per_epoch, trainer.step, trainer.epoch = steps, 0, 0
    return _timed_ms(trainer.train_epoch, trainer.device) / 1e3


def step_flops(trainer) -> float:
    """Matmul/attention FLOPs of one real search step."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        epoch_seconds(trainer, 1)
    return float(counter.get_total_flops())


def search_step_utilisation(device, prec: Precision, steps: int = 3, repeats: int = 2,
                            teacher_name: str | None = None) -> str:  # fmt: skip
    """Achieved FLOP/s of the search step vs the matmul peak in the precision the step runs in."""
    trainer = search_trainer(device, prec.requested, teacher_name=teacher_name)
    try:
        flops = step_flops(trainer)
        seconds = statistics.median(epoch_seconds(trainer, steps) / steps for _ in range(repeats))
    finally:
        shutil.rmtree(trainer.run_dir, ignore_errors=True)
    peak = matmul_peak(device, dtype=torch.bfloat16 if prec.bf16 else torch.float32)
    achieved = flops / seconds
    return (f"{'search step FLOP/s (' + ('bf16' if prec.bf16 else 'fp32') + ')':<34} achieved "
            f"{achieved / 1e9:8.1f} GFLOP/s  matmul peak {peak / 1e9:8.1f} GFLOP/s  fraction {achieved / peak:5.2f}  "
            f"({flops / 1e9:.1f} GFLOP/step, {seconds * 1e3:.0f} ms/step; target >= 0.50)")  # fmt: skip
