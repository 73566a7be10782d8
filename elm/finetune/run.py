"""``run_finetune(cfg, run_dir)``: fine-tune a model on one task over several seeds and score it.

Per seed (:func:`finetune_seed`, top to bottom): seed everything, load the backbone's weights plus a
fresh, seeded classifier head (``AutoModelForSequenceClassification``: elm exports after ``import
elm``, any Hugging Face model dir), train with the Hugging Face ``Trainer``, evaluate on the
validation split with the task's official metrics (:func:`elm.data.tasks.compute_metrics`). The
settings, the output files (``results.json``, ``metrics.jsonl``, ``seed<k>/model``) and resume are
described in ``docs/evaluate.md``; the checkpoints in :mod:`elm.finetune.checkpoint`.

[project decision] The split and the ``max_train`` / ``max_eval`` subsets are drawn once with
``data.split_seed``, so seeds differ only in head init, data order and dropout; ``std`` is the
sample standard deviation (ddof=1) over seeds (0 for one seed). ``score`` is the mean of a task's
metrics (GLUE's convention for tasks with two metrics).

Resume (``resume=true``): the seeds already in ``results.json`` are kept, the seed in progress
continues from its last complete checkpoint, later seeds run as usual. [decision] A seed's
checkpoints are deleted once its record is in ``results.json`` (they are 3x the model size and a
finished seed is never resumed). Without ``resume=true`` a run dir holding an unfinished run is refused.

torchrun: [decision] ``train.batch_size`` is the GLOBAL batch, as in the search and retrain
stages: each of ``world`` ranks gets ``batch_size / (world x grad_accum)`` rows per micro-step
(the HF Trainer's ``per_device_train_batch_size``), so 1 and N ranks take the same optimiser
steps; ``eval_batch_size`` is split over the ranks (rounded up). Only rank 0 writes files.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from ..data.collate import PadCollator
from ..data.tasks import TaskData, compute_metrics, load_task
from ..utils.cpu_dropout import use_cpu_dropout
from ..utils.hub import (
    classifier_head,
    load_tokenizer,
    max_positions,
    push_model,
    quiet_transformers,
    reach_hub,
    resolve_model_path,
)
from ..utils.io import atomic_write_json, atomic_write_text, check_weight_files
from ..utils.logging import RunLogger
from ..utils.precision import resolve_precision
from ..utils.preempt import Preempted, Preemption
from ..utils.runtime import any_rank, dist_info, resolve_device, seed_everything
from .card import classifier_card
from .checkpoint import (
    RESULTS_FILE,
    CheckpointCallback,
    on_rank0,
    plan_run,
    read_marker,
    remove_checkpoints,
    train_loss,
)
from .settings import batch_sizes, check_finetune_settings, hub_seed, lr_sweep, save_steps

log = logging.getLogger("elm.finetune")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model")


# ---------------------------------------------------------------------------------------------
# Inputs: model dir, tokenizer, task (all checked before any training)
# ---------------------------------------------------------------------------------------------


def resolve_model(model: Any) -> str:
    """The model directory (aliases as for teachers: ``default`` = the packaged MiniLM)."""
    if model is None or str(model).strip() in ("", "???"):
        raise ValueError("model=<dir> is required: an exported elm dir or any Hugging Face model dir")
    path = resolve_model_path(str(model), "model")
    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        raise ValueError(f"model dir {str(model)!r} has no config.json; is it a save_pretrained folder?")
    check_weight_files(path)
    return path


def load_model_config(path: str) -> Any:
    from transformers import AutoConfig  # ElmConfig is registered: `import elm` ran before this module

    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, KeyError) as err:  # unknown model_type -> KeyError / ValueError
        raise ValueError(f"cannot read the config of model {path!r}: {err}") from None


def finetune_tokenizer(model_path: str, tokenizer: Any = None) -> Any:
    """``tokenizer`` if given, else the model dir's own; a model dir without one is an error."""
    if tokenizer is None:
        if Path(model_path).is_dir() and not any((Path(model_path) / f).is_file() for f in _TOKENIZER_FILES):
            raise ValueError(
                f"model dir {model_path!r} has no tokenizer files; pass tokenizer=<dir> (e.g. tokenizer=default "
                "for elm students of the default MiniLM teacher)"
            )
        tokenizer = model_path
    return load_tokenizer(str(tokenizer))


def check_compatible(
    config: Any, tokenizer: Any, num_labels: int, max_length: int, reinit_head: bool
) -> None:
    """One clear line for a tokenizer/model/task mismatch instead of an index error mid-training."""
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise ValueError(
            f"tokenizer {tokenizer.name_or_path!r} has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{vocab}; use the tokenizer the model was trained with (tokenizer=<dir>)"
        )
    positions = max_positions(config)
    if positions is not None and max_length > positions:
        raise ValueError(f"data.max_length={max_length} exceeds the model's {positions} positions")
    head = classifier_head(getattr(config, "architectures", None))
    if head and config.num_labels != num_labels and not reinit_head:
        raise ValueError(
            f"model has a {config.num_labels}-label classifier ({head}) but the task has {num_labels} "
            "label(s); pass reinit_head=true to train a fresh head"
        )


def prepare_task(cfg: DictConfig, tokenizer: Any) -> TaskData:
    d = cfg.data
    task = load_task(
        str(cfg.task), tokenizer, max_length=d.max_length, max_train=d.max_train, seed=d.split_seed
    )
    if d.get("max_eval") is not None and d.max_eval < len(task.validation):
        keep = np.sort(np.random.default_rng(d.split_seed).permutation(len(task.validation))[: d.max_eval])
        task.validation = task.validation.select(keep.tolist())
    holdout = d.get("holdout")
    if holdout:  # evaluate on a seeded part of the training subset instead (the lr sweep: never the reported split)
        if not 0 < holdout < 1:
            raise ValueError(f"data.holdout={holdout!r} must be a fraction in (0, 1)")
        order = np.random.default_rng(d.split_seed + 1).permutation(len(task.train))
        n = max(1, int(holdout * len(task.train)))
        task.validation = task.train.select(np.sort(order[:n]).tolist())
        task.train = task.train.select(np.sort(order[n:]).tolist())
    if len(task.train) == 0 or len(task.validation) == 0:
        raise ValueError(f"task {cfg.task!r} has an empty training or validation split")
    return task


# ---------------------------------------------------------------------------------------------
# One seed
# ---------------------------------------------------------------------------------------------


def trainer_metrics(metric_names: list[str]) -> Callable[[Any], dict[str, float]]:
    """The ``Trainer``'s ``compute_metrics``: an ``EvalPrediction`` (logits [N, C] or [N, 1], or a
    tuple whose first item they are) scored by :func:`elm.data.tasks.compute_metrics`."""

    def metrics(pred: Any) -> dict[str, float]:
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        return compute_metrics(list(metric_names), logits, pred.label_ids)

    return metrics


def _training_args(cfg: DictConfig, out_dir: Path, seed: int, device_type: str, lr: float | None = None):
    from transformers import TrainingArguments

    t = cfg.train
    per_device, per_device_eval = batch_sizes(t, dist_info()[1])
    every = save_steps(t)
    wandb = cfg.logger.mode != "disabled"
    if wandb:  # the Trainer's WandbCallback reads these
        os.environ.setdefault("WANDB_MODE", str(cfg.logger.mode))
        os.environ.setdefault("WANDB_PROJECT", str(cfg.logger.project))
        os.environ.setdefault("WANDB_DIR", str(out_dir))
    return TrainingArguments(
        output_dir=str(out_dir),
        num_train_epochs=float(t.epochs),
        max_steps=int(t.max_steps),
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=per_device_eval,
        gradient_accumulation_steps=int(t.grad_accum),
        learning_rate=float(t.lr if lr is None else lr),
        weight_decay=float(t.weight_decay),
        warmup_steps=float(t.warmup),
        lr_scheduler_type=str(t.scheduler),
        logging_strategy="steps",
        logging_steps=int(t.logging_steps),
        logging_first_step=True,
        eval_strategy="no",
        # checkpoint-<step> every `every` steps and at the end; CheckpointCallback marks them complete
        # and deletes the older ones (after the mark, which save_total_limit would not wait for)
        save_strategy="steps" if every else "no",
        save_steps=every or 500,
        save_total_limit=None,
        report_to=["wandb"] if wandb else "none",
        run_name=f"{Path(str(cfg.task)).name}-seed{seed}",
        seed=seed,
        data_seed=seed,
        use_cpu=device_type == "cpu",
        bf16=resolve_precision(cfg.precision, device_type, stage="finetune").bf16,  # HF: autocast
        dataloader_num_workers=0,
        disable_tqdm=not cfg.progress,
    )


def finetune_seed(cfg: DictConfig, model_path: str, task: TaskData, tokenizer: Any, seed: int, out_dir: Path,
                  *, resume_from: str | Path | None = None, preemption: Preemption | None = None,
                  run_dir: Path | None = None, lr: float | None = None, distill: Any = None) -> dict[str, Any]:  # fmt: skip
    """Fine-tune once from ``model_path`` with ``seed``; validation metrics, losses and timings.

    ``resume_from``: a complete ``checkpoint-<step>`` folder of this seed to continue from.
    ``preemption``: an entered :class:`Preemption`; when SIGTERM sets it, the Trainer checkpoints at
    the next step end and stops, and this raises :class:`Preempted` naming the checkpoint.
    ``distill``: task distillation (:class:`elm.distill_task.run.TaskDistiller`): its trainer class,
    collator and the training rows it prepared replace the plain ones.
    """
    import torch
    from transformers import AutoModelForSequenceClassification, PrinterCallback, Trainer

    device = resolve_device(cfg.device)
    rank = dist_info()[0]
    seed_everything(seed)  # the fresh head's init depends on the seed
    with quiet_transformers():  # "newly initialised classifier" is the point here
        model = AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=task.num_labels, ignore_mismatched_sizes=bool(cfg.reinit_head),
            dtype=torch.float32,  # fp32 master weights whatever the checkpoint's dtype (precision: autocast)
        )
    if device.type == "cpu":
        use_cpu_dropout(model)  # elm's fast CPU dropout masks for models elm did not write (the teacher)
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id  # causal models pool the last real token
    if task.label_names and len(task.label_names) == task.num_labels:  # pipelines print names, not LABEL_k
        model.config.id2label = dict(enumerate(map(str, task.label_names)))
        model.config.label2id = {name: i for i, name in model.config.id2label.items()}

    marker = read_marker(Path(resume_from)) if resume_from is not None else None
    callback = CheckpointCallback(preemption or Preemption(), save=save_steps(cfg.train) > 0, rank=rank,
                                  train_time_s=float((marker or {}).get("train_time_s", 0.0)))  # fmt: skip
    args = _training_args(cfg, out_dir, seed, device.type, lr)
    make, collator = Trainer, PadCollator(tokenizer)
    if distill is not None:  # its trainer and collator; teacher_logits / kd_hard reach compute_loss
        make, collator, args.remove_unused_columns = distill.trainer, distill.collator(tokenizer), False
    trainer = make(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=task.train,
        eval_dataset=task.validation,
        compute_metrics=trainer_metrics(task.metric),
        callbacks=[callback],
    )
    if not cfg.progress:  # [decision] no bars means no per-step dicts either: the curve is in results.json
        trainer.remove_callback(PrinterCallback)
    if resume_from is not None:
        log.info("seed %d: resuming from %s", seed, resume_from)
    trainer.train(resume_from_checkpoint=None if resume_from is None else str(resume_from))
    train_time = callback.train_time()
    if callback.stopped_at is not None:
        ckpt = out_dir / f"checkpoint-{callback.stopped_at}"
        raise Preempted(f"preempted at step {callback.stopped_at} of seed {seed}: checkpoint in {ckpt}; "
                        f"continue with resume=true hydra.run.dir={run_dir or out_dir.parent}")  # fmt: skip
    t0 = time.perf_counter()
    evaluation = trainer.evaluate()
    eval_time = time.perf_counter() - t0
    scores = {m: float(evaluation[f"eval_{m}"]) for m in task.metric}
    if any(not math.isfinite(v) for v in scores.values()):
        log.warning("seed %d: a metric is not finite (constant predictions?): %s", seed, scores)
    history = trainer.state.log_history  # restored from the checkpoint on resume: the whole run
    curve = [[int(r["step"]), float(r["loss"])] for r in history if "loss" in r]
    if cfg.train.save_model:
        trainer.save_model(str(out_dir / "model"))  # every rank calls it; rank 0 writes
        if rank == 0:
            tokenizer.save_pretrained(str(out_dir / "model"))
            card = classifier_card(model_path, task, seed, scores, int(trainer.state.global_step))
            atomic_write_text(out_dir / "model" / "README.md", card)
    return {
        "seed": seed,
        "metrics": scores,
        "score": float(np.mean(list(scores.values()))),
        "eval_loss": float(evaluation["eval_loss"]),
        "train_loss": train_loss(history),
        "steps": int(trainer.state.global_step),
        "loss_curve": curve,
        "train_time_s": train_time,
        "eval_time_s": eval_time,
    }


# ---------------------------------------------------------------------------------------------
# All seeds
# ---------------------------------------------------------------------------------------------


def summarise(per_seed: list[dict[str, Any]]) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and sample std (ddof=1; 0 for one seed) of every metric, ``score`` and ``eval_loss``."""
    keys = [*per_seed[0]["metrics"], "score", "eval_loss"]
    rows = [{**r, **r["metrics"]} for r in per_seed]  # a metric's value, else the record's
    values = {k: np.array([r[k] for r in rows], float) for k in keys}
    mean = {k: float(v.mean()) for k, v in values.items()}
    std = {k: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for k, v in values.items()}
    return mean, std


def run_finetune(cfg: DictConfig, run_dir: str | Path, distill: Any = None) -> dict[str, Any]:
    """Check inputs, then fine-tune ``cfg.model`` on ``cfg.task`` once per seed; returns results.json.

    With ``resume=true`` continues the run in ``run_dir`` (see the module docstring). Under torchrun
    every rank calls this; rank 0 decides what to resume and writes the files. ``distill``: train by
    task distillation instead (:mod:`elm.distill_task`; same seeds, files and resume rules).
    """
    run_dir = Path(run_dir)
    t_start = time.perf_counter()
    seeds = check_finetune_settings(cfg)
    rank, world = dist_info()
    batch_sizes(cfg.train, world)
    device = resolve_device(cfg.device)
    model_path = resolve_model(None if OmegaConf.is_missing(cfg, "model") else cfg.model)
    config = load_model_config(model_path)
    if world > 1:  # join torchrun's group now (gloo / NCCL) through the accelerate state the Trainer reuses
        from accelerate import PartialState

        PartialState(cpu=device.type == "cpu")
    plan = on_rank0(lambda: plan_run(cfg, run_dir, seeds, model_path))  # refusals before any loading
    if plan["finished"] is not None:
        log.info("%s is complete: nothing to do", run_dir / RESULTS_FILE)
        return publish(cfg, run_dir, seeds, plan["finished"]) if rank == 0 else plan["finished"]
    if rank == 0:
        reach_hub(cfg.get("hub"))  # no network or a bad token: seconds, not after the training
    tokenizer = finetune_tokenizer(model_path, cfg.get("tokenizer"))
    task = prepare_task(cfg, tokenizer)
    check_compatible(config, tokenizer, task.num_labels, int(cfg.data.max_length), bool(cfg.reinit_head))
    lr, sweep = float(cfg.train.lr), lr_sweep(cfg)
    if sweep:
        lr, sweep = select_lr(cfg, run_dir, sweep, seeds[0], distill)
    train_size = len(task.train)
    if distill is not None:  # the original rows (+ variants) with the teacher's logits
        task.train = distill.train_set(task, tokenizer)

    writer = rank == 0
    results: dict[str, Any] = {
        "model": model_path,
        "model_type": getattr(config, "model_type", None),
        "task": str(cfg.task),
        "num_labels": task.num_labels,
        "metrics": list(task.metric),
        "label_names": task.label_names,
        "train_size": train_size,
        "eval_size": len(task.validation),
        "seeds": seeds,
        "lr": lr,
        "lr_sweep": sweep or None,
        "device": str(device),
        "config": OmegaConf.to_container(cfg, resolve=True),
        **({"distillation": distill.facts} if distill is not None else {}),
        "per_seed": list(plan["done"]),
        "complete": False,
    }

    def save() -> None:
        if results["per_seed"]:
            results["mean"], results["std"] = summarise(results["per_seed"])
        results["time_s"] = plan["time_s"] + time.perf_counter() - t_start
        if writer:
            atomic_write_json(run_dir / RESULTS_FILE, results)

    if writer:
        run_dir.mkdir(parents=True, exist_ok=True)
        logger = RunLogger(run_dir, mode="disabled")  # metrics.jsonl; wandb goes through the Trainer
        if plan["done"] or logger.path.exists():  # the kept seeds' lines only (none on a fresh run)
            logger.rewrite([{k: v for k, v in r.items() if k != "loss_curve"} for r in plan["done"]])
    save()  # before the first seed: a crash now leaves an unfinished run that resume=true knows
    done = {r["seed"] for r in plan["done"]}
    with Preemption() as preemption:
        for i, seed in enumerate(seeds):
            if seed in done:
                log.info("seed %d: kept from %s", seed, run_dir / RESULTS_FILE)
                continue
            seed_dir = run_dir / f"seed{seed}"
            record = finetune_seed(cfg, model_path, task, tokenizer, seed, seed_dir,
                                   resume_from=plan["checkpoints"].get(seed), preemption=preemption,
                                   run_dir=run_dir, lr=lr, distill=distill)  # fmt: skip
            log.info("seed %d: %s (%.1f s)", seed, record["metrics"], record["train_time_s"])
            results["per_seed"] = sorted([*results["per_seed"], record], key=lambda r: seeds.index(r["seed"]))
            save()
            if writer:
                logger.log({k: v for k, v in record.items() if k != "loss_curve"}, step=seed)
                remove_checkpoints(seed_dir)  # [decision] a finished seed's checkpoints are not needed
            left = [s for s in seeds[i + 1 :] if s not in done]
            if left and any_rank(preemption.requested, device if device.type == "cuda" else "cpu"):
                raise Preempted(f"preempted after seed {seed}: {RESULTS_FILE} holds {len(results['per_seed'])} of "
                                f"{len(seeds)} seeds; continue with resume=true hydra.run.dir={run_dir}")  # fmt: skip
    results["params"], results["backbone_params"] = count_parameters(model_path, task.num_labels)
    results["complete"] = True
    save()
    return publish(cfg, run_dir, seeds, results) if writer else results


def publish(cfg: DictConfig, run_dir: Path, seeds: list[int], results: dict[str, Any]) -> dict[str, Any]:
    """Push ``hub.seed``'s saved model to ``hub.repo_id`` (rank 0, after results.json is complete: a
    failed push loses nothing, and ``resume=true`` on the finished run pushes again)."""
    seed = hub_seed(cfg, seeds)
    if seed is None:  # no hub settings, or no repo_id
        return results
    pushed, revision = results.get("hub") or {}, cfg.hub.get("revision") or "main"
    if (pushed.get("repo_id"), pushed.get("seed"), pushed.get("revision")) == (cfg.hub.repo_id, seed, revision):
        return results
    record = next(r for r in results["per_seed"] if r["seed"] == seed)
    scores = ", ".join(f"{k} {v:.4f}" for k, v in record["metrics"].items() if isinstance(v, (int, float)))
    results["hub"] = {**push_model(run_dir / f"seed{seed}" / "model", cfg.hub,
                                   f"elm fine-tuned on {cfg.task} (seed {seed}): {scores}"), "seed": seed}  # fmt: skip
    atomic_write_json(run_dir / RESULTS_FILE, results)
    return results


def select_lr(cfg: DictConfig, run_dir: Path, sweep: list[float], seed: int,
              distill: Any = None) -> tuple[float, dict[str, float]]:  # fmt: skip
    """[project decision] The learning rate of this model on this task, chosen on held-out training
    data: one run per rate with the first seed, trained on the training subset minus
    ``train.lr_sweep_holdout`` of it and scored on that part (``<run dir>/lr_sweep/lr<rate>``, kept
    and reused: an interrupted sweep continues); the best mean score wins (ties: the earlier rate).
    The validation split the results report is never used to choose. Small students and their
    teacher want very different rates, and one rate for all rows lets a collapsed run decide a
    comparison. Returns the rate and ``{rate: score}``."""
    scores: dict[str, float] = {}
    for rate in sweep:
        sub = cfg.copy()
        sub.train.lr, sub.train.lr_sweep, sub.seeds, sub.resume = rate, None, [seed], True
        if sub.get("hub") is not None:  # sweep runs are never published
            sub.hub.repo_id = None
        sub.data.holdout = float(cfg.train.get("lr_sweep_holdout", 0.2))
        result = run_finetune(sub, run_dir / "lr_sweep" / f"lr{rate:g}", distill)
        scores[f"{rate:g}"] = float(result["mean"]["score"])
        log.info("lr sweep: lr=%g scored %.4f on held-out training data", rate, scores[f"{rate:g}"])
    best = max(sweep, key=lambda r: (scores[f"{r:g}"], -sweep.index(r)))
    return best, scores


def count_parameters(model_path: str, num_labels: int) -> tuple[int, int]:
    """(all parameters of the classification model, those of its backbone) — built on the meta device."""
    import torch
    from transformers import AutoModelForSequenceClassification

    config = load_model_config(model_path)
    config.num_labels = num_labels
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    backbone = getattr(model, model.base_model_prefix, model)
    return sum(p.numel() for p in model.parameters()), sum(p.numel() for p in backbone.parameters())
