"""Every retrain setting checked before the teacher and the data load (one line naming the key,
the value and what is valid): a bad value fails in a second, not after the teacher head's fit or an
epoch of training."""

from __future__ import annotations

from omegaconf import DictConfig

from ..distill.losses import hidden_loss
from ..train import SCHEDULES
from ..utils.settings import check_choice, check_flag, check_number


def check_retrain_settings(cfg: DictConfig) -> None:
    """The ``retrain``, ``distill``, ``teacher_head`` and ``data`` settings of ``configs/retrain.yaml``."""
    r = cfg.retrain
    check_number("retrain.epochs", r.epochs, 0)  # 0: export the initialised model as it is
    check_number("retrain.steps_per_epoch", r.steps_per_epoch, 1, none=True)
    check_number("retrain.batch_size", r.batch_size, 1)
    check_number("retrain.grad_accum", r.get("grad_accum", 1), 1)
    check_number("retrain.lr", r.lr, 0, integer=False, strict=True)
    check_number("retrain.weight_decay", r.weight_decay, 0, integer=False)
    check_choice("retrain.schedule", r.schedule, SCHEDULES)
    check_number("retrain.warmup_steps", r.warmup_steps, 0)
    check_number("retrain.grad_clip", r.grad_clip, 0, integer=False, strict=True)
    check_number("retrain.dropout", r.dropout, 0, integer=False, high=0.9)
    check_number("retrain.mlm_probability", r.mlm_probability, 0, integer=False, strict=True, high=1)
    check_number("retrain.checkpoint_every", r.get("checkpoint_every"), 1, none=True)
    check_number("retrain.eval_batches", r.get("eval_batches"), 1, none=True)
    check_number("retrain.log_every", r.get("log_every", 0), 0)
    for key in ("lm", "hidden", "point", "kd"):
        check_number(f"distill.{key}", cfg.distill[key], 0, integer=False)
    check_number("distill.temperature", cfg.distill.temperature, 0, integer=False, strict=True)
    if cfg.distill.get("loss") is not None:
        hidden_loss(cfg.distill.loss)
    h = cfg.teacher_head
    check_flag("teacher_head.fit", h.fit)
    if h.fit:
        check_number("teacher_head.steps", h.steps, 1)
        check_number("teacher_head.lr", h.lr, 0, integer=False, strict=True)
        check_number("teacher_head.batch_size", h.batch_size, 1)
    check_number("data.seq_len", cfg.data.seq_len, 2)
    check_number("data.val_fraction", cfg.data.val_fraction, 0, integer=False, strict=True, high=0.5)
    check_number("seed", cfg.seed, 0)
