"""Checkpoints, resume, preemption and ranks for the fine-tuning stage, on the HF Trainer's machinery.

What the Trainer does for us (checked against transformers 5.24): with ``save_strategy="steps"`` it
writes ``<run dir>/seed<k>/checkpoint-<step>/`` every ``save_steps`` optimizer steps and at the
last step: the model (safetensors), ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth`` (one
``rng_state_<rank>.pth`` per rank under torchrun) and, last, ``trainer_state.json`` (step, epoch,
log history). ``train(resume_from_checkpoint=dir)`` restores weights, optimizer, scheduler, the
RNG states and the data position: the sampler is seeded with ``data_seed`` + epoch, so the Trainer
replays the epoch's order and skips the batches already seen (accelerate's ``skip_first_batches``).

What we add (:class:`CheckpointCallback`):

* **Complete or ignored.** transformers 5.x writes the folder in place (no temp dir + rename), and
  ``save_total_limit`` deletes the older checkpoint before our callback runs. So we keep
  ``save_total_limit=None`` and, in ``on_save`` (after every rank has written its files: a
  barrier), rank 0 writes the marker ``elm_checkpoint.json`` atomically, and only then deletes the
  older checkpoints. Resume takes the newest folder with a marker; a folder without one (a
  SIGKILL mid-save) is deleted. At every instant one complete checkpoint is on disk.
* **Epoch ends**: a checkpoint at each epoch end too (when ``train.save_steps`` is set).
* **SIGTERM** (:class:`elm.utils.preempt.Preemption`): at the next step end, save and stop; all
  ranks agree (a max all-reduce of the flag at every step end). The caller raises ``Preempted``.
* **Loss total**: a log line is forced at every checkpoint and at the last step, so the log
  history saved with each checkpoint covers every step: the seed's ``train_loss`` (mean loss over
  all steps, :func:`train_loss`) is the same after a resume as without one.
* **Fault injection**: ``maybe_inject_kill(step)`` after each checkpoint (crash tests).

:func:`plan_run` (rank 0; the others get its answer) decides where a run starts: without
``resume=true`` an unfinished run dir is refused; with it the finished seeds of ``results.json``
are kept (after checking that the settings are the same) and the seed in progress continues from
its newest complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from transformers import TrainerCallback

from ..utils.io import atomic_write_json, read_json
from ..utils.preempt import Preemption, maybe_inject_kill
from ..utils.runtime import any_rank, barrier, broadcast_object, dist_info

log = logging.getLogger("elm.finetune")
MARKER = "elm_checkpoint.json"
RESULTS_FILE = "results.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def on_rank0(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only and give every rank its result; a ``ValueError`` it raises is
    raised on every rank (so all ranks stop with the same one-line error)."""
    if dist_info()[1] == 1:
        return fn()
    out: tuple[str, Any] = ("ok", None)
    if dist_info()[0] == 0:
        try:
            out = ("ok", fn())
        except ValueError as err:
            out = ("error", str(err))
    kind, value = broadcast_object(out)
    if kind == "error":
        raise ValueError(value)
    return value


# ---------------------------------------------------------------------------------------------
# Checkpoint folders
# ---------------------------------------------------------------------------------------------


def _step(path: Path) -> int:
    match = _CHECKPOINT.match(path.name)
    return int(match.group(1)) if match else -1


def checkpoint_dirs(seed_dir: Path) -> list[Path]:
    """``checkpoint-<step>`` folders, oldest step first."""
    if not seed_dir.is_dir():
        return []
    return sorted((p for p in seed_dir.iterdir() if p.is_dir() and _step(p) >= 0), key=_step)


def read_marker(ckpt: Path) -> dict[str, Any] | None:
    """The marker of a complete checkpoint (None when absent or unreadable)."""
    marker = read_json(ckpt / MARKER)
    return marker if marker is not None and marker.get("step") == _step(ckpt) else None


def last_complete_checkpoint(seed_dir: Path, clean: bool = False) -> Path | None:
    """The newest checkpoint with a marker; ``clean``: delete the folders without one (half-written
    by a crash) and any older ones."""
    dirs = checkpoint_dirs(seed_dir)
    last = next((d for d in reversed(dirs) if read_marker(d) is not None), None)
    if clean:
        for d in dirs:
            if d != last:
                log.info("removing %s checkpoint %s", "incomplete" if read_marker(d) is None else "older", d)
                shutil.rmtree(d, ignore_errors=True)
    return last


def remove_checkpoints(seed_dir: Path) -> None:
    """Delete a seed's checkpoints (and its folder when nothing else is in it)."""
    for d in checkpoint_dirs(seed_dir):
        shutil.rmtree(d, ignore_errors=True)
    if seed_dir.is_dir() and not any(seed_dir.iterdir()):
        seed_dir.rmdir()


def train_loss(log_history: list[dict[str, Any]]) -> float:
    """Mean training loss over all steps, from the logged windows (each ``loss`` is the mean over the
    steps since the previous log line; a line is forced at every checkpoint and at the last step)."""
    total, prev = 0.0, 0
    for row in sorted((r for r in log_history if "loss" in r), key=lambda r: r["step"]):
        total += float(row["loss"]) * (int(row["step"]) - prev)
        prev = int(row["step"])
    return total / prev if prev else float("nan")


# ---------------------------------------------------------------------------------------------
# The callback
# ---------------------------------------------------------------------------------------------


class CheckpointCallback(TrainerCallback):
    """Markers + rotation after each checkpoint, epoch-end checkpoints, SIGTERM = save and stop.

    Args:
        preemption: the entered :class:`Preemption` whose flag SIGTERM sets.
        save: whether periodic / epoch-end checkpoints are on (``train.save_steps`` > 0); a SIGTERM
            checkpoint is written either way.
        rank: this process's rank (rank 0 writes markers and deletes old checkpoints).
        train_time_s: training time spent before this session (from the resumed checkpoint's marker).
    """

    def __init__(self, preemption: Preemption, save: bool, rank: int = 0, train_time_s: float = 0.0) -> None:
        self.preemption, self.save, self.rank = preemption, save, rank
        self.stopped_at: int | None = None  # the step a SIGTERM stopped training at
        self.last_saved = -1
        self.time_before = train_time_s
        self.t0 = time.perf_counter()

    def train_time(self) -> float:
        """Training time of this seed so far, sessions before a resume included."""
        return self.time_before + time.perf_counter() - self.t0

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_saved = state.global_step  # a resumed run starts on its checkpoint
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if any_rank(self.preemption.requested, args.device):
            self.stopped_at = state.global_step
            control.should_save = control.should_training_stop = True
        if control.should_save or state.global_step >= state.max_steps:
            control.should_log = True  # the saved log history then covers every step (train_loss)
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.save and state.global_step != self.last_saved:
            control.should_save = control.should_log = True
        return control

    def on_save(self, args, state, control, **kwargs):
        step = state.global_step
        ckpt = Path(args.output_dir) / f"checkpoint-{step}"
        barrier()  # every rank has written its RNG state
        if self.rank == 0:
            marker = {"step": step, "epoch": state.epoch, "world_size": args.world_size,
                      "train_time_s": self.train_time()}  # fmt: skip
            atomic_write_json(ckpt / MARKER, marker)
            for old in checkpoint_dirs(ckpt.parent):
                if old != ckpt:
                    shutil.rmtree(old, ignore_errors=True)
        barrier()  # the marker is on disk before any rank can be killed below
        self.last_saved = step
        maybe_inject_kill(step)
        return control


# ---------------------------------------------------------------------------------------------
# What a (resumed) run starts from
# ---------------------------------------------------------------------------------------------


# [decision] what a resume may change: where checkpoints go and whether weights are kept
_RESUME_FREE = {"save_steps", "save_model"}


def check_same_run(stored: dict[str, Any], cfg: DictConfig, model_path: str, path: Path) -> None:
    """A resumed run must train the same model on the same task with the same settings."""
    was = stored.get("config") or {}
    now = OmegaConf.to_container(cfg, resolve=True)
    diffs = [("model", stored.get("model"), model_path), ("task", stored.get("task"), str(cfg.task))]
    diffs += [(k, was.get(k), now.get(k)) for k in ("tokenizer", "reinit_head", "precision", "teacher")]
    for section in ("data", "train", "kd", "augment", "teacher_finetune"):  # the last three: elm.distill_task
        old, new = was.get(section) or {}, now.get(section) or {}
        keys = sorted((set(old) | set(new)) - _RESUME_FREE)
        diffs += [(f"{section}.{k}", old.get(k), new.get(k)) for k in keys]
    changed = [f"{k}: {a!r} -> {b!r}" for k, a, b in diffs if a != b]
    if changed:
        raise ValueError(f"resume=true but {path} was written with other settings ({'; '.join(changed[:3])}); "
                         "resume with the same settings or choose another hydra.run.dir")  # fmt: skip


def plan_run(cfg: DictConfig, run_dir: Path, seeds: list[int], model_path: str) -> dict[str, Any]:
    """(rank 0) Where the run starts: ``done`` (records of finished seeds to keep), ``checkpoints``
    (``{seed: checkpoint dir}`` to continue from), ``time_s`` (wall time of earlier sessions),
    ``finished`` (a complete results.json for these seeds, returned as is). Refuses an unfinished
    run dir without ``resume=true``; on resume deletes half-written and finished seeds' checkpoints."""
    path = run_dir / RESULTS_FILE
    stored = None
    if path.is_file():  # an OSError (e.g. permissions) propagates as itself: the file may be intact
        try:
            stored = json.loads(path.read_text())
        except ValueError:
            stored = None
        if not isinstance(stored, dict) or not isinstance(stored.get("per_seed"), list):
            raise ValueError(f"{path} is corrupt or unreadable; remove it or choose another hydra.run.dir")
    leftovers = sorted(run_dir.glob("seed*/checkpoint-*"))
    fresh: dict[str, Any] = {"done": [], "checkpoints": {}, "time_s": 0.0, "finished": None}
    if not cfg.get("resume", False):
        if stored is not None and stored.get("complete"):
            raise ValueError(f"{run_dir} already holds finished results ({RESULTS_FILE}); choose another "
                             "hydra.run.dir (or pass resume=true to keep them)")  # fmt: skip
        if stored is not None or leftovers:
            what = f"checkpoint {leftovers[0]}" if leftovers else f"unfinished {RESULTS_FILE}"
            raise ValueError(f"{run_dir} already holds an unfinished fine-tuning run ({what}); pass resume=true to "
                             "continue it or choose another hydra.run.dir")  # fmt: skip
        return fresh
    if stored is None and not leftovers:
        log.info("resume=true but %s holds no run yet: starting a new one", run_dir)
        return fresh
    if stored is not None:
        check_same_run(stored, cfg, model_path, path)
    records = {r["seed"]: r for r in (stored or {}).get("per_seed", []) if r.get("seed") in seeds}
    if stored is not None and stored.get("complete") and stored.get("seeds") == seeds:
        return {**fresh, "finished": stored}
    checkpoints = {}
    for seed in seeds:
        if seed in records:
            remove_checkpoints(run_dir / f"seed{seed}")  # a crash between results.json and the clean-up
        elif (last := last_complete_checkpoint(run_dir / f"seed{seed}", clean=True)) is not None:
            checkpoints[seed] = str(last)
    return {"done": [records[s] for s in seeds if s in records], "checkpoints": checkpoints,
            "time_s": float((stored or {}).get("time_s", 0.0)), "finished": None}  # fmt: skip
