"""``run_distill_task(cfg, run_dir)``: a student for one task, taught by the teacher fine-tuned on it.

Reads like the procedure (TinyBERT's second stage; method doc §7 for the evaluation protocol):

1. check every setting and input before any training (:func:`check_inputs`): the student and the
   teacher dirs, one tokenizer for both (the teacher's logits are computed on the student's token
   ids), label counts, ``kd.*`` and ``augment.*``;
2. the task teacher (:func:`elm.distill_task.teacher.task_teacher`): fine-tuned once and cached,
   or given already fine-tuned;
3. the training rows (:meth:`TaskDistiller.train_set`): the task's training subset, plus
   ``augment.n`` masked-word variants of each row when ``augment.enabled``
   (:mod:`elm.distill_task.augment`), each with the teacher's logits; cached in
   ``<run dir>/distill_data/<key>`` (Arrow files, no pickles);
4. the seeds, ``results.json``, checkpoints, resume, SIGTERM, torchrun and the learning-rate sweep
   are :func:`elm.finetune.run_finetune`'s with :class:`elm.distill_task.trainer.DistillTrainer`
   as the trainer: the output has the same format as ``elm.finetune`` plus ``distillation`` (the
   teacher's accuracy, where it came from, the loss weights, the number of variants).

[project decision] Defaults (``configs/distill_task.yaml``): soft labels at T=1 and no hard-label
term, as in TinyBERT's prediction-layer stage; hidden-state RKD and attention KD off by default
because each doubles the CPU step (the teacher runs online); augmentation off by default (it
multiplies the training rows), on in ``scripts/pipeline.sh``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..data.tasks import TaskData
from ..finetune.checkpoint import on_rank0
from ..finetune.run import (
    check_compatible,
    finetune_tokenizer,
    load_model_config,
    prepare_task,
    resolve_model,
    run_finetune,
)
from ..finetune.settings import check_finetune_settings
from ..utils.fingerprint import digest
from ..utils.hub import load_tokenizer, quiet_transformers
from ..utils.io import replace_dir
from ..utils.runtime import resolve_device
from ..utils.settings import check_flag, check_number, to_dataclass
from .augment import augment, load_proposer, word_vocabulary
from .teacher import task_teacher
from .trainer import DistillCollator, DistillTrainer, KDWeights, teacher_logits

log = logging.getLogger("elm.distill_task")


def kd_weights(cfg: DictConfig) -> KDWeights:
    return to_dataclass(KDWeights, cfg.kd, "kd").validate()


def check_augment(cfg: DictConfig) -> dict[str, Any]:
    """``augment.*`` checked (the values named when bad)."""
    a = OmegaConf.to_container(cfg.augment, resolve=True)
    check_flag("augment.enabled", a.get("enabled"))
    for key in ("n", "top_k", "batch_size"):
        check_number(f"augment.{key}", a.get(key), 1)
    check_number("augment.prob", a.get("prob"), 0, integer=False, strict=True, high=1)
    return a


def check_inputs(cfg: DictConfig) -> dict[str, Any]:
    """Every setting and input of the run, before the teacher is fine-tuned or any data prepared."""
    if OmegaConf.is_missing(cfg, "student") or cfg.student in (None, ""):
        raise ValueError("student=<dir> is required: an exported elm student (retrain output) or any HF encoder dir")
    check_finetune_settings(cfg)  # the student's own training, before the teacher is fine-tuned
    kd, augment = kd_weights(cfg), check_augment(cfg)  # settings first, then files
    seed = cfg.teacher_finetune.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"teacher_finetune.seed={seed!r} must be an integer")
    student, teacher = resolve_model(cfg.student), resolve_model(cfg.teacher.name)
    if Path(student).resolve() == Path(teacher).resolve():
        raise ValueError(f"student and teacher are the same model ({student}); give the student to distil into")
    student_config, teacher_config = load_model_config(student), load_model_config(teacher)
    tokenizer = finetune_tokenizer(student, cfg.get("tokenizer"))
    teacher_tok = load_tokenizer(teacher)
    if tokenizer.get_vocab() != teacher_tok.get_vocab():  # the teacher's logits are computed on these ids
        raise ValueError(
            f"the student's tokenizer ({tokenizer.name_or_path!r}, {len(tokenizer)} tokens) and the teacher's "
            f"({teacher_tok.name_or_path!r}, {len(teacher_tok)} tokens) differ; task distillation needs one "
            "vocabulary: use a student distilled from this teacher (or tokenizer=<the teacher's>)"
        )
    if augment["enabled"]:
        word_vocabulary(tokenizer)
    task = prepare_task(cfg, tokenizer)
    check_compatible(student_config, tokenizer, task.num_labels, int(cfg.data.max_length), bool(cfg.reinit_head))
    return {"student": student, "teacher": teacher, "teacher_config": teacher_config, "kd": kd,
            "augment": augment, "task": task}  # fmt: skip


class TaskDistiller:
    """What :func:`elm.finetune.run_finetune` needs to distil instead of fine-tune: the trainer, the
    collator, and the training rows with the teacher's logits (and variants)."""

    collator = DistillCollator  # collator(tokenizer)

    def __init__(self, cfg: DictConfig, run_dir: Path, teacher: dict[str, Any], student: str, kd: KDWeights,
                 augment: dict[str, Any]) -> None:  # fmt: skip
        self.cfg, self.run_dir, self.teacher_info = cfg, run_dir, teacher
        self.student, self.kd, self.augment = student, kd, augment
        self.device = resolve_device(cfg.device)
        self._teacher: Any = None
        self.facts: dict[str, Any] = {"teacher": teacher, "kd": kd.__dict__, "augment": dict(augment)}

    def teacher_model(self) -> Any:
        """The fine-tuned teacher (eager attention when its maps are distilled), loaded once, frozen."""
        if self._teacher is None:
            import torch
            from transformers import AutoModelForSequenceClassification

            kwargs: dict[str, Any] = {"dtype": torch.float32}  # as elm.teacher.load_teacher
            if self.kd.attention > 0:
                kwargs["attn_implementation"] = "eager"
            with quiet_transformers():
                model = AutoModelForSequenceClassification.from_pretrained(self.teacher_info["path"], **kwargs)
            self._teacher = model.eval().requires_grad_(False)
        return self._teacher

    def trainer(self, **kwargs: Any) -> DistillTrainer:
        return DistillTrainer(kd=self.kd, teacher=self.teacher_model() if self.kd.needs_teacher else None, **kwargs)

    def train_set(self, task: TaskData, tokenizer: Any) -> Any:
        """The training rows for distillation (built on rank 0, cached, loaded by every rank)."""
        from datasets import Dataset

        path, meta = on_rank0(lambda: self._build(task, tokenizer))
        self.facts.update(train_rows=meta["rows"], variants=meta["variants"], proposer=meta.get("proposer"))
        return Dataset.load_from_disk(path)

    def _key(self, task: TaskData) -> str:
        ids = hashlib.sha1(json.dumps(list(map(list, task.train["input_ids"]))).encode()).hexdigest()
        weights = Path(self.teacher_info["path"]) / "model.safetensors"
        stamp = [weights.stat().st_size, weights.stat().st_mtime_ns] if weights.is_file() else None
        return digest({"rows": ids, "labels": list(task.train["labels"]), "teacher": self.teacher_info["path"],
                       "stamp": stamp, "augment": self.augment, "seed": int(self.cfg.data.split_seed)})[:12]  # fmt: skip

    def _build(self, task: TaskData, tokenizer: Any) -> tuple[str, dict[str, Any]]:
        from datasets import Dataset

        out = self.run_dir / "distill_data" / self._key(task)
        if (out / "elm_rows.json").is_file():
            log.info("reusing the distillation rows in %s", out)
            return str(out), json.loads((out / "elm_rows.json").read_text())
        keys = ("input_ids", "attention_mask", "token_type_ids", "labels")
        rows = [{**{k: row[k] for k in keys}, "kd_hard": 1.0} for row in task.train]
        meta: dict[str, Any] = {"rows": len(rows), "variants": 0}
        if self.augment["enabled"]:
            mlm, meta["proposer"] = load_proposer(str(self.augment["mlm"]), self.teacher_info["source"], self.student)
            log.info("augmenting %d rows x %d with %s", len(rows), self.augment["n"], meta["proposer"])
            variants = augment(rows, mlm, tokenizer, n=int(self.augment["n"]), prob=float(self.augment["prob"]),
                               top_k=int(self.augment["top_k"]), seed=int(self.cfg.data.split_seed),
                               batch_size=int(self.augment["batch_size"]), device=self.device)  # fmt: skip
            rows += [{**v, "labels": rows[src]["labels"], "kd_hard": 0.0} for src, v in variants]
            meta["variants"] = len(variants)
            del mlm
        log.info("teacher logits for %d rows", len(rows))
        logits = teacher_logits(self.teacher_model(), rows, self.collator(tokenizer), device=self.device)
        for row, z in zip(rows, logits):
            row["teacher_logits"] = z
        meta["rows"] = len(rows)
        tmp = out.with_name(out.name + ".tmp")
        Dataset.from_list(rows).save_to_disk(str(tmp))
        (tmp / "elm_rows.json").write_text(json.dumps(meta))
        replace_dir(tmp, out)
        return str(out), meta


def run_distill_task(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Check, get the task teacher, distil the student once per seed; returns results.json."""
    run_dir = Path(run_dir)
    checked = check_inputs(cfg)
    teacher = task_teacher(cfg, run_dir, checked["teacher"], checked["teacher_config"], checked["task"])
    distiller = TaskDistiller(cfg, run_dir, teacher, checked["student"], checked["kd"], checked["augment"])
    return run_finetune(cfg, run_dir, distill=distiller)
