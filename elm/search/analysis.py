"""End-of-epoch analysis of the supernet: PCA width growth, CKA head pruning, diversity.

Runs on a held-out analysis batch (disjoint from the validation batches that score candidates;
activations captured inside the elastic modules) and turns the statistics into decisions through
the pure functions of ``pca.py`` and ``cka.py``. All ranks see the same batch, so they take the
same decisions (rank 0's are broadcast anyway).

[project decision] Both statistics are read *against their untrained level*. A PCA score or a
head-pair CKA of a block says little by itself: at random init, PCA scores already differ by
block type (ReLU MobileBERT FFNs spread their variance differently from GELU BERT FFNs) and
random heads on the same input already have a high CKA. So every candidate gets an untrained
twin (same block, sharing, heads and width, fresh random init from a fixed seed, the global RNG
untouched) run on the same input, and

* the normalised PCA score = score / the twin's score (the twin at the initial FFN width, see
  :func:`untrained_twin`); growth compares normalised scores, so block types compete fairly;
* a head pair is redundant when its CKA exceeds ``u + margin x (1 - u)``, with ``u`` the twin's
  level (median over heads of each head's highest CKA with another head): pruning then reflects
  redundancy the block learned (or inherited), not what random heads on this input show.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass, field
from typing import Any

import torch

from ..blocks import family
from ..distill.losses import cosine_diversity
from ..space import SpaceConfig
from ..supernet import CandidateBlock, Supernet
from ..utils.settings import check_choice
from .cka import head_cka_matrix, prune_by_cka
from .pca import PCA_MODES, pca_score

PCA_SCOPES = ("layer", "global")
CKA_WHEN = ("every_epoch", "final")
TWIN_SEED = 20_251_027  # untrained twins: the same random init at every analysis and on every rank


@dataclass
class PCAConfig:
    """Dynamic dimension search. [paper] after each epoch the blocks with the highest PCA score grow
    by ``unit`` (132). [project decision] score = k / d at 0.99 explained variance (``mode: count``
    gives W-PCA's raw k), normalised by the untrained level (``normalise``); ``scope: layer`` grows
    the ``top_k`` best candidates of every layer, ``global`` the ``top_k`` best overall (ties by
    score, then layer and candidate index, never by name). Per-block-type thresholds (W-PCA: 0.90
    for MobileBERT)."""

    top_k: int = 1
    unit: int = 132
    threshold: float = 0.99
    threshold_mobilebert: float | None = None
    mode: str = "ratio"
    scope: str = "layer"
    normalise: bool = True

    def validate(self, space: SpaceConfig) -> PCAConfig:
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"pca.top_k={self.top_k!r} must be an integer >= 0 (0 = no growth)")
        if isinstance(self.unit, bool) or not isinstance(self.unit, int) or self.unit < 1:
            raise ValueError(f"pca.unit={self.unit!r} must be a positive integer")
        if self.unit > space.ffn_max - space.ffn_init and self.top_k > 0:
            raise ValueError(f"pca.unit={self.unit} never fits: FFNs start at space.ffn_init={space.ffn_init} and stop "
                             f"at space.ffn_max={space.ffn_max}")  # fmt: skip
        for name in ("threshold", "threshold_mobilebert"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise ValueError(f"pca.{name}={value!r} must be in (0, 1]")
        check_choice("pca.mode", self.mode, PCA_MODES)
        check_choice("pca.scope", self.scope, PCA_SCOPES)
        return self


@dataclass
class CKAConfig:
    """Head search. [project decision] prune every epoch (``when: every_epoch``) or once at the end
    (``final``, as W-PCA); a pair of active heads is redundant when its linear CKA exceeds the
    calibrated threshold ``u + margin x (1 - u)`` (``calibrate: true``, ``u`` = the untrained
    level, see the module doc) or the fixed ``threshold`` (``calibrate: false``); the head with the
    smaller output goes, and its mean output is folded into the output bias."""

    threshold: float = 0.9
    margin: float = 0.5
    calibrate: bool = True
    min_heads: int = 1
    when: str = "every_epoch"
    enabled: bool = True

    def validate(self, space: SpaceConfig) -> CKAConfig:
        check_choice("cka.when", self.when, CKA_WHEN)
        if not 0 < self.threshold <= 1 or not 0 <= self.margin <= 1:
            raise ValueError(f"cka.threshold={self.threshold!r} must be in (0, 1] and cka.margin={self.margin!r} "
                             f"in [0, 1]")  # fmt: skip
        most = min(space.heads_of(b) // family(b).head_step(s) for b, s in space.candidates() if not family(b).identity)
        if isinstance(self.min_heads, bool) or not isinstance(self.min_heads, int) or not 1 <= self.min_heads <= most:
            raise ValueError(f"cka.min_heads={self.min_heads!r} must be an integer in [1, {most}] (the fewest "
                             f"heads, or key/value groups, a candidate of this space has)")  # fmt: skip
        return self


@dataclass
class EpochAnalysis:
    pca: dict[str, float] = field(default_factory=dict)
    pca_untrained: dict[str, float] = field(default_factory=dict)
    cka: dict[str, list[list[float]]] = field(default_factory=dict)
    cka_untrained: dict[str, float] = field(default_factory=dict)
    importance: dict[str, list[float]] = field(default_factory=dict)
    head_mean: dict[str, list[list[float]]] = field(default_factory=dict)
    diversity: list[float | None] = field(default_factory=list)

    def normalised_pca(self) -> dict[str, float]:
        return {k: v / self.pca_untrained[k] if self.pca_untrained.get(k) else v for k, v in self.pca.items()}


def max_pair_level(cka: torch.Tensor) -> float:
    """Median over heads of each head's highest CKA with another head (1 head: 0)."""
    if cka.shape[0] < 2:
        return 0.0
    off = cka.clone().fill_diagonal_(float("-inf"))
    return float(off.max(dim=1).values.median())


def _block_stats(cand: CandidateBlock, x, mask, causal: bool, valid, pca: PCAConfig) -> dict[str, Any]:
    """PCA score, head CKA, head importance and mean head output of one candidate on input ``x``
    (activations captured inside its modules for this one call)."""
    cand.set_capture(True)
    try:
        out = cand(x, mask, causal)[0]
        hidden, ctx = cand.ffns[0].last_hidden, cand.attention.last_context  # ctx: [B, h, T, d]
    finally:
        cand.set_capture(False)
    acts = hidden.flatten(0, 1)[valid.to(x.device)]
    threshold = family(cand.block).pca_threshold(pca)
    attn = cand.attention
    heads = ctx.permute(1, 0, 2, 3).flatten(1, 2)[:, valid.to(ctx.device)]  # [h, N, d]
    w_out = attn.out.weight[:, : attn.active_heads * attn.head_dim].view(attn.dim, attn.active_heads, -1)
    contrib = torch.einsum("hnd,ohd->hno", heads, w_out)
    return {"out": out, "pca": pca_score(acts.float(), threshold=threshold, mode=pca.mode),
            "cka": head_cka_matrix(heads.float()), "importance": contrib.norm(dim=-1).mean(dim=1).tolist(),
            "head_mean": contrib.mean(dim=1).tolist()}  # fmt: skip


def untrained_twin(supernet: Supernet, cand: CandidateBlock) -> CandidateBlock:
    """A freshly initialised candidate with ``cand``'s block, sharing and heads at the space's initial
    FFN width (seeded; global RNG untouched). The width is the initial one on purpose: a random FFN's
    k/d falls as it widens (its rank is capped by the input's), so a twin at the current width would
    make every grown candidate look ever more starved; against a fixed twin, k/d keeps the paper's
    self-limiting behaviour (a grown block's score is recomputed and falls) while the block-type
    offset is removed."""
    cfg = cand.layer_config()
    width = supernet.space.ffn_init
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TWIN_SEED)
        twin = family(cand.block).candidate(cand.hidden_size, cfg.num_heads, cfg.head_dim, cand.share,
                                            ffn_init=width, ffn_max=width, num_ffn=cfg.num_ffn,
                                            bottleneck_size=cand.bottleneck_size, dropout=0.0)  # fmt: skip
    return twin.to(next(cand.parameters()).device).eval()


@torch.no_grad()
def analyse(supernet: Supernet, teacher_hidden, attention_mask, pca: PCAConfig, untrained: bool = True,
            twins: dict | None = None) -> EpochAnalysis:  # fmt: skip
    """PCA scores, head CKA matrices, head importance (mean norm of each head's contribution to the
    block output) and mean outputs, per-layer diversity, and (``untrained``) the twins' levels.

    ``twins``: a cache of the twins' levels that the caller keeps across calls *on the same batch*
    (the search's fixed analysis batch). A twin is a seeded function of its layer's input and its
    candidate's structure (:func:`untrained_twin`), so it is only run again when pruning changed
    the candidate's heads."""
    from ..modeling.modeling_elm import attention_bias

    was_training = supernet.training
    supernet.eval()
    result, twins = EpochAnalysis(), {} if twins is None else twins
    causal = supernet.space.causal
    mask = attention_bias(attention_mask, causal, teacher_hidden[0].shape[1])
    valid = torch.ones(teacher_hidden[0].shape[:2]) if attention_mask is None else attention_mask
    valid = valid.bool().flatten()  # [B*T] tokens the statistics read
    try:
        for li, layer in enumerate(supernet.layers):
            x = supernet.block_inputs(teacher_hidden, li)
            outs = []
            for cand in layer:
                if cand.identity:  # no FFN, no heads: nothing to score, grow or prune
                    continue
                key = f"L{li}.{cand.name}"
                stats = _block_stats(cand, x, mask, causal, valid, pca)
                outs.append(stats["out"])
                result.pca[key], result.importance[key] = stats["pca"], stats["importance"]
                result.cka[key], result.head_mean[key] = stats["cka"].tolist(), stats["head_mean"]
                if untrained:
                    twin_key = (li, astuple(cand.layer_config(ffn_dim=supernet.space.ffn_init)))
                    levels = twins.get(twin_key)
                    if levels is None:
                        twin = _block_stats(untrained_twin(supernet, cand), x, mask, causal, valid, pca)
                        levels = twins[twin_key] = (twin["pca"], max_pair_level(twin["cka"]))
                    result.pca_untrained[key], result.cka_untrained[key] = levels
            result.diversity.append(cosine_diversity(outs, attention_mask) if len(outs) > 1 else None)
    finally:
        supernet.train(was_training)
    return result


def grow_widths(supernet: Supernet, analysis: EpochAnalysis, cfg: PCAConfig, optimizer=None,
                generator: torch.Generator | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """[paper] Grow the best-scoring candidates that still have room by ``unit``: the ``top_k`` of
    every layer (``scope: layer``) or overall (``global``). Scores are normalised by the untrained
    level when ``cfg.normalise``; ties break by layer and candidate index, identically on every rank."""
    scores = analysis.normalised_pca() if cfg.normalise else analysis.pca
    room = [(li, ci, key, cand) for li, ci, key, cand in supernet.candidates()
            if not cand.identity and cand.ffn_dim + cfg.unit <= cand.ffns[0].max_dim]  # fmt: skip
    ranked = sorted(room, key=lambda r: (-scores[r[2]], r[0], r[1]))
    by_layer = [[r for r in ranked if r[0] == li][: cfg.top_k] for li in range(len(supernet.layers))]
    picked = [r for rows in by_layer for r in rows] if cfg.scope == "layer" else ranked[: cfg.top_k]
    events = []
    for _, _, key, cand in picked:
        old = cand.ffn_dim
        cand.grow_ffn(old + cfg.unit, optimizer, generator=generator)
        events.append({"candidate": key, "from": old, "to": cand.ffn_dim, "pca": analysis.pca[key],
                       "pca_normalised": scores[key]})  # fmt: skip
    return events


def cka_threshold(analysis: EpochAnalysis, key: str, cfg: CKAConfig) -> float:
    """The CKA above which a head pair of candidate ``key`` counts as redundant (see CKAConfig)."""
    u = analysis.cka_untrained.get(key)
    return u + cfg.margin * (1.0 - u) if cfg.calibrate and u is not None else cfg.threshold


@torch.no_grad()
def prune_heads(supernet: Supernet, analysis: EpochAnalysis, cfg: CKAConfig, optimizer=None) -> list[dict[str, Any]]:
    """[project decision] Drop redundant heads of every candidate by CKA (see ``prune_by_cka``); the
    dropped heads' mean output goes into the attention's output bias (mean compensation)."""
    events = []
    for _, _, key, cand in supernet.candidates():
        if cand.identity:
            continue
        attn = cand.attention
        active = list(range(attn.active_heads))
        threshold = cka_threshold(analysis, key, cfg)
        kept, decisions = prune_by_cka(
            torch.tensor(analysis.cka[key]), active, torch.tensor(analysis.importance[key]),
            threshold=threshold, min_heads=cfg.min_heads,
        )  # fmt: skip
        if len(kept) < len(active):
            dropped = [h for h in active if h not in kept]
            mean = torch.tensor(analysis.head_mean[key], device=attn.out.bias.device)
            attn.out.bias += mean[dropped].sum(0).to(attn.out.bias.dtype)
            attn.keep_heads(kept, optimizer)
            events += [{"candidate": key, "threshold": threshold, **d} for d in decisions]
    return events
