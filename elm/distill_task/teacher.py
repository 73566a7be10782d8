"""The task teacher: the teacher fine-tuned on the task, found or made once and cached.

``teacher=`` may name (a) a pretrained encoder (``default`` = the packaged MiniLM, any Hugging Face
dir or hub name) which is then fine-tuned on the task with :func:`elm.finetune.run_finetune`, or
(b) a model already fine-tuned on the task: a dir with a sequence-classification head for the
task's label count (one made by elm carries ``elm_task.json`` naming its task, and a different
task is refused).

Cache: ``<teacher_finetune.cache_dir or run dir / "teacher">/<task>-<key>/`` where ``key`` hashes
the teacher, the task and every setting of the teacher's fine-tuning, so a later run with the same
task and settings reuses it (the fine-tuning run's own ``results.json`` says it is complete) and a
run with other settings gets its own folder. [project decision] The teacher is fine-tuned on the
same training subset the student distils from (``data.*``), never on the validation split, with its
own budget and learning rate (``teacher_finetune.train``: epochs, steps, batch and rate, so the
student's schedule never changes the teacher; MiniLM wants ~1e-4, small students ~1e-3) and one
seed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..data.tasks import TaskData
from ..finetune.checkpoint import RESULTS_FILE
from ..finetune.run import run_finetune
from ..utils.cli import finished_work
from ..utils.fingerprint import digest
from ..utils.hub import classifier_head
from ..utils.io import atomic_write_json
from ..utils.runtime import dist_info

log = logging.getLogger("elm.distill_task")
TASK_RECORD = "elm_task.json"


def task_key(task: str) -> str:
    """A task's short name: ``bbc``, ``sst2``, or a local path's last part (no suffix)."""
    return Path(str(task).rstrip("/")).stem.lower().replace("glue/", "").replace("glue:", "")


def read_task_record(path: str | Path) -> dict[str, Any] | None:
    """``elm_task.json`` of a teacher elm fine-tuned (None when absent)."""
    file = Path(path) / TASK_RECORD
    if not file.is_file():
        return None
    try:
        record = json.loads(file.read_text())
    except ValueError:
        raise ValueError(f"{file} is not valid JSON; remove it or fine-tune the teacher again") from None
    if not isinstance(record, dict):
        raise ValueError(f"{file} does not hold a task record")
    return record


def finetuned_for(path: str, config: Any, task: TaskData) -> bool:
    """Whether the model at ``path`` is already a classifier for ``task``; raises for another task.

    True: a classifier head with the task's label count (and, where elm wrote ``elm_task.json``,
    the same task and label names). False: no classifier head (a pretrained encoder to fine-tune).
    """
    labels = int(config.num_labels) if classifier_head(getattr(config, "architectures", None)) else None
    record = read_task_record(path)
    if record is not None:
        if task_key(record.get("task", "")) != task_key(task.name) or record.get("label_names") != task.label_names:
            raise ValueError(
                f"teacher {path!r} was fine-tuned on task {record.get('task')!r} (labels {record.get('label_names')}), "
                f"not on {task.name!r} (labels {task.label_names}); give a teacher for this task or a pretrained one"
            )
        return True
    if labels is None:
        return False
    if labels != task.num_labels:
        raise ValueError(
            f"teacher {path!r} has a {labels}-label classifier but task {task.name!r} has {task.num_labels} "
            "label(s); give a teacher fine-tuned on this task or a pretrained encoder to fine-tune"
        )
    log.warning("teacher %s has a %d-label classifier and no %s: assuming it was fine-tuned on %s",
                path, labels, TASK_RECORD, task.name)  # fmt: skip
    return True


def teacher_finetune_config(cfg: DictConfig, teacher_path: str) -> DictConfig:
    """The fine-tuning config of the teacher: the run's ``data`` and ``train`` with
    ``teacher_finetune.train`` merged over ``train``, one seed, weights kept."""
    own = cfg.teacher_finetune
    keep = {k: cfg[k] for k in ("task", "device", "precision", "progress", "data", "train", "logger")}
    tcfg = OmegaConf.create(OmegaConf.to_container(OmegaConf.create(keep), resolve=True))
    tcfg.train = OmegaConf.merge(tcfg.train, own.get("train") or {})
    tcfg.model, tcfg.tokenizer, tcfg.reinit_head = teacher_path, None, False
    tcfg.seeds, tcfg.train.save_model, tcfg.data.holdout = [int(own.seed)], True, None
    tcfg.resume = True  # a finished cache is returned as is, an interrupted one continues
    return tcfg


def finetune_key(fcfg: DictConfig) -> str:
    """A hash of every setting that shapes a fine-tuning run's weights: model, task, data, seeds and
    training, less checkpointing and logging (equal keys: the same fine-tuned model)."""
    shaping = {k: OmegaConf.to_container(fcfg, resolve=True).get(k) for k in ("model", "task", "data", "seeds")}
    shaping["train"] = {k: v for k, v in OmegaConf.to_container(fcfg.train, resolve=True).items()
                        if k not in ("save_steps", "save_model", "logging_steps")}  # fmt: skip
    return digest(shaping)


def cache_dir(cfg: DictConfig, run_dir: Path, tcfg: DictConfig) -> Path:
    """Where the fine-tuned teacher for these settings lives (see the module docstring)."""
    root = cfg.teacher_finetune.get("cache_dir")
    root = Path(str(root)).expanduser() if root else run_dir / "teacher"
    return root / f"{task_key(str(cfg.task))}-{finetune_key(tcfg)[:10]}"


def write_task_record(model_dir: Path, task: str, label_names: list | None, num_labels: int, teacher: str,
                      metrics: dict[str, Any]) -> None:  # fmt: skip
    """``elm_task.json`` beside a fine-tuned teacher (rank 0, once): which task it was fine-tuned on."""
    if dist_info()[0] == 0 and not (model_dir / TASK_RECORD).is_file():
        record = {"task": task, "label_names": label_names, "num_labels": num_labels, "teacher": teacher,
                  "metrics": metrics}  # fmt: skip
        atomic_write_json(model_dir / TASK_RECORD, record)


def task_teacher(cfg: DictConfig, run_dir: Path, teacher_path: str, config: Any, task: TaskData) -> dict[str, Any]:
    """The teacher for this task: ``{"path", "finetuned_here", "metrics", "time_s", "cache"}``.

    A teacher already fine-tuned on the task is used as is; otherwise it is fine-tuned (or the cached
    fine-tuning with the same settings is reused: ``reused`` says which).
    """
    if finetuned_for(teacher_path, config, task):
        return {"path": teacher_path, "source": teacher_path, "finetuned_here": False, "reused": None}
    tcfg = teacher_finetune_config(cfg, teacher_path)
    out = cache_dir(cfg, run_dir, tcfg)
    model_dir = out / f"seed{int(tcfg.seeds[0])}" / "model"
    done = finished_work(out) == RESULTS_FILE
    if done and not (model_dir / "config.json").is_file():
        raise ValueError(f"the teacher cache {out} is complete but has no model ({model_dir}); remove {out} to "
                         "fine-tune the teacher again")  # fmt: skip
    if done:
        log.info("reusing the fine-tuned teacher in %s", out)
    else:
        log.info("fine-tuning the teacher %s on %s into %s", teacher_path, cfg.task, out)
    results = run_finetune(tcfg, out)
    write_task_record(model_dir, str(cfg.task), task.label_names, task.num_labels, teacher_path, results["mean"])
    return {"path": str(model_dir), "source": teacher_path, "finetuned_here": True, "reused": done,
            "cache": str(out), "metrics": results["mean"], "lr": results["lr"], "time_s": results["time_s"]}  # fmt: skip

