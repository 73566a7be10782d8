"""The ELM search, read top to bottom like the paper's procedure.

    inherit every candidate and the embeddings from the teacher, in one shared basis  [project decision]
    for epoch in 1..E:
        train every candidate block side by side (block-wise distillation from the teacher;
            with probability chain_prob a layer reads a previous-layer candidate instead)
        if not the last epoch:
            PCA scores on a held-out batch -> grow the best FFNs by one unit       [paper]
            CKA between heads              -> prune redundant heads             [project decision]
        log losses (with paired intervals), PCA scores, widths, heads, CKA levels, diversity
    score every candidate on validation batches -> exact budgeted choice (DP)   [project decision]

The math lives in ``pca.py``, ``cka.py``, ``selection.py`` and ``elm.distill.losses``; this file only
orders the steps, keeps the state resumable and writes the run's outputs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.collate import sample_batches
from ..distill.losses import hidden_loss, normalised_mse
from ..space import SpaceConfig
from ..supernet import Supernet
from ..supernet.inherit import inherit_supernet
from ..supernet.teacher_weights import InheritError
from ..train import LoopConfig, TrainLoop
from ..utils.fingerprint import check_fingerprint
from ..utils.io import SEARCH_STATE_FILE
from ..utils.logging import RunLogger
from ..utils.master import bf16_teacher
from ..utils.runtime import broadcast_object
from ..utils.settings import check_choice
from .analysis import CKAConfig, PCAConfig, analyse, grow_widths, max_pair_level, prune_heads
from .score import paired_intervals
from .settings import EVAL_WHEN

STATE_FILE = SEARCH_STATE_FILE
HELD_OUT_CACHE_BYTES = 1 << 30  # teacher states of fixed held-out batches kept in memory (SearchTrainer.held_out)
EMBEDDINGS = "embeddings"  # the loss entry of the (shared) student embeddings
log = logging.getLogger("elm.search")


class BlockwiseDistiller(nn.Module):
    """The supernet and its block losses: ``forward`` returns every candidate's loss (and the
    embeddings' last, when they train) as one vector, so the whole search step is a single module
    that ``DistributedDataParallel`` wraps.

    Block loss [project decision]: the relational term (``rkd``, against the teacher's state in the
    shared basis: the relations a student in those coordinates can match) plus ``point`` x the normalised MSE against the same state in the shared basis
    (``elm.distill.losses.normalised_mse``): relations alone are blind to rotation and scale, and
    the point-wise term is what makes the chosen blocks chain. ``point=0`` is the RKD-only ablation
    (the paper's Fig. 3b); ``mse`` is the point-wise term alone; ``kl`` a feature-softmax KL in the
    basis (+ ``point``).

    Every parameter exists at its maximum size from the start (elastic growth only changes
    slices), so DDP's buckets and the optimiser never meet a new parameter; inactive slices
    simply receive zero gradients.
    """

    def __init__(self, supernet: Supernet, loss: str, point: float, train_embeddings: bool,
                 common_dropout: bool = True) -> None:  # fmt: skip
        super().__init__()
        self.supernet, self.loss, self.point, self.train_embeddings = supernet, loss, point, train_embeddings
        self.common_dropout = common_dropout
        self.hidden = hidden_loss(loss)
        self.keys = [key for *_, key, _ in supernet.candidates()] + [EMBEDDINGS] * train_embeddings

    def targets(self, hidden, boundary: int, mask: torch.Tensor) -> dict[str, Any]:
        """What a state at layer boundary ``boundary`` (0 = embeddings) is compared with, computed once
        per boundary and shared by the boundary's candidates."""
        net = self.supernet
        target = hidden[net.layer_map[boundary]]
        out = {"basis": net.to_student(target), "variance": net.target_variance[boundary]}
        out["prepared"] = self.hidden.prepare(out["basis"], mask)  # e.g. rkd: the relations a student there can match
        return out

    def block_loss(self, out: torch.Tensor, target: dict[str, Any], mask: torch.Tensor) -> torch.Tensor:
        """Loss of a student state against :meth:`targets`."""
        nmse = normalised_mse(out, target["basis"], target["variance"], mask)
        if self.hidden.main is None:  # mse: the point-wise term alone
            return nmse
        main = self.hidden.main(out, target["prepared"], mask)
        return main + self.point * nmse if self.point else main

    def forward(self, hidden: tuple[torch.Tensor, ...], mask: torch.Tensor, input_ids=None, chain=None) -> torch.Tensor:
        dtype = next(self.supernet.layers.parameters()).dtype  # bf16 in a Bf16Master replica
        inputs = hidden if hidden[0].dtype == dtype else tuple(h.to(dtype) for h in hidden)
        # targets stay in the teachers' fp32
        outputs = self.supernet.blockwise(inputs, mask, chain=chain, common_dropout=self.common_dropout)
        losses = []
        for li, outs in enumerate(outputs):
            target = self.targets(hidden, li + 1, mask)
            losses += [self.block_loss(out, target, mask) for out in outs]  # (fp32 after the RKD Gram matmul)
        if self.train_embeddings:
            emb = self.supernet.embeddings(input_ids)
            losses.append(self.block_loss(emb, self.targets(hidden, 0, mask), mask))
        return torch.stack(losses)


@dataclass
class SearchSettings:
    """What the search trains besides the loop (``distill.*`` and ``search.*`` keys of these names).

    ``loss``: ``rkd`` (default, relational) | ``mse`` | ``kl``; ``point`` weighs the point-wise term
    in the shared basis (see :class:`BlockwiseDistiller`). ``chain_prob``: per step and layer > 0,
    the probability that the layer reads a (random) candidate of the previous layer instead of the
    teacher's state (chained training). ``train_embeddings``: distil the student embeddings too
    (towards the teacher's first state). ``inherit``: start candidates and embeddings from the
    teacher (``elm.supernet.inherit``); ``inherit_batches`` corpus batches of the global batch
    size feed its statistics. False (and resumed runs) only install the shared basis.
    ``eval_batches``: validation batches scoring the candidates; ``analysis_batch_size``: the
    held-out sequences of PCA / CKA (disjoint from them). ``eval_when``: ``final`` scores the
    candidates after the last epoch only (the scores the choice reads), ``every_epoch`` after each
    one too, for the curves in ``metrics.jsonl``. [project decision, issue #15] ``final`` is the
    default: validation is in eval mode on cached teacher states and draws no random numbers, so
    the training, the final scores and the choice are the same either way, and the default search
    is ~7% shorter (5 of its 6 validations, ~14 s of ~200 s on 2 cores). ``common_dropout``: a
    layer's candidates share their dropout masks in each step (``elm.supernet.CommonDropout``:
    each candidate's own masks are unchanged in distribution; the default: the bf16 CPU step
    took 649 ms instead of 727).
    """

    loss: str = "rkd"
    point: float = 1.0
    chain_prob: float = 0.0
    train_embeddings: bool = True
    inherit: bool = True
    inherit_batches: int = 4
    eval_batches: int = 8
    analysis_batch_size: int = 16
    eval_when: str = "final"
    common_dropout: bool = True

    def validate(self) -> SearchSettings:
        hidden_loss(self.loss)  # an unknown name is one line, before anything is built
        check_choice("search.eval_when", self.eval_when, EVAL_WHEN)
        if isinstance(self.point, bool) or not isinstance(self.point, int | float) or self.point < 0:
            raise ValueError(f"distill.point={self.point!r} must be a number >= 0")
        c = self.chain_prob
        if isinstance(c, bool) or not isinstance(c, int | float) or not 0 <= c <= 1:
            raise ValueError(f"search.chain_prob={c!r} must be a probability in [0, 1]")
        return self


class SearchTrainer(TrainLoop):
    """Trains the supernet block-wise and takes the growth/pruning decisions after each epoch
    (the loop itself: :class:`elm.train.TrainLoop`).

    Args:
        teacher: an ``elm.teacher.Teacher`` (frozen).
        space: the supernet's search space (``hidden_size`` resolved).
        train, validation: datasets of packed ``input_ids`` / ``attention_mask`` rows.
        loop: epochs, batch, optimiser, schedule (``ramped_cosine``), checkpoints, seed, device, precision.
        search: what is trained and scored (:class:`SearchSettings`); ``pca`` / ``cka``: growth and pruning.
        settings: the run's settings fingerprint (``elm.utils.fingerprint``), kept in the state for
            resume to compare.
    """

    stage, state_file = "search", STATE_FILE

    def __init__(self, teacher, space: SpaceConfig, train, validation, loop: LoopConfig | None = None,
                 search: SearchSettings | None = None, *, pca: PCAConfig | None = None,
                 cka: CKAConfig | None = None, logger: RunLogger | None = None,
                 settings: dict[str, Any] | None = None) -> None:  # fmt: skip
        loop = loop or self.default_loop()
        search = (search or SearchSettings()).validate()
        self.plan_steps(loop, len(train))  # a bad plan is one line, before the supernet is built
        if space.causal != teacher.causal:
            raise ValueError(f"space.causal={space.causal} but teacher {teacher.name!r} is "
                             f"{'causal' if teacher.causal else 'bidirectional'}; "
                             f"set space.causal={teacher.causal}")
        self.teacher, self.loss, self.point, self.chain_prob = teacher, search.loss, float(search.point), search.chain_prob
        self.settings = settings
        self.pca = (pca or PCAConfig()).validate(space)
        self.cka = (cka or CKAConfig()).validate(space)
        self.train_data, self.val_data = train, validation
        eb, ab = search.eval_batches, search.analysis_batch_size
        if eb < 1 or eb * loop.batch_size + ab > len(validation):
            raise ValueError(f"search.eval_batches={eb} x search.batch_size={loop.batch_size} plus "
                             f"search.analysis_batch_size={ab} disjoint validation sequences "
                             f"need {eb * loop.batch_size + ab}, the split has {len(validation)}; "
                             f"lower them or raise data.val_fraction")  # fmt: skip
        self.eval_batches, self.analysis_batch_size, self.eval_when = eb, ab, search.eval_when
        self.seed, self.batch_size = loop.seed, loop.batch_size
        self.device, self.run_dir = torch.device(loop.device), Path(loop.run_dir)
        self.supernet = Supernet.for_teacher(space, teacher).to(self.device)
        self.inherit_report = self.initialise(search.inherit, search.inherit_batches)
        self.supernet.embeddings.requires_grad_(search.train_embeddings)
        self.distiller = BlockwiseDistiller(self.supernet, search.loss, self.point, search.train_embeddings,
                                            search.common_dropout)  # fmt: skip
        # bf16 on a CPU with native bf16: train steps on a bf16 replica, fp32 master weights
        # (elm.utils.master); validation scores, PCA/CKA and the choice stay fp32
        super().__init__(self.distiller, len(train), loop, logger=logger)
        self.teacher_low = bf16_teacher(teacher) if self.master is not None else None
        # computed once per run: teacher states of the fixed held-out batches and the untrained
        # twins' statistics on the analysis batch (elm.search.analysis.analyse)
        self.held_out_cache: dict[str, tuple] = {}
        self.twin_stats: dict[tuple, tuple[float, float]] = {}

    @staticmethod
    def default_loop(**settings: Any) -> LoopConfig:
        """The search's loop defaults (6 epochs, the ramped cosine schedule) with ``settings`` changed."""
        return LoopConfig(**{"epochs": 6, "warmup_steps": 20, "schedule": "ramped_cosine", **settings})

    def initialise(self, inherit: bool, batches: int) -> dict[str, Any]:
        """Inherit from the teacher (or only fit the shared basis) on ``batches`` seeded training batches.

        A teacher whose weights cannot be inherited (not a BERT-family encoder) falls back to the
        random init with one log line; the basis is still fitted."""
        rows = sample_batches(self.train_data, self.seed, batches, self.batch_size, self.device)
        if inherit:
            try:
                return {"inherited": True, **inherit_supernet(self.supernet, self.teacher, rows)}
            except InheritError as err:
                log.warning("%s; the supernet starts from random init", err)
        return {"inherited": False, **inherit_supernet(self.supernet, self.teacher, rows, weights=False)}

    # ---- data ------------------------------------------------------------------------------
    def _rows(self, data, index) -> dict[str, torch.Tensor]:
        rows = data[index]
        return {k: torch.as_tensor(rows[k], device=self.device) for k in ("input_ids", "attention_mask")}

    def batches(self, epoch: int, first: int):
        """Per step from ``first`` on: this rank's micro-batches of the global batch, in a seeded epoch
        order (it depends only on seed and epoch, so a resumed epoch skips what it has seen), and the
        global batch's tokens (this rank's x world)."""
        g = torch.Generator().manual_seed(self.seed * 1000 + epoch)
        order = torch.randperm(len(self.train_data), generator=g).tolist()
        for step in range(first, self.steps_per_epoch):
            starts = [step * self.batch_size + (i * self.world + self.rank) * self.micro_batch for i in range(self.grad_accum)]
            micro = [self._rows(self.train_data, order[a : a + self.micro_batch]) for a in starts]
            yield micro, sum(int(b["attention_mask"].sum()) for b in micro) * self.world, None

    def val_batches(self):
        """The validation batches that score candidates: the first ``eval_batches x batch_size``
        sequences (the analysis batch is the last ``analysis_batch_size``: disjoint)."""
        for i in range(self.eval_batches):
            yield self._rows(self.val_data, list(range(i * self.batch_size, (i + 1) * self.batch_size)))

    def held_out(self, name: str, batch: dict[str, torch.Tensor]):
        """``(batch, teacher states)`` of a fixed held-out batch (``name``: ``val<i>`` or ``analysis``).
        The teacher is frozen and the rows never change, so the states are computed once per run
        and kept while they fit in ``HELD_OUT_CACHE_BYTES``."""
        if name in self.held_out_cache:
            return self.held_out_cache[name]
        item = (batch, self.teacher_states(batch))
        cached = [*self.held_out_cache.values(), item]
        if sum(t.numel() * t.element_size() for _, states in cached for t in states) <= HELD_OUT_CACHE_BYTES:
            self.held_out_cache[name] = item
        return item

    def scoring_batches(self):
        """``(batch, teacher states)`` of every validation batch (:meth:`val_batches`)."""
        for i, batch in enumerate(self.val_batches()):
            yield self.held_out(f"val{i}", batch)

    def chain_plan(self, step: int) -> list[int | None] | None:
        """Which previous-layer candidate each layer reads at ``step`` (None = the teacher's state);
        seeded by (seed, step), so every rank and a resumed run draw the same plan."""
        if not self.chain_prob:
            return None
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        plan: list[int | None] = [None]
        for li in range(1, len(self.supernet.layers)):
            read = float(torch.rand((), generator=g)) < self.chain_prob
            pick = int(torch.randint(len(self.supernet.layers[li - 1]), (), generator=g))
            plan.append(pick if read else None)
        return plan

    # ---- losses ----------------------------------------------------------------------------
    def teacher_states(self, batch, teacher=None):
        with self.prec.autocast():
            hidden = (teacher or self.teacher)(batch["input_ids"], batch["attention_mask"]).hidden_states
        return tuple(h.float() for h in hidden)

    def candidate_losses(self, batch, module: nn.Module | None = None, chain=None, teacher=None,
                         hidden=None) -> torch.Tensor:  # fmt: skip
        """Block loss of every candidate (order of ``self.distiller.keys``) on one batch (``hidden``:
        its teacher states when already known)."""
        hidden = self.teacher_states(batch, teacher) if hidden is None else hidden
        with self.prec.autocast():
            return (module or self.distiller)(hidden, batch["attention_mask"], batch["input_ids"], chain)

    # ---- one step (elm.train.TrainLoop hooks) ----------------------------------------------
    def start_epoch(self) -> None:
        if self.master is not None:  # init, a loaded state, growth and pruning changed the fp32 supernet
            self.master.rebuild()

    def train_step(self, micro, extra=None) -> dict[str, float]:  # noqa: ARG002
        keys, chain = self.distiller.keys, self.chain_plan(self.step)
        module, teacher = (self.ddp, None) if self.master is None else (self.master.compute, self.teacher_low)

        def forward(i, batch):
            losses = self.candidate_losses(batch, module, chain, teacher)
            if not torch.isfinite(losses).all():  # before the backward: the last good state stays
                raise self.nonfinite([k for k, v in zip(keys, losses.tolist()) if not math.isfinite(v)],
                                     f", micro-batch {i}")  # fmt: skip
            return losses.sum() / len(micro), losses.detach() / len(micro)

        step_losses = sum(self.accumulate(micro, forward))
        self.optimizer_step()
        return dict(zip(keys, step_losses.tolist()))

    def validate(self) -> dict[str, Any]:
        """Per-candidate validation loss (the score the choice minimises) and, per candidate, the
        paired 95% interval of its difference to its layer's best (``elm.search.score``)."""
        self.supernet.eval()
        with torch.no_grad():  # [eval_batches, keys]: block losses (teacher inputs) per validation batch
            per_batch = torch.stack([self.candidate_losses(b, hidden=h) for b, h in self.scoring_batches()])
        self.supernet.train()
        keys, per_batch = self.distiller.keys, per_batch.cpu()
        groups = [[i for i, (li2, *_) in enumerate(self.supernet.candidates()) if li2 == li]
                  for li in range(len(self.supernet.layers))]  # fmt: skip
        intervals = paired_intervals(per_batch[:, : sum(map(len, groups))], groups)
        ci = {keys[i]: {"vs": keys[iv["best"]], "diff": iv["diff"], "low": iv["low"], "high": iv["high"]}
              for i, iv in enumerate(intervals)}  # fmt: skip
        return {"loss": dict(zip(keys, per_batch.mean(0).tolist())), "ci": ci}

    def analysis_batch(self):
        n = len(self.val_data)
        batch, hidden = self.held_out("analysis", self._rows(self.val_data, list(range(n - self.analysis_batch_size, n))))
        return hidden, batch["attention_mask"]

    def end_of_epoch(self, last: bool) -> dict[str, Any]:
        """PCA growth and CKA pruning (not after the last epoch: new units would stay untrained)."""
        hidden, mask = self.analysis_batch()
        # rank 0's statistics decide for everyone, so all ranks keep the same architecture
        result = broadcast_object(analyse(self.supernet, hidden, mask, self.pca, twins=self.twin_stats)
                                  if self.rank == 0 else None)  # fmt: skip
        pruning, growth = [], []
        prune_now = self.cka.enabled and (self.cka.when == "every_epoch" and not last or self.cka.when == "final" and last)
        if prune_now:
            pruning = prune_heads(self.supernet, result, self.cka, self.optimizer)
        if not last and self.pca.top_k > 0:
            g = torch.Generator().manual_seed(self.seed * 1_009 + self.epoch)  # the same fresh units on every rank
            growth = grow_widths(self.supernet, result, self.pca, self.optimizer, generator=g)
        return {"analysis": result, "growth": growth, "pruning": pruning}

    # ---- an epoch's end -------------------------------------------------------------------
    def epoch_record(self, train_loss: dict[str, float]) -> dict[str, Any]:
        last = self.epoch == self.epochs - 1
        widths = {key: c.ffn_dim for *_, key, c in self.supernet.candidates()}  # what PCA scored
        decisions = self.end_of_epoch(last)
        result = decisions["analysis"]
        val = self.validate() if last or self.eval_when == "every_epoch" else {}
        self.last_cka = result.cka
        return {
            "epoch": self.epoch + 1,
            "step": self.step,
            "train_loss": train_loss,
            **({"val_loss": val["loss"], "val_ci": val["ci"]} if val else {}),
            "pca": result.pca,
            "pca_untrained": result.pca_untrained,
            "pca_normalised": result.normalised_pca(),
            "ffn": widths,
            "heads": {key: c.layer_config().num_heads for *_, key, c in self.supernet.candidates()},
            "cka_mean_offdiag": {k: _mean_offdiag(m) for k, m in result.cka.items()},
            "cka_max_pair": {k: max_pair_level(torch.tensor(m)) for k, m in result.cka.items()},
            "cka_untrained": result.cka_untrained,
            "diversity": result.diversity,
            "growth": decisions["growth"],
            "pruning": decisions["pruning"],
        }

    # ---- state -----------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {
            "supernet": self.supernet.state_dict(),  # active heads and FFN widths included (extra states)
            "inherit": self.inherit_report,
            "last_cka": getattr(self, "last_cka", {}),
            "space": asdict(self.supernet.space),
            "layer_map": self.supernet.layer_map,
            "loss": self.loss,
            "point": self.point,
            "train_embeddings": self.distiller.train_embeddings,
            "chain_prob": self.chain_prob,
            "settings": self.settings,
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        saved_space = state.get("space")
        saved_space = asdict(SpaceConfig.from_dict(saved_space)) if isinstance(saved_space, dict) else None
        if saved_space != asdict(self.supernet.space) or state.get("loss") != self.loss:
            raise ValueError("search state was written for another space or loss; start a new run dir")
        now = {"distill.point": self.point, "search.train_embeddings": self.distiller.train_embeddings,
               "search.chain_prob": self.chain_prob}  # fmt: skip
        saved = {k: state.get(k.split(".")[1]) for k in now}  # kept as point, train_embeddings, chain_prob
        check_fingerprint(saved, now, "the search state")  # what the trainer sees; run_search checks all settings
        self.supernet.load_state_dict(self.supernet.with_elastic(state["supernet"], state.get("elastic")))
        self.inherit_report = state.get("inherit", {})
        self.last_cka = state.get("last_cka", {})
        if torch.is_tensor(state.get("epoch_sums")):  # written before the loop kept named sums
            state["epoch_sums"] = dict(zip(self.distiller.keys, state["epoch_sums"].tolist()))


def _mean_offdiag(matrix: list[list[float]]) -> float | None:
    n = len(matrix)
    return sum(matrix[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1)) if n > 1 else None
