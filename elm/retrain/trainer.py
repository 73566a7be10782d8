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
leaves the point-wise term alone (``hidden`` is then 0). The
point-wise term (``elm.distill.losses.normalised_mse``) compares the same states in the shared
teacher -> student basis: the search's (so retraining continues in the coordinates the searched
blocks were trained in), or one fitted on the teacher's states (the identity at the teacher's
width). Logit KD
is the forward KL at the masked positions (MLM) or at every real token (CLM), with Hinton's
T^2 scaling. Both models see the same masked batch.

Reproducibility: each epoch's order and masks come from generators seeded by (seed, epoch); the
global RNG (dropout) is saved in the checkpoint, so a run resumed from the end of epoch k ends
with the same weights as an uninterrupted one.

Data parallel (``torchrun``): ``batch_size`` is the *global* batch. Every rank draws and masks
the same global batch (cheap), keeps its ``batch_size / (world x grad_accum)`` rows per
micro-step and the model is wrapped in ``DistributedDataParallel`` (gradients all-reduced on the
last micro-step only). Each term is a mean over its own units (masked tokens for MLM/KD,
predicted tokens for CLM, sequences for RKD), so a micro-batch's term is weighted by
``its units / the global batch's units`` (x world, undoing DDP's gradient averaging): the
gradient, and the logged loss, are those of the whole global batch, whatever the split — 2 ranks
match 1 rank, and ``grad_accum`` only trades memory for time. Validation batches are shared out
round-robin and their sums all-reduced. Rank 0 writes checkpoints (with every rank's RNG state),
metrics and the export.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

from ..data.collate import CLMCollator, MLMCollator, make_loader
from ..distill.losses import forward_kl, hidden_loss, normalised_mse
from ..utils.io import atomic_torch_save
from ..utils.master import Bf16Master, bf16_teacher
from ..utils.optim import configure_optimizer
from ..utils.precision import resolve_precision
from ..utils.preempt import Preemption, step_checkpoint
from ..utils.runtime import barrier, dist_info, gather_objects, reduce_sum

STATE_FILE = "retrain_state.pt"
SCHEDULES = {"linear": get_linear_schedule_with_warmup, "cosine": get_cosine_schedule_with_warmup}
VAL_MASK_SEED = 1_000_003  # fixed masks for validation: scores comparable across epochs and runs


class RetrainTrainer:
    """Distils ``teacher`` into ``model`` (``ElmForMaskedLM`` or ``ElmForCausalLM``).

    Args:
        layer_map: ``num_layers + 1`` teacher hidden-state indices (``elm.supernet.uniform_layer_map``);
            student layer l is pulled towards teacher state ``layer_map[l + 1]``.
        teacher_head: a fitted MLM head for a head-less teacher (``teacher_head.py``) or None.
        weights: ``{"lm": ..., "hidden": ..., "point": ..., "kd": ...}``; a 0 weight skips that term.
        point_target: ``(Basis, variance)`` for the point-wise term (``elm.retrain.init``); needed
            when ``weights["point"] > 0``.
        steps_per_epoch: None = one pass over the training split (full batches).
        batch_size: the global batch, split over ranks and ``grad_accum`` micro-steps.
        compile: run the forward pass through ``torch.compile`` (the model is compiled once; the
            architecture is fixed here, unlike in the search).
        eval_batches: validation batches per evaluation (None = the whole split).
    """

    def __init__(self, model, teacher, train, validation, *, layer_map: list[int], teacher_head=None,
                 weights: dict[str, float] | None = None, point_target=None, temperature: float = 1.0,
                 loss: str = "rkd", epochs: int = 2,
                 steps_per_epoch: int | None = None, batch_size: int = 16, lr: float = 5e-4,
                 weight_decay: float = 0.01, warmup_steps: int = 30, schedule: str = "linear",
                 grad_clip: float = 1.0, eval_batches: int | None = 20, mlm_probability: float = 0.15,
                 log_every: int = 25, seed: int = 0, device: torch.device | str = "cpu",
                 precision: str = "bf16", run_dir: str | Path = ".", logger=None, progress: bool = True,
                 checkpoint_every: int | None = None, grad_accum: int = 1, compile: bool = False) -> None:  # fmt: skip
        if schedule not in SCHEDULES:
            raise ValueError(f"retrain.schedule={schedule!r} is unknown; valid: {', '.join(SCHEDULES)}")
        if temperature <= 0:
            raise ValueError(f"distill.temperature={temperature} must be > 0")
        num_layers = model.config.num_hidden_layers
        if len(layer_map) != num_layers + 1 or not all(0 <= t <= teacher.num_layers for t in layer_map):
            raise ValueError(f"layer_map={list(layer_map)} must list {num_layers + 1} teacher hidden-state "
                             f"indices in [0, {teacher.num_layers}]")  # fmt: skip
        if epochs < 0 or batch_size < 1:
            raise ValueError(f"retrain.epochs={epochs} must be >= 0 and retrain.batch_size={batch_size} >= 1")
        self.rank, self.world = dist_info()
        if grad_accum < 1 or batch_size % (self.world * grad_accum):
            raise ValueError(f"retrain.batch_size={batch_size} must be divisible by world size x grad_accum "
                             f"({self.world} x {grad_accum})")  # fmt: skip
        self.grad_accum, self.micro_batch = grad_accum, batch_size // (self.world * grad_accum)
        self.model, self.teacher, self.teacher_head = model, teacher, teacher_head
        self.train_data, self.val_data = train, validation
        self.layer_map, self.temperature = list(layer_map), temperature
        self.weights = {"lm": 1.0, "hidden": 1.0, "point": 0.0, "kd": 1.0, **(weights or {})}
        self.hidden = hidden_loss(loss)  # distill.loss: the search's by default (elm.distill.losses)
        if self.hidden.main is None:  # mse: the point-wise term is the hidden-state loss
            if self.weights["point"] <= 0:
                raise ValueError(f"distill.loss={loss} distils through the point-wise term alone: set distill.point > 0")
            self.weights["hidden"] = 0.0
        if self.weights["point"] > 0 and point_target is None:
            raise ValueError("distill.point > 0 needs a point_target (the shared basis and variances)")
        self.basis = self.variance = None
        if point_target is not None:
            basis, variance = point_target
            if tuple(basis.proj.shape) != (teacher.hidden_size, model.config.hidden_size):
                raise ValueError(f"the point-wise basis maps {tuple(basis.proj.shape)}, the student needs "
                                 f"{(teacher.hidden_size, model.config.hidden_size)}")  # fmt: skip
            self.basis, self.variance = basis.to(torch.device(device)), variance.to(torch.device(device))
        self.causal = bool(model.config.causal)
        self.epochs, self.batch_size, self.grad_clip = epochs, batch_size, grad_clip
        self.mlm_probability, self.seed, self.log_every = mlm_probability, seed, log_every
        full = len(train) // batch_size
        if full < 1:
            raise ValueError(
                f"the training split has {len(train)} blocks, fewer than one batch of {batch_size}"
            )
        self.steps_per_epoch = min(full, steps_per_epoch) if steps_per_epoch else full
        self.eval_batches = eval_batches
        self.device = torch.device(device)
        self.run_dir, self.logger, self.progress = Path(run_dir), logger, progress and self.rank == 0
        self.has_logits = teacher_head is not None or teacher.has_lm_head
        self.ddp: nn.Module = model  # DistributedDataParallel(model) under torchrun
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(model, device_ids=ids)
            torch.manual_seed(seed * 1000 + self.rank)  # ranks draw different dropout masks
        # what the loop calls; torch.compile goes outside DDP (its DDPOptimizer splits graphs at buckets)
        self.forward_model = torch.compile(self.ddp) if compile else self.ddp
        # bf16 on a CPU with native bf16: compute on a bf16 replica, fp32 master weights (elm.utils.master)
        self.prec = resolve_precision(precision, self.device, master=self.world == 1 and not compile, stage="retrain")
        self.master = Bf16Master(model) if self.prec.mode == "master" else None
        if self.master is not None:
            self.forward_model, self.teacher = self.master.compute, bf16_teacher(self.teacher)
        self.optimizer = configure_optimizer(model, lr, weight_decay)
        total = epochs * self.steps_per_epoch
        warmup_steps = min(warmup_steps, total)
        self.scheduler = SCHEDULES[schedule](self.optimizer, warmup_steps, max(1, total))
        self.plan = {"epochs": epochs, "steps_per_epoch": self.steps_per_epoch, "batch_size": batch_size,
                     "lr": lr, "schedule": schedule, "warmup_steps": warmup_steps}  # fmt: skip
        self.epoch, self.step, self.train_time_s = 0, 0, 0.0
        # mid-epoch checkpoints every ``checkpoint_every`` steps and on SIGTERM (preemption)
        self.checkpoint_every, self.preemption = checkpoint_every, Preemption()
        self.epoch_sums: dict[str, float] = {}
        self.history: list[dict[str, Any]] = []
        self.meta: dict[str, Any] = {}  # facts of the run saved with the state (e.g. how it was initialised)

    # ---- data ------------------------------------------------------------------------------
    def collator(self, seed: int):
        tok = self.teacher.tokenizer
        return CLMCollator(tok) if self.causal else MLMCollator(tok, self.mlm_probability, seed=seed)

    def train_batches(self, epoch: int):
        """Per step of a (seed, epoch)-seeded shuffle and masking: the global batch's unit counts
        (:meth:`units`) and this rank's micro-batches of it (micro-step i, rank r: the rows
        ``(i * world + r) * micro_batch`` onwards)."""
        seed = self.seed * 1000 + epoch
        loader = make_loader(self.train_data, self.collator(seed), self.batch_size, shuffle=True,
                             seed=seed, drop_last=True)  # fmt: skip
        for step, batch in enumerate(loader):
            if step == self.steps_per_epoch:
                break
            starts = [(i * self.world + self.rank) * self.micro_batch for i in range(self.grad_accum)]
            micro = [
                {k: v[a : a + self.micro_batch].to(self.device) for k, v in batch.items()} for a in starts
            ]
            yield self.units(batch), micro, int(batch["attention_mask"].sum())

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
        return {
            "lm": lm,
            "hidden": int(self.hidden.count(mask)),
            "point": int(mask.sum()),
            "kd": int(mask.sum()) if self.causal else lm,
        }

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
            t = self.teacher(batch["input_ids"], mask) if need_teacher else None
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

    def in_basis(self, h: torch.Tensor) -> torch.Tensor:
        """A teacher state in the shared basis (as it is without one)."""
        return h if self.basis is None else self.basis.to_student(h)

    def logit_kd(self, student_logits, t, batch) -> torch.Tensor:
        """Forward KL at the masked positions (MLM: the student's logits are [num_masked, V]) or tokens (CLM)."""
        vocab = student_logits.shape[-1]
        if self.causal:
            return forward_kl(
                student_logits, t.logits[..., :vocab].float(), batch["attention_mask"], self.temperature
            )
        selected = batch["labels"] != -100
        if student_logits.dim() == 3:  # config.mlm_masked_only=False: [B, T, V]
            student_logits = student_logits[selected]
        if self.teacher_head is not None:
            teacher_logits = self.teacher_head(t.hidden_states[-1][selected].float())
        else:
            teacher_logits = t.logits[selected].float()
        return forward_kl(student_logits[None], teacher_logits[None, :, :vocab], None, self.temperature)

    # ---- loop ------------------------------------------------------------------------------
    def train_step(
        self, units: dict[str, int], micro: list[dict[str, torch.Tensor]]
    ) -> tuple[dict[str, float], bool]:
        """One optimiser step on a global batch: this rank's micro-batches, each term weighted by its
        share of the global batch's units; returns the global batch's terms and the all-rank stop flag."""
        self.optimizer.zero_grad(set_to_none=True)
        keys = [k for k in self.term_names if units[k] > 0]
        parts = torch.zeros(len(keys) + 1, device=self.device)  # + the SIGTERM flag, reduced together
        for j, batch in enumerate(micro):
            sync = self.world == 1 or j == len(micro) - 1  # DDP all-reduces on the last micro-step only
            with contextlib.nullcontext() if sync else self.ddp.no_sync():  # forward and backward inside
                terms, counts = self.losses(batch), self.units(batch)
                shares = [terms[k] * (counts[k] / units[k]) if counts[k] else None for k in keys]
                present = [self.weights[k] * v for k, v in zip(keys, shares) if v is not None]
                loss = sum(present) if len(present) == len(keys) else sum(present, self.zero_loss())
                (self.world * loss).backward()
                if self.master is not None:
                    self.master.gradients_to_master()
            for i, v in enumerate(shares):
                parts[i] += v.detach() if v is not None else 0.0
        parts[-1] = float(self.preemption.requested)
        parts = reduce_sum(parts)
        values = dict(zip(keys, parts[:-1].tolist()))
        values["total"] = sum(self.weights[k] * v for k, v in values.items())
        if not all(math.isfinite(v) for v in values.values()):
            bad = sorted(k for k, v in values.items() if not math.isfinite(v))
            raise FloatingPointError(f"non-finite retrain loss at step {self.step} (epoch {self.epoch + 1}) in "
                                     f"{bad}; lower retrain.lr (the last good checkpoint is kept in "
                                     f"{self.run_dir / STATE_FILE})")  # fmt: skip
        nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        if self.master is not None:
            self.master.refresh()
        self.scheduler.step()
        self.step += 1
        return values, bool(parts[-1] > 0)

    def train_epoch(self) -> dict[str, float]:
        (self.model if self.master is None else self.master.compute).train()
        first = self.step - self.epoch * self.steps_per_epoch  # > 0 when resuming mid-epoch
        sums: dict[str, float] = dict(self.epoch_sums)
        tokens, start = 0, time.perf_counter()
        bar = tqdm(self.train_batches(self.epoch), total=self.steps_per_epoch, initial=first, disable=not self.progress,
                   desc=f"retrain epoch {self.epoch + 1}/{self.epochs}", leave=False)  # fmt: skip
        for i, (units, micro, batch_tokens) in enumerate(bar):
            if i < first:  # seen before the checkpoint: order and masks are seeded per epoch
                continue
            values, stop = self.train_step(units, micro)
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            tokens += batch_tokens
            if self.logger is not None and self.log_every and self.step % self.log_every == 0:
                self.logger.log(
                    {"step": self.step, "train": values, "lr": self.scheduler.get_last_lr()[0]},
                    step=self.step,
                )
            bar.set_postfix(
                loss=f"{values['total']:.3f}", tok_s=f"{tokens / (time.perf_counter() - start):.0f}"
            )
            self.epoch_sums = dict(sums)
            step_checkpoint(self.step, self.checkpoint_every, self.preemption, self.save, self.run_dir / STATE_FILE,
                            stop=stop)  # fmt: skip
        self.last_tokens_per_s = tokens / max(time.perf_counter() - start, 1e-9)
        self.epoch_sums = {}
        return {k: v / self.steps_per_epoch for k, v in sums.items()}

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

    def fit(self) -> list[dict[str, Any]]:
        with self.preemption:
            return self._fit()

    def _fit(self) -> list[dict[str, Any]]:
        while self.epoch < self.epochs:
            t0 = time.perf_counter()
            train = self.train_epoch()
            record = {"epoch": self.epoch + 1, "step": self.step, "train_loss": train, **self.validate(),
                      "tokens_per_s": self.last_tokens_per_s, "epoch_time_s": time.perf_counter() - t0}  # fmt: skip
            self.train_time_s += record["epoch_time_s"]
            self.history.append(record)
            self.epoch += 1
            if self.logger is not None:
                self.logger.log(record, step=self.step)
            self.save()
        return self.history

    # ---- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        cuda = self.device.type == "cuda"
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "history": self.history,
            "train_time_s": self.train_time_s,
            "plan": self.plan,
            "arch": self.model.config.arch_dict(),
            "layer_map": self.layer_map,
            "meta": self.meta,
            "rng": gather_objects(torch.get_rng_state()),  # one per rank (dropout streams differ)
            "cuda_rng": gather_objects(torch.cuda.get_rng_state(self.device)) if cuda else None,
            "epoch_sums": self.epoch_sums,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["arch"] != self.model.config.arch_dict():
            raise ValueError("retrain_state.pt was written for another architecture; use a new run dir")
        if state["plan"] != self.plan:
            diff = {k: (state["plan"].get(k), v) for k, v in self.plan.items() if state["plan"].get(k) != v}
            raise ValueError(f"retrain_state.pt was written with other settings {diff} (saved, now); "
                             f"resume with the same retrain.* settings or use a new run dir")  # fmt: skip
        self.model.load_state_dict(state["model"])
        if self.master is not None:
            self.master.refresh()
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step, self.history = state["epoch"], state["step"], state["history"]
        self.train_time_s, self.layer_map = state["train_time_s"], state["layer_map"]
        self.meta = state.get("meta", {})
        self.epoch_sums = state.get("epoch_sums", {})
        rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
        if self.rank < len(rngs):
            # RNG states must be CPU tensors (map_location moved them to the device)
            torch.set_rng_state(rngs[self.rank].cpu())
            if state.get("cuda_rng") is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(state["cuda_rng"][self.rank].cpu(), self.device)
        else:  # resumed on more ranks than were saved: a fresh, still per-rank, dropout stream
            torch.manual_seed(self.seed * 1000 + self.rank + self.step)

    def save(self) -> Path:
        """Called on every rank (the RNG states are gathered); rank 0 writes the file."""
        state, path = self.state_dict(), self.run_dir / STATE_FILE
        if self.rank == 0:
            atomic_torch_save(state, path)
        barrier()  # no rank exits (SIGTERM) before the file is complete
        return path
