"""The task-distillation loss inside the Hugging Face ``Trainer`` (so checkpoints, resume, SIGTERM,
torchrun and logging are fine-tuning's, :mod:`elm.finetune.checkpoint`).

Loss per batch (TinyBERT's task stage, weights from ``kd.*``)::

    soft   * T^2 KL(teacher / T || student / T)          (regression: MSE to the teacher's prediction)
  + hard   * cross-entropy (or MSE) to the gold labels    (original rows only: variants have none)
  + hidden * mean over mapped layers of RKD(student, teacher hidden states)
  + attention * mean over mapped layers of KL(teacher attention || student attention)

The teacher's logits are computed once per training row before training (:func:`teacher_logits`;
the teacher is frozen and in eval mode, so they never change) and ride in the batch as
``teacher_logits``; the teacher itself runs during training only when ``hidden`` or ``attention``
is on. Layer map [project decision]: student layer i (1-based) learns from teacher layer
``i * L_teacher / L_student`` (rounded half up), the uniform map of TinyBERT; RKD needs no projection between
widths and attention maps are averaged over heads, so any student shape works.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer

from ..data.collate import PadCollator
from ..distill.losses import attention_relation_loss, rkd_loss, soft_label_loss
from ..utils.settings import check_number


@dataclass(frozen=True)
class KDWeights:
    """``kd.*``: the weight of each loss term and the softmax temperature."""

    soft: float = 1.0
    hard: float = 0.0
    hidden: float = 0.0
    attention: float = 0.0
    temperature: float = 1.0

    def validate(self) -> KDWeights:
        for name in ("soft", "hard", "hidden", "attention"):
            check_number(f"kd.{name}", getattr(self, name), 0, integer=False)
        if not self.soft + self.hard + self.hidden + self.attention > 0:
            raise ValueError("kd.soft, kd.hard, kd.hidden and kd.attention are all 0: nothing to learn from")
        check_number("kd.temperature", self.temperature, 0, integer=False, strict=True)
        return self

    @property
    def needs_teacher(self) -> bool:
        """Whether the teacher must run during training (intermediate-layer terms)."""
        return self.hidden > 0 or self.attention > 0


def layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Teacher layer (1-based) for each student layer 1..L_s: ``i * L_t / L_s`` rounded half up, at least 1."""
    if student_layers < 1 or teacher_layers < 1:
        raise ValueError(f"layer counts must be >= 1, got {student_layers} and {teacher_layers}")
    return [max(1, (2 * i * teacher_layers + student_layers) // (2 * student_layers)) for i in range(1, student_layers + 1)]


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for classification logits ``[N, C]`` (C >= 2), MSE for regression ``[N, 1]``."""
    if logits.shape[-1] == 1:
        return F.mse_loss(logits.float().reshape(-1), labels.float().reshape(-1))
    return F.cross_entropy(logits.float(), labels.long())


class DistillCollator(PadCollator):
    """:class:`PadCollator` plus ``teacher_logits`` ``[B, C]`` and ``kd_hard`` ``[B]`` (1 = the row has a gold label)."""

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = super().__call__(rows)
        if "teacher_logits" in rows[0]:
            batch["teacher_logits"] = torch.tensor([r["teacher_logits"] for r in rows], dtype=torch.float)
            batch["kd_hard"] = torch.tensor([r["kd_hard"] for r in rows], dtype=torch.float)
        return batch


class DistillTrainer(Trainer):
    """``Trainer`` whose training loss is the task-distillation loss above; evaluation (batches with
    no ``teacher_logits``) uses the plain task loss, so ``eval_loss`` compares with fine-tuning's."""

    def __init__(self, *args: Any, kd: KDWeights, teacher: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kd, self.teacher = kd, teacher
        self.model_accepts_loss_kwargs = False  # our loss is a batch mean: the Trainer scales it for grad_accum
        self._map: list[int] | None = None
        if kd.needs_teacher and teacher is None:
            raise ValueError("kd.hidden / kd.attention need the teacher model")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        targets, hard, labels = (inputs.pop(k, None) for k in ("teacher_logits", "kd_hard", "labels"))
        layers = targets is not None and self.kd.needs_teacher and model.training
        out = model(**inputs, output_hidden_states=layers and self.kd.hidden > 0,
                    output_attentions=layers and self.kd.attention > 0)  # fmt: skip
        logits = out.logits
        if targets is None:  # evaluation: the task's own loss
            loss = task_loss(logits, labels) if labels is not None else logits.new_zeros(())
            return (loss, out) if return_outputs else loss
        kd = self.kd
        loss = kd.soft * soft_label_loss(logits, targets.to(logits.device), kd.temperature) if kd.soft else 0.0
        if kd.hard and labels is not None and hard is not None and bool((hard > 0).any()):
            keep = hard.to(logits.device) > 0
            loss = loss + kd.hard * task_loss(logits[keep], labels[keep])
        if layers:
            loss = loss + self._layer_loss(out, inputs)
        return (loss, out) if return_outputs else loss

    def _layer_loss(self, out: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        kd, mask = self.kd, inputs.get("attention_mask")
        self.teacher.to(inputs["input_ids"].device).eval()
        with torch.no_grad():
            t = self.teacher(**{k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "token_type_ids")},
                             output_hidden_states=kd.hidden > 0, output_attentions=kd.attention > 0)  # fmt: skip
        states = out.hidden_states if kd.hidden > 0 else out.attentions
        if self._map is None:
            t_layers = len(t.hidden_states) - 1 if kd.hidden > 0 else len(t.attentions)
            s_layers = len(states) - 1 if kd.hidden > 0 else len(states)
            self._map = layer_map(s_layers, t_layers)
        total = 0.0
        for i, j in enumerate(self._map, start=1):
            if kd.hidden > 0:
                total = total + kd.hidden * rkd_loss(out.hidden_states[i], t.hidden_states[j], mask) / len(self._map)
            if kd.attention > 0:
                total = total + kd.attention * attention_relation_loss(
                    out.attentions[i - 1], t.attentions[j - 1], mask) / len(self._map)  # fmt: skip
        return total


@torch.no_grad()
def teacher_logits(model: Any, rows: list[dict[str, list[int]]], collator: PadCollator, batch_size: int = 64,
                   device: Any = "cpu") -> list[list[float]]:  # fmt: skip
    """The teacher's logits for each row (eval mode, no dropout), batched by similar length."""
    model.eval().to(device)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    out: list[list[float] | None] = [None] * len(rows)
    for b in range(0, len(order), batch_size):
        chunk = order[b : b + batch_size]
        batch = collator([{k: v for k, v in rows[i].items() if k != "labels"} for i in chunk])
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                            enabled=torch.device(device).type == "cuda"):  # fmt: skip
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
        for r, i in enumerate(chunk):
            out[i] = logits[r].tolist()
    return out  # type: ignore[return-value]
