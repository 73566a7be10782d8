"""End-of-epoch analysis of the supernet: PCA width growth, CKA head pruning, diversity.

Runs on a small held-out batch (activations captured inside the elastic modules) and turns the
statistics into decisions through the pure functions of ``pca.py`` and ``cka.py``. All ranks
of a distributed run see the same held-out batch, so they take the same decisions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..distill.losses import cosine_diversity
from ..supernet import Supernet
from .cka import head_cka_matrix, prune_by_cka
from .pca import pca_score


@dataclass
class PCAConfig:
    """Dynamic dimension search. [paper] after each epoch the ``top_k`` (2) blocks with the
    highest PCA score grow by ``unit`` (132). [project decision] score = k / d at 0.99 explained
    variance (``mode: count`` gives W-PCA's raw k); per-block-type thresholds (W-PCA: 0.90 for
    MobileBERT)."""

    top_k: int = 2
    unit: int = 132
    threshold: float = 0.99
    threshold_mobilebert: float | None = None
    mode: str = "ratio"


@dataclass
class CKAConfig:
    """Head search. [project decision] prune every epoch (``when: every_epoch``) or once at the
    end (``final``, as W-PCA); a head is redundant when its linear CKA with another active head
    exceeds ``threshold``; the less important head (lower output norm) goes."""

    threshold: float = 0.9
    min_heads: int = 1
    when: str = "every_epoch"
    enabled: bool = True


@dataclass
class EpochAnalysis:
    pca: dict[str, float] = field(default_factory=dict)
    cka: dict[str, list[list[float]]] = field(default_factory=dict)
    importance: dict[str, list[float]] = field(default_factory=dict)
    diversity: list[float | None] = field(default_factory=list)


def _valid_tokens(mask: torch.Tensor | None, shape) -> torch.Tensor:
    return mask.bool().flatten() if mask is not None else torch.ones(shape[0] * shape[1], dtype=torch.bool)


@torch.no_grad()
def analyse(supernet: Supernet, teacher_hidden, attention_mask, pca: PCAConfig) -> EpochAnalysis:
    """PCA score of every candidate's first-FFN activations, head CKA matrices, head importance
    (mean norm of each head's contribution to the block output) and per-layer diversity."""
    was_training = supernet.training
    supernet.eval()
    for *_, cand in supernet.candidates():
        cand.set_capture(True)
    try:
        outputs = supernet.blockwise(teacher_hidden, attention_mask)
        result = EpochAnalysis(
            diversity=[cosine_diversity(outs, attention_mask) if len(outs) > 1 else None for outs in outputs]
        )
        valid = _valid_tokens(attention_mask, teacher_hidden[0].shape[:2])
        for _, _, key, cand in supernet.candidates():
            acts = cand.ffns[0].last_hidden.flatten(0, 1)[valid.to(cand.ffns[0].last_hidden.device)]
            threshold = pca.threshold
            if cand.block == "mobilebert" and pca.threshold_mobilebert is not None:
                threshold = pca.threshold_mobilebert
            result.pca[key] = pca_score(acts.float(), threshold=threshold, mode=pca.mode)
            attn = cand.attention
            ctx = attn.last_context  # [B, h, T, d]
            heads = ctx.permute(1, 0, 2, 3).flatten(1, 2)[:, valid.to(ctx.device)]  # [h, N, d]
            result.cka[key] = head_cka_matrix(heads.float()).tolist()
            w_out = attn.out.weight[:, : attn.active_heads * attn.head_dim].view(attn.dim, attn.active_heads, -1)
            contrib = torch.einsum("hnd,ohd->hno", heads, w_out)
            result.importance[key] = contrib.norm(dim=-1).mean(dim=1).tolist()
    finally:
        for *_, cand in supernet.candidates():
            cand.set_capture(False)
        supernet.train(was_training)
    return result


def grow_widths(supernet: Supernet, scores: dict[str, float], cfg: PCAConfig, optimizer=None) -> list[dict[str, Any]]:
    """[paper] Grow the ``top_k`` highest-scoring candidates that still have room by ``unit``.

    Ties break by key so every rank grows the same blocks."""
    room = {key: cand for _, _, key, cand in supernet.candidates() if cand.ffn_dim + cfg.unit <= cand.ffns[0].max_dim}
    ranked = sorted(room, key=lambda k: (-scores[k], k))[: cfg.top_k]
    events = []
    for key in ranked:
        cand = room[key]
        old = cand.ffn_dim
        cand.grow_ffn(old + cfg.unit, optimizer)
        events.append({"candidate": key, "from": old, "to": cand.ffn_dim, "pca": scores[key]})
    return events


def prune_heads(supernet: Supernet, analysis: EpochAnalysis, cfg: CKAConfig, optimizer=None) -> list[dict[str, Any]]:
    """[project decision] Drop redundant heads of every candidate by CKA (see ``prune_by_cka``)."""
    events = []
    for _, _, key, cand in supernet.candidates():
        attn = cand.attention
        active = list(range(attn.active_heads))
        kept, decisions = prune_by_cka(
            torch.tensor(analysis.cka[key]), active, torch.tensor(analysis.importance[key]),
            threshold=cfg.threshold, min_heads=cfg.min_heads,
        )  # fmt: skip
        if len(kept) < len(active):
            attn.keep_heads(kept, optimizer)
            events += [{"candidate": key, **d} for d in decisions]
    return events
