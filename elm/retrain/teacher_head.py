"""An MLM head for a head-less encoder teacher, fitted on the corpus with the encoder frozen.

The default teacher (all-MiniLM-L6-v2, a sentence encoder) ships without its MLM head, so it has
no logits to distil; ``teacher_head.fit=true`` first fits a ``BertOnlyMLMHead``-style head
(:class:`TeacherMLMHead`) for ``steps`` masked-LM steps on the training split.

[project decision] The decoder is the teacher's own (frozen) word-embedding matrix, as in BERT,
so only ``H*E + 2E + V`` parameters are fitted; a few hundred steps suffice for a usable head.
The fitted head is cached (``teacher_mlm_head.pt`` in the run dir, or ``teacher_head.path`` to
share one between runs) with the facts it depends on; a cache whose facts differ is refitted.
Fitting runs under a forked RNG, so a run that reuses the cache trains exactly like one that fits.
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data.collate import MLMCollator, make_loader
from ..train import clip_and_step
from ..utils.io import atomic_torch_save, load_checkpoint
from ..utils.runtime import autocast, broadcast_object, dist_info

HEAD_FILE = "teacher_mlm_head.pt"
log = logging.getLogger("elm.retrain")


class TeacherMLMHead(nn.Module):
    """dense H -> E, GELU, LayerNorm, then logits against the (frozen, passed-in) word embeddings."""

    def __init__(self, hidden_size: int, embedding_size: int, vocab_size: int, eps: float = 1e-12) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, embedding_size)
        self.norm = nn.LayerNorm(embedding_size, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(F.gelu(self.dense(hidden))), word_embeddings, self.bias)


def new_head(teacher) -> TeacherMLMHead:
    """An unfitted head sized for ``teacher`` (hidden -> its embedding width -> its vocabulary), on CPU."""
    embed = teacher.model.get_input_embeddings().weight
    return TeacherMLMHead(teacher.hidden_size, embed.shape[1], embed.shape[0])


class FittedTeacherHead:
    """A fitted head bound to its teacher: ``head_logits(last_hidden_state)`` -> vocabulary logits."""

    def __init__(self, head: TeacherMLMHead, teacher, meta: dict[str, Any]) -> None:
        self.head, self.teacher, self.meta = head.eval().requires_grad_(False), teacher, meta

    @torch.no_grad()
    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in the head's dtype (``hidden`` is cast to it)."""
        embed = self.teacher.model.get_input_embeddings().weight
        return self.head(hidden.to(embed.dtype), embed)

    def bound_to(self, teacher) -> FittedTeacherHead:
        """This head for a copy of its teacher in another dtype (the bf16 replica's teacher), in that
        dtype. [issue #15] In bf16 the ``[masked tokens, vocab]`` logits of the default retraining
        step took 33 ms instead of 73 on 2 cores (the step: 677 ms); the teacher's distribution moved
        by a KL of 8e-5 nats per token (its entropy: 7.0), far below the student's distance to it."""
        dtype = teacher.model.get_input_embeddings().weight.dtype
        return FittedTeacherHead(copy.deepcopy(self.head).to(dtype), teacher, self.meta)


def fit_head(teacher, train, *, steps: int, lr: float, batch_size: int, mlm_probability: float, seed: int,
             precision: str = "bf16", progress: bool = False) -> tuple[TeacherMLMHead, list[float]]:
    """Fit a fresh head for ``steps`` masked-LM steps on ``train`` (the teacher stays frozen)."""
    embed = teacher.model.get_input_embeddings().weight
    head = new_head(teacher).to(teacher.device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
    )
    collator = MLMCollator(teacher.tokenizer, mlm_probability, seed=seed)
    losses: list[float] = []
    bar = tqdm(total=steps, desc="teacher MLM head", disable=not progress, leave=False)
    epoch = 0
    while len(losses) < steps:
        loader = make_loader(train, collator, batch_size, shuffle=True, seed=seed + epoch, drop_last=True)
        for batch in loader:
            with autocast(teacher.device, precision):
                hidden = teacher(batch["input_ids"], batch["attention_mask"]).hidden_states[-1]
            labels = batch["labels"].to(hidden.device)
            selected = labels != -100
            logits = head(hidden[selected].float(), embed.float())
            loss = F.cross_entropy(logits, labels[selected])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            clip_and_step(head.parameters(), optimizer, scheduler, 1.0)
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if len(losses) == steps:
                break
        epoch += 1
    bar.close()
    return head, losses


def teacher_head(teacher, train, run_dir: str | Path, *, fit: bool, steps: int, lr: float, batch_size: int,
                 mlm_probability: float, seed: int, path: str | None = None, precision: str = "bf16",
                 progress: bool = False, logger=None) -> FittedTeacherHead | None:  # fmt: skip
    """The teacher's MLM head to distil logits from, or None (head-ful or causal teacher, or not asked)."""
    if not fit or teacher.has_lm_head or teacher.causal:
        return None
    cache = Path(path).expanduser() if path else Path(run_dir) / HEAD_FILE
    meta = {"teacher": teacher.name, "hidden_size": teacher.hidden_size, "vocab_size": len(teacher.tokenizer),
            "train_blocks": len(train), "seq_len": len(train[0]["input_ids"]), "steps": steps, "lr": lr,
            "batch_size": batch_size, "mlm_probability": mlm_probability, "seed": seed}  # the cache's key
    head = new_head(teacher)
    if cache.is_file():
        saved = load_checkpoint(cache, "cpu", "teacher MLM head cache", "meta")  # tensors only: no code runs
        if saved.get("meta") == meta:
            head.load_state_dict(saved["state"])
            log.info("teacher MLM head loaded from %s", cache)
            return FittedTeacherHead(head.to(teacher.device), teacher,
                                     {**meta, "final_loss": saved["final_loss"]})
        log.info("teacher MLM head cache %s was fitted with other settings; refitting", cache)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head, losses = fit_head(teacher, train, steps=steps, lr=lr, batch_size=batch_size,
                                mlm_probability=mlm_probability, seed=seed, precision=precision, progress=progress)  # fmt: skip
    tail = losses[-max(1, steps // 10) :]
    final = sum(tail) / len(tail)
    if not math.isfinite(final):
        raise FloatingPointError(f"teacher MLM head fit diverged (loss {final}); lower teacher_head.lr")
    atomic_torch_save(dict(meta=meta, state=head.state_dict(), final_loss=final, losses=losses), cache)
    if logger is not None:
        logger.log({"teacher_head": {"steps": steps, "first_loss": losses[0], "final_loss": final}})
    return FittedTeacherHead(head, teacher, {**meta, "final_loss": final})


def share_head(head: FittedTeacherHead | None, teacher) -> FittedTeacherHead | None:
    """Rank 0's head (or None) on every rank, sent through the process group (no shared files needed)."""
    if dist_info()[1] == 1:
        return head
    sent = broadcast_object(
        None if head is None else ({k: v.cpu() for k, v in head.head.state_dict().items()}, head.meta)
    )
    if sent is None:
        return None
    state, meta = sent
    fresh = new_head(teacher)
    fresh.load_state_dict(state)
    return FittedTeacherHead(fresh.to(teacher.device), teacher, meta)
