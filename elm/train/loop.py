"""One training scaffold for elm's own loops (the search and the retraining).

[project decision] The causal teacher's and MiniLLM's loops are not built on it: they are step
budgets that may end early at a wall-clock limit, the schedule following the run's progress
(:class:`elm.causal.common.StepBudget`), with no epochs and no resume, so they share only the
optimiser (:func:`elm.utils.optim.configure_optimizer`) and the step's end (:func:`clip_and_step`).

What every loop needs lives here once; the trainers keep only their losses, batches and epoch
hooks (:class:`TrainLoop`):

* **the plan** (:class:`LoopConfig`): epochs, steps, the *global* batch split over ranks and
  ``grad_accum`` micro-steps, optimiser and schedule settings, checkpoints, seed, device, precision;
* **DDP** (under ``torchrun``): the trained module wrapped in ``DistributedDataParallel``, with
  gradients all-reduced on the last micro-step only (``no_sync`` before it);
* **precision** (:mod:`elm.utils.precision`): bf16 compute on a replica with fp32 master weights
  on CPUs with native bf16 (:class:`elm.utils.master.Bf16Master`), autocast on CUDA;
* **the optimiser** (AdamW, weight decay on matrices only: :func:`elm.utils.optim.configure_optimizer`),
  gradient clipping and the schedule (:data:`SCHEDULES`);
* **the NaN guard** (:meth:`TrainLoop.nonfinite`): a one-line error naming the step and the terms,
  raised before the step is taken, so the last good checkpoint stays on disk;
* **resume**: optimiser, schedule, epoch, step, history, this epoch's running sums and every
  rank's RNG state, saved atomically (epoch ends on a background thread:
  :class:`elm.utils.io.BackgroundSaver`), every ``checkpoint_every`` steps and on SIGTERM
  (:mod:`elm.utils.preempt`).

The epoch::

    for each step of the epoch (resumed mid-epoch: from the saved step on):
        values = trainer.train_step(micro-batches)   # forward + backward per micro-batch (accumulate),
                                                    # then optimizer_step(): clip, AdamW, refresh, schedule
        running sums; progress bar; per-step log every ``log_every`` steps; checkpoint if due
    record = trainer.epoch_record(mean of the epoch's values)   # validation, analysis, ...
    history += record; checkpoint (written while the next epoch trains); metrics.jsonl
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

from ..utils.io import BackgroundSaver, atomic_torch_save
from ..utils.master import Bf16Master
from ..utils.optim import configure_optimizer
from ..utils.precision import resolve_precision
from ..utils.preempt import Preemption, step_checkpoint
from ..utils.runtime import any_rank, barrier, dist_info, gather_objects, reduce_mean
from ..utils.settings import check_choice


def ramped_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total: int):
    """The search's schedule: a linear ramp ``(s + 1) / warmup`` times a cosine over all ``total``
    steps (the cosine starts at step 0, not after the warm-up as in ``transformers``)."""
    total = max(1, total)

    def factor(s: int) -> float:
        return min(1.0, (s + 1) / max(1, warmup_steps)) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


SCHEDULES: dict[str, Callable[..., Any]] = {
    "linear": get_linear_schedule_with_warmup,  # transformers: warm-up, then linear decay to 0
    "cosine": get_cosine_schedule_with_warmup,  # transformers: warm-up, then a cosine to 0
    "ramped_cosine": ramped_cosine,
}


def clip_and_step(parameters, optimizer: torch.optim.Optimizer, scheduler, grad_clip: float) -> None:
    """The end of every elm training step: clip the gradient norm, update, advance the schedule."""
    nn.utils.clip_grad_norm_(parameters, grad_clip)
    optimizer.step()
    scheduler.step()


@dataclass
class LoopConfig:
    """The settings every elm training loop shares; the keys of the same names under ``search.*``
    and ``retrain.*`` (plus the top-level ``seed``, ``device``, ``precision``, ``progress``).

    ``batch_size`` is the global batch: split over ranks and ``grad_accum`` micro-steps.
    ``steps_per_epoch``: None = one pass over the training split (full batches).
    ``checkpoint_every``: steps between mid-epoch checkpoints (None: epoch ends and SIGTERM only).
    ``log_every``: steps between per-step records in ``metrics.jsonl`` (0: epoch records only).
    """

    epochs: int = 1
    steps_per_epoch: int | None = None
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_steps: int = 20
    schedule: str = "linear"
    grad_clip: float = 1.0
    checkpoint_every: int | None = None
    log_every: int = 0
    seed: int = 0
    device: str | torch.device = "cpu"
    precision: str = "bf16"
    run_dir: str | Path = "."
    progress: bool = True

    @classmethod
    def from_config(cls, node: Any, **top: Any) -> LoopConfig:
        """The loop settings of a stage's config node (``cfg.search``, ``cfg.retrain``: keys it does
        not have keep their defaults) with the run-wide ones in ``top`` (seed, device, ...)."""
        names = {f.name for f in fields(cls)}
        picked = {k: node[k] for k in names if k in node}
        return cls(**{**picked, **{k: v for k, v in top.items() if k in names}})


class TrainLoop:
    """The scaffold a trainer subclasses. The subclass sets :attr:`stage` (``search``: message
    prefixes and setting names) and :attr:`state_file`, calls ``super().__init__`` with the module
    the optimiser trains, and provides:

    * ``batches(epoch, first)``: per step from ``first`` on, ``(micro_batches, tokens, extra)``:
      this rank's micro-batches of the global batch, the global batch's tokens, anything
      ``train_step`` needs besides;
    * ``train_step(micro_batches, extra)``: forward and backward through :meth:`accumulate`, then
      :meth:`optimizer_step`; returns ``{term: value}`` (floats) of the step;
    * ``epoch_record(train_means)``: the epoch's record (validation, analysis, ...);
    * ``extra_state()`` / ``load_extra_state(state)``: what else resume needs (the module's weights).
    """

    stage = "train"
    state_file = "state.pt"

    def __init__(self, module: nn.Module, train_size: int, loop: LoopConfig, *, logger=None,
                 master_ok: bool = True) -> None:  # fmt: skip
        self.rank, self.world = dist_info()
        self.steps_per_epoch = self.plan_steps(loop, train_size)
        self.loop = loop
        self.epochs, self.batch_size, self.grad_accum, self.seed = loop.epochs, loop.batch_size, loop.grad_accum, loop.seed
        self.micro_batch = loop.batch_size // (self.world * loop.grad_accum)
        self.device = torch.device(loop.device)
        self.run_dir, self.logger, self.progress = Path(loop.run_dir), logger, loop.progress and self.rank == 0
        self.module = module
        self.ddp: nn.Module = module
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(module, device_ids=ids)
        self.prec = resolve_precision(loop.precision, self.device, master=self.world == 1 and master_ok, stage=self.stage)
        self.master = Bf16Master(module) if self.prec.mode == "master" else None
        self.trained_parameters = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = configure_optimizer(module, loop.lr, loop.weight_decay)
        self.total_steps = loop.epochs * self.steps_per_epoch
        # warm-up clamped to the run's steps (retrain's plan records it so); the search's ramp never was
        self.warmup_steps = min(loop.warmup_steps, self.total_steps) if loop.schedule != "ramped_cosine" else loop.warmup_steps
        self.scheduler = SCHEDULES[loop.schedule](self.optimizer, self.warmup_steps, max(1, self.total_steps))
        self.epoch, self.step = 0, 0
        self.history: list[dict[str, Any]] = []
        self.epoch_sums: dict[str, float] = {}  # this epoch's summed step values so far (saved mid-epoch)
        self.preemption, self.writer = Preemption(), BackgroundSaver()
        self.last_tokens_per_s = 0.0

    @classmethod
    def plan_steps(cls, loop: LoopConfig, train_size: int) -> int:
        """Steps per epoch of ``loop`` over ``train_size`` rows, after checking the plan (one line
        naming the setting; trainers call it first, before building anything)."""
        s, world = cls.stage, dist_info()[1]
        check_choice(f"{s}.schedule", loop.schedule, SCHEDULES)
        if loop.epochs < 0 or loop.batch_size < 1:
            raise ValueError(f"{s}.epochs={loop.epochs} must be >= 0 and {s}.batch_size={loop.batch_size} >= 1")
        if loop.grad_accum < 1 or loop.batch_size % (world * loop.grad_accum):
            raise ValueError(f"{s}.batch_size={loop.batch_size} must be divisible by world size x grad_accum "
                             f"({world} x {loop.grad_accum})")  # fmt: skip
        full = train_size // loop.batch_size
        if full < 1:
            raise ValueError(f"the training split has {train_size} blocks, fewer than one batch of {loop.batch_size}")
        return min(full, loop.steps_per_epoch) if loop.steps_per_epoch else full

    # ---- hooks -----------------------------------------------------------------------------
    def batches(self, epoch: int, first: int) -> Iterable[tuple[list[dict[str, torch.Tensor]], int, Any]]:
        raise NotImplementedError

    def train_step(self, micro: list[dict[str, torch.Tensor]], extra: Any) -> dict[str, float]:
        raise NotImplementedError

    def epoch_record(self, train: dict[str, float]) -> dict[str, Any]:
        raise NotImplementedError

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def start_epoch(self) -> None:
        """Called before each epoch's steps (e.g. a replica rebuild after the architecture changed)."""

    # ---- one step --------------------------------------------------------------------------
    def accumulate(self, micro: list[dict[str, torch.Tensor]], forward: Callable[[int, dict], tuple[torch.Tensor, Any]]):
        """The gradients of one step (zeroed first): forward and backward of each micro-batch
        (``forward(i, batch) -> (loss, kept)``); DDP
        all-reduces on the last one only, bf16 replica gradients go to the fp32 master weights.
        Returns the ``kept`` values."""
        self.optimizer.zero_grad(set_to_none=True)
        kept = []
        for i, batch in enumerate(micro):
            sync = self.ddp is self.module or i == len(micro) - 1
            with contextlib.nullcontext() if sync else self.ddp.no_sync():  # forward and backward inside
                loss, value = forward(i, batch)
                loss.backward()
                if self.master is not None:
                    self.master.gradients_to_master()
            kept.append(value)
        return kept

    def optimizer_step(self) -> None:
        """Clip, update, refresh the bf16 replica, advance the schedule and the step."""
        clip_and_step(self.trained_parameters, self.optimizer, self.scheduler, self.loop.grad_clip)
        if self.master is not None:
            self.master.refresh()
        self.step += 1

    def nonfinite(self, bad: Iterable[str], where: str = "", advice: str = "") -> FloatingPointError:
        """The NaN guard's error: the step, the bad terms and where the last good checkpoint is."""
        return FloatingPointError(f"non-finite {self.stage} loss at step {self.step} (epoch {self.epoch + 1}{where}) "
                                  f"in {sorted(bad)}; {advice}the last good checkpoint is kept in "
                                  f"{self.run_dir / self.state_file}")  # fmt: skip

    # ---- epochs ----------------------------------------------------------------------------
    def train_epoch(self) -> dict[str, float]:
        self.start_epoch()
        self.module.train()
        if self.master is not None:
            self.master.compute.train()
        first = self.step - self.epoch * self.steps_per_epoch  # > 0 when resuming mid-epoch
        sums: dict[str, float] = dict(self.epoch_sums)
        tokens, start = 0, time.perf_counter()
        bar = tqdm(self.batches(self.epoch, first), total=self.steps_per_epoch, initial=first, disable=not self.progress,
                   desc=f"{self.stage} epoch {self.epoch + 1}/{self.epochs}", leave=False)  # fmt: skip
        for micro, batch_tokens, extra in bar:
            values = self.train_step(micro, extra)
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            tokens += batch_tokens
            every = self.loop.log_every
            if self.logger is not None and every and self.step % every == 0:
                self.logger.log({"step": self.step, "train": values, "lr": self.scheduler.get_last_lr()[0]}, step=self.step)
            loss = values.get("total", sum(values.values()) / max(1, len(values)))
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / (time.perf_counter() - start):.0f}")
            self.epoch_sums = dict(sums)
            stop = any_rank(self.preemption.requested, self.device)
            step_checkpoint(self.step, self.loop.checkpoint_every, self.preemption, self.save,
                            self.run_dir / self.state_file, stop=stop)  # fmt: skip
        self.last_tokens_per_s = tokens / max(time.perf_counter() - start, 1e-9)
        self.epoch_sums = {}
        keys = list(sums)
        means = reduce_mean(torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=self.device))
        return dict(zip(keys, (means / self.steps_per_epoch).tolist()))

    def fit(self) -> list[dict[str, Any]]:
        """The remaining epochs; leaving waits for the last checkpoint to be written."""
        with self.preemption, self.writer:
            while self.epoch < self.epochs:
                t0 = time.perf_counter()
                record = self.epoch_record(self.train_epoch())
                record.update(tokens_per_s=self.last_tokens_per_s, epoch_time_s=time.perf_counter() - t0)
                self.history.append(record)
                self.epoch += 1
                self.save(background=True)  # written while the next epoch trains (and before a log that may fail)
                if self.logger is not None:
                    self.logger.log(record, step=self.step)
        return self.history

    @property
    def train_time_s(self) -> float:
        """Seconds of the finished epochs (training, validation and epoch hooks)."""
        return sum(r["epoch_time_s"] for r in self.history)

    # ---- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Called on every rank (the RNG states are gathered)."""
        cuda = self.device.type == "cuda"
        return {
            **self.extra_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "history": self.history,
            "rng": gather_objects(torch.get_rng_state()),  # one per rank (dropout streams may differ)
            "cuda_rng": gather_objects(torch.cuda.get_rng_state(self.device)) if cuda else None,
            "epoch_sums": self.epoch_sums,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_extra_state(state)  # checks that the state fits, then loads the weights
        if self.master is not None:
            self.master.refresh()
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step, self.history = state["epoch"], state["step"], state["history"]
        self.epoch_sums = dict(state.get("epoch_sums") or {})
        rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
        cuda = state.get("cuda_rng")
        cuda = cuda if isinstance(cuda, list) or cuda is None else [cuda]
        if self.rank < len(rngs):
            torch.set_rng_state(rngs[self.rank].cpu())  # RNG states must be CPU tensors (map_location moved them)
            if cuda is not None and self.device.type == "cuda" and self.rank < len(cuda):
                torch.cuda.set_rng_state(cuda[self.rank].cpu(), self.device)
        else:  # resumed on more ranks than were saved: a fresh, still per-rank, dropout stream
            torch.manual_seed(self.seed * 1000 + self.rank + self.step)

    def save(self, background: bool = False) -> Path:
        """Called on every rank; rank 0 writes (``background``: on the writer thread, after a CPU
        snapshot). A synchronous save first waits for a background write still under way."""
        state, path = self.state_dict(), self.run_dir / self.state_file
        if self.rank == 0:
            if background:
                self.writer.save(state, path)
            else:
                self.writer.wait()
                atomic_torch_save(state, path)
        if not background:
            barrier()  # no rank exits (SIGTERM) before the file is complete
        return path

