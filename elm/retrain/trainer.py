"""Whole-model distillation of a standalone student, read top to bottom like the procedure:

    for epoch in 1..E:
        for step in 1..S:
            teacher(masked batch) -> hidden states (+ logits)                 (frozen)
            student(masked batch) -> hidden states, MLM/CLM loss, logits
            loss = w_lm * LM + w_hidden * mean_l HIDDEN(student h_l, teacher h_m[l])   (RKD by default)
                   + w_point * mean_l NMSE(student h_l, basis(teacher h_m[l]))
                   + w_kd * T^2 * KL(p_teacher || p_student)
            AdamW step, gradient clipping, LR schedule (transformers)
        validation LM loss / perplexity; checkpoint (atomic)

[project decision] Hidden-state loss = the one the search used (``distill.loss``, looked up in
``elm.distill.losses.HIDDEN_LOSSES``; relational KD by default), on the output of every student
layer l against the teacher's hidden state ``layer_map[l + 1]`` in the shared basis; ``mse``
leaves the point-wise term alone (``hidden`` is then 0). The point-wise term
(``elm.distill.losses.normalised_mse``) compares the same states in the shared teacher -> student
basis: the search's (so retraining continues in the coordinates the searched blocks were trained
in), or one fitted on the teacher's states (the identity at the teacher's width). Logit KD is the
forward KL at the masked positions (MLM) or at every real token (CLM), with Hinton's T^2
scaling. Both models see the same masked batch.

Reproducibility: each epoch's order and masks come from generators seeded by (seed, epoch); the
global RNG (dropout) is saved in the checkpoint, so a run resumed from the end of epoch k ends
with the same weights as an uninterrupted one.

Data parallel (``torchrun``, docs/retrain.md "Several GPUs / nodes"): ``batch_size`` is the
*global* batch; every rank draws and masks it and keeps its ``batch_size / (world x grad_accum)``
rows per micro-step. A micro-batch's term is weighted by ``its units / the global batch's units``
(x world, undoing DDP's gradient averaging): the gradient and the logged loss are the global
batch's, whatever the split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..data.collate import CLMCollator, MLMCollator, make_loader
from ..distill.losses import forward_kl, hidden_loss, normalised_mse
from ..train import LoopConfig, TrainLoop
from ..utils.io import RETRAIN_STATE_FILE
from ..utils.master import bf16_teacher
from ..utils.runtime import reduce_sum

STATE_FILE = RETRAIN_STATE_FILE
VAL_MASK_SEED = 1_000_003  # fixed masks for validation: scores comparable across epochs and runs


@dataclass
class RetrainSettings:
    """What retraining distils besides the loop (``distill.*`` and ``retrain.*`` keys of these names).

    ``layer_map``: ``num_layers + 1`` teacher hidden-state indices (``elm.supernet.uniform_layer_map``);
    student layer l is pulled towards teacher state ``layer_map[l + 1]``. ``weights``:
    ``{"lm", "hidden", "point", "kd"}``; a 0 weight skips that term. ``loss``: the hidden-state loss
    (``elm.distill.losses.HIDDEN_LOSSES``). ``eval_batches``: validation batches per evaluation
    (None = the whole split).
    """

    layer_map: list[int]
    weights: dict[str, float] = field(default_factory=dict)
    temperature: float = 1.0
    loss: str = "rkd"
    eval_batches: int | None = 20
    mlm_probability: float = 0.15


class RetrainTrainer(TrainLoop):
    """Distils ``teacher`` into ``model`` (``ElmForMaskedLM`` or ``ElmForCausalLM``); the loop
    itself is :class:`elm.train.TrainLoop`.

    Args:
        loop: epochs, batch, optimiser, schedule (``elm.train.SCHEDULES``), checkpoints, seed, device, precision.
        kd: the distillation's settings (:class:`RetrainSettings`).
        teacher_head: a fitted MLM head for a head-less teacher (``teacher_head.py``) or None.
        point_target: ``(Basis, variance)`` for the point-wise term (``elm.retrain.init``); needed
            when ``kd.weights["point"] > 0``.
        compile: run the forward pass through ``torch.compile`` (the model is compiled once; the
            architecture is fixed here, unlike in the search).
        teacher_cache: an ``elm.teacher.TeacherCache`` shared with other retrainings on the same
            batches (``elm.compare``); used on CPU only, where the teacher's forward is a quarter of
            the step (on a GPU it is cheap and its memory is better left to the batch).
    """

    stage, state_file = "retrain", STATE_FILE

    def __init__(self, model, teacher, train, validation, loop: LoopConfig, kd: RetrainSettings, *,
                 teacher_head=None, point_target=None, logger=None, compile: bool = False,
                 teacher_cache=None) -> None:  # fmt: skip
        if kd.temperature <= 0:
            raise ValueError(f"distill.temperature={kd.temperature} must be > 0")
        num_layers = model.config.num_hidden_layers
        if len(kd.layer_map) != num_layers + 1 or not all(0 <= t <= teacher.num_layers for t in kd.layer_map):
            raise ValueError(f"layer_map={list(kd.layer_map)} must list {num_layers + 1} teacher "
                             f"hidden-state indices in [0, {teacher.num_layers}]")  # fmt: skip
        self.plan_steps(loop, len(train))  # a bad plan is one line, before anything is built
        self.model, self.teacher, self.teacher_head = model, teacher, teacher_head
        self.train_data, self.val_data = train, validation
        self.layer_map, self.temperature = list(kd.layer_map), kd.temperature
        self.weights = {"lm": 1.0, "hidden": 1.0, "point": 0.0, "kd": 1.0, **kd.weights}
        self.hidden = hidden_loss(kd.loss)  # distill.loss: the search's by default (elm.distill.losses)
        if self.hidden.main is None:  # mse: the point-wise term is the hidden-state loss
            if self.weights["point"] <= 0:
                raise ValueError(f"distill.loss={kd.loss} distils through the point-wise term alone: set distill.point > 0")
            self.weights["hidden"] = 0.0
        if self.weights["point"] > 0 and point_target is None:
            raise ValueError("distill.point > 0 needs a point_target (the shared basis and variances)")
        self.basis = self.variance = None
        if point_target is not None:
            basis, variance = point_target
            if tuple(basis.proj.shape) != (teacher.hidden_size, model.config.hidden_size):
                raise ValueError(f"the point-wise basis maps {tuple(basis.proj.shape)}, the student needs "
                                 f"{(teacher.hidden_size, model.config.hidden_size)}")  # fmt: skip
            self.basis, self.variance = basis.to(loop.device), variance.to(loop.device)
        self.causal = bool(model.config.causal)
        self.mlm_probability, self.eval_batches = kd.mlm_probability, kd.eval_batches
        self.has_logits = teacher_head is not None or teacher.has_lm_head
        # bf16 on a CPU with native bf16: compute on a bf16 replica, fp32 master weights (elm.utils.master)
        super().__init__(model, len(train), loop, logger=logger, master_ok=not compile)
        if self.world > 1:
            torch.manual_seed(self.seed * 1000 + self.rank)  # ranks draw different dropout masks
        # what the loop calls; torch.compile goes outside DDP (its DDPOptimizer splits graphs at buckets)
        self.forward_model = torch.compile(self.ddp) if compile else self.ddp
        if self.master is not None:
            self.forward_model, self.teacher = self.master.compute, bf16_teacher(self.teacher)
            self.teacher_head = teacher_head.bound_to(self.teacher) if teacher_head is not None else None
        self.plan = {"epochs": loop.epochs, "steps_per_epoch": self.steps_per_epoch, "batch_size": loop.batch_size,
                     "lr": loop.lr, "schedule": loop.schedule, "warmup_steps": self.warmup_steps}  # fmt: skip
        self.meta: dict[str, Any] = {}  # facts of the run saved with the state (e.g. how it was initialised)
        self.teacher_cache = teacher_cache if self.device.type == "cpu" else None

    # ---- data ------------------------------------------------------------------------------
    def collator(self, seed: int):
        tok = self.teacher.tokenizer
        return CLMCollator(tok) if self.causal else MLMCollator(tok, self.mlm_probability, seed=seed)

    def batches(self, epoch: int, first: int):
        """Per step of a (seed, epoch)-seeded shuffle and masking, from step ``first`` on: this rank's
        micro-batches of the global batch (micro-step i, rank r: the rows ``(i * world + r) *
        micro_batch`` onwards), its tokens and its unit counts (:meth:`units`). Earlier steps are
        drawn and dropped, so a resumed epoch sees the same batches and masks."""
        seed = self.seed * 1000 + epoch
        loader = make_loader(self.train_data, self.collator(seed), self.batch_size, shuffle=True,
                             seed=seed, drop_last=True)  # fmt: skip
        for step, batch in enumerate(loader):
            if step == self.steps_per_epoch:
                break
            if step < first:
                continue
            starts = [(i * self.world + self.rank) * self.micro_batch for i in range(self.grad_accum)]
            micro = [{k: v[a : a + self.micro_batch].to(self.device) for k, v in batch.items()} for a in starts]
            yield micro, int(batch["attention_mask"].sum()), self.units(batch)

    def val_batches(self):
        """This rank's share (round-robin) of the first ``eval_batches`` validation batches."""
        loader = make_loader(self.val_data, self.collator(VAL_MASK_SEED), self.batch_size)
        for i, batch in enumerate(loader):
            if self.eval_batches is not None and i == self.eval_batches:
                break
            if i % self.world == self.rank:
                yield {k: v.to(self.device) for k, v in batch.items()}

    def units(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        """What each loss term of :meth:`losses` is a mean over, counted in ``batch``."""
        labels, mask = batch["labels"], batch["attention_mask"]
        lm = int((labels[:, 1:] if self.causal else labels).ne(-100).sum())
        return {"lm": lm, "hidden": int(self.hidden.count(mask)), "point": int(mask.sum()),
                "kd": int(mask.sum()) if self.causal else lm}

    @property
    def term_names(self) -> list[str]:
        """The terms :meth:`losses` computes (besides ``total``)."""
        w = self.weights
        return ["lm"] + ["hidden"] * (w["hidden"] > 0) + ["point"] * (w["point"] > 0) + \
            ["kd"] * (w["kd"] > 0 and self.has_logits)  # fmt: skip

    def zero_loss(self) -> torch.Tensor:
        """0 that touches every parameter: on a micro-batch where a term has no unit (e.g. no masked
        token: the LM head is unused) every parameter still gets a gradient, as DDP expects."""
        return sum(p.sum() for p in self.model.parameters() if p.requires_grad) * 0.0

    # ---- losses ----------------------------------------------------------------------------
    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The weighted terms of the retraining loss for one batch (``total`` included), each a
        mean over the batch's :meth:`units`."""
        w, mask = self.weights, batch["attention_mask"]
        need_teacher = w["hidden"] > 0 or w["point"] > 0 or (w["kd"] > 0 and self.has_logits)
        with self.prec.autocast():
            out = self.forward_model(input_ids=batch["input_ids"], attention_mask=mask, labels=batch["labels"],
                                     output_hidden_states=need_teacher)  # fmt: skip
            t = self.teacher_outputs(batch) if need_teacher else None
        terms = {"lm": out.loss.float()}
        targets = [self.in_basis(t.hidden_states[m].float()) for m in self.layer_map[1:]] if need_teacher else []
        if w["hidden"] > 0:
            h = self.hidden
            per_layer = [h.main(out.hidden_states[li + 1].float(), h.prepare(target, mask), mask)
                         for li, target in enumerate(targets)]  # fmt: skip
            terms["hidden"] = torch.stack(per_layer).mean()
        if w["point"] > 0:
            per_layer = [normalised_mse(out.hidden_states[li + 1].float(), target, self.variance[li + 1], mask)
                         for li, target in enumerate(targets)]  # fmt: skip
            terms["point"] = torch.stack(per_layer).mean()
        if w["kd"] > 0 and self.has_logits:
            terms["kd"] = self.temperature**2 * self.logit_kd(out.logits.float(), t, batch)
        terms["total"] = sum(w[k] * v for k, v in terms.items())
        return terms

    def teacher_outputs(self, batch: dict[str, torch.Tensor]):
        """The teacher's outputs for ``batch``, through ``teacher_cache`` when there is one (the
        states the losses read: ``layer_map[1:]`` and the last, which the fitted head reads)."""
        if self.teacher_cache is None:
            return self.teacher(batch["input_ids"], batch["attention_mask"])
        states = sorted({*self.layer_map[1:], self.teacher.num_layers})
        return self.teacher_cache.outputs(self.teacher, batch["input_ids"], batch["attention_mask"], states)

    def in_basis(self, h: torch.Tensor) -> torch.Tensor:
        """A teacher state in the shared basis (as it is without one)."""
        return h if self.basis is None else self.basis.to_student(h)

    def logit_kd(self, student_logits, t, batch) -> torch.Tensor:
        """Forward KL at the masked positions (MLM: the student's logits are [num_masked, V]) or tokens (CLM)."""
        vocab = student_logits.shape[-1]
        if self.causal:
            return forward_kl(student_logits, t.logits[..., :vocab].float(), batch["attention_mask"],
                              self.temperature)
        selected = batch["labels"] != -100
        if student_logits.dim() == 3:  # config.mlm_masked_only=False: [B, T, V]
            student_logits = student_logits[selected]
        if self.teacher_head is not None:
            teacher_logits = self.teacher_head(t.hidden_states[-1][selected]).float()
        else:
            teacher_logits = t.logits[selected].float()
        return forward_kl(student_logits[None], teacher_logits[None, :, :vocab], None, self.temperature)

    # ---- one step (elm.train.TrainLoop hooks) ----------------------------------------------
    def train_step(self, micro: list[dict[str, torch.Tensor]], units: dict[str, int]) -> dict[str, float]:
        """One optimiser step on a global batch: this rank's micro-batches, each term weighted by its
        share of the global batch's units; returns the global batch's terms."""
        keys = [k for k in self.term_names if units[k] > 0]

        def forward(i, batch):  # noqa: ARG001
            terms, counts = self.losses(batch), self.units(batch)
            shares = [terms[k] * (counts[k] / units[k]) if counts[k] else None for k in keys]
            present = [self.weights[k] * v for k, v in zip(keys, shares) if v is not None]
            loss = sum(present) if len(present) == len(keys) else sum(present, self.zero_loss())
            parts = torch.stack([v.detach() if v is not None else torch.zeros((), device=self.device) for v in shares])
            return self.world * loss, parts  # x world undoes DDP's gradient averaging

        parts = reduce_sum(sum(self.accumulate(micro, forward)))
        values = dict(zip(keys, parts.tolist()))
        values["total"] = sum(self.weights[k] * v for k, v in values.items())
        if not all(math.isfinite(v) for v in values.values()):
            raise self.nonfinite([k for k, v in values.items() if not math.isfinite(v)], advice="lower retrain.lr; ")
        self.optimizer_step()
        return values

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Student LM loss on the validation split (fixed masks) and its perplexity exp(loss)."""
        model = self.model if self.master is None else self.master.compute
        model.eval()
        sums = torch.zeros(2, dtype=torch.float64)  # sum of token losses, tokens
        for full in self.val_batches():
            for a in range(0, len(full["input_ids"]), self.micro_batch):  # training's memory footprint
                batch = {k: v[a : a + self.micro_batch] for k, v in full.items()}
                n = self.units(batch)["lm"]
                if n == 0:
                    continue
                with self.prec.autocast():
                    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                labels=batch["labels"])  # fmt: skip
                sums += torch.tensor([float(out.loss) * n, n], dtype=torch.float64)
        model.train()
        total, count = reduce_sum(sums.to(self.device)).tolist()
        loss = total / max(count, 1)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": int(count)}

    def epoch_record(self, train: dict[str, float]) -> dict[str, Any]:
        return {"epoch": self.epoch + 1, "step": self.step, "train_loss": train, **self.validate()}

    # ---- state -----------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "train_time_s": self.train_time_s, "plan": self.plan,
                "arch": self.model.config.arch_dict(), "layer_map": self.layer_map, "meta": self.meta}  # fmt: skip

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if state["arch"] != self.model.config.arch_dict():
            raise ValueError("retrain_state.pt was written for another architecture; use a new run dir")
        if state["plan"] != self.plan:
            diff = {k: (state["plan"].get(k), v) for k, v in self.plan.items() if state["plan"].get(k) != v}
            raise ValueError(f"retrain_state.pt was written with other settings {diff} (saved, now); "
                             f"resume with the same retrain.* settings or use a new run dir")  # fmt: skip
        self.model.load_state_dict(state["model"])
        self.layer_map = state["layer_map"]
        self.meta = state.get("meta", {})
