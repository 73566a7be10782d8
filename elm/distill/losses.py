"""Distillation losses (method doc, sections 2 and 5).

[paper] Point-wise KD (MSE, KL) pushes all candidate blocks of a layer towards the same output;
relational KD keeps them diverse (lower mean cosine similarity between candidates' features).
[project decision] :func:`rkd_loss` = 1 - Pearson correlation between student and teacher
token-token cosine-relation matrices, per sequence. MSE (learned projection), hidden-state KL
and MiniLM-style attention KL stay available for ablations; logit-level forward / reverse KL are
for whole-model retraining.

Conventions: hidden states ``[B, T, D]``; ``attention_mask`` ``[B, T]`` with 1 (or True) for
real tokens and 0 for padding (Hugging Face convention), ``None`` = all tokens valid. Losses
return 0-dim tensors (differentiable), averaged over valid tokens (or sequences for RKD).
Computation is in at least float32, except the matmul of :func:`relation_matrix` (in the states' dtype).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EPS = 1e-8


def _float(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _token_mask(x: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Boolean ``[B, T]`` validity mask for hidden states / logits ``[B, T, ...]``."""
    if attention_mask is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    if attention_mask.shape != x.shape[:2]:
        raise ValueError(f"attention_mask must have shape {tuple(x.shape[:2])}, "
                         f"got {tuple(attention_mask.shape)}")
    return attention_mask.to(device=x.device) != 0


def _projected(student: Tensor, teacher: Tensor, proj: nn.Module | None) -> tuple[Tensor, Tensor]:
    """``proj(student)`` and ``teacher`` in one float dtype, of one shape (``proj`` maps the widths)."""
    s = _float(proj(student) if proj is not None else student)
    t = _float(teacher).to(s.dtype)
    if s.shape != t.shape:
        raise ValueError(f"student {tuple(s.shape)} and teacher {tuple(t.shape)} differ; pass proj")
    return s, t


def _masked_token_mean(per_token: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``per_token [B, T]`` over valid tokens (0 if none, still differentiable)."""
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp_min(1.0)


class _Gram(torch.autograd.Function):
    """``h @ h^T`` with one matmul in the backward: ``(g + g^T) @ h``. [issue #15] Autograd's own
    backward treats the two operands as different tensors (two matmuls and an add): the bf16 search step,
    where every candidate's RKD needs this, took 706 ms instead of 731."""

    @staticmethod
    def forward(ctx, h: Tensor) -> Tensor:
        ctx.save_for_backward(h)
        return h @ h.transpose(1, 2)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (h,) = ctx.saved_tensors
        grad = grad.to(h.dtype)  # bf16 states (or CUDA autocast): the forward ran in bf16
        return (grad + grad.transpose(1, 2)) @ h


def relation_matrix(h: Tensor, mask: Tensor | None = None) -> Tensor:
    """Token-token cosine similarity ``[B, T, T]`` of hidden states ``h [B, T, D]``.

    Rows and columns of padding tokens are zero. Zero vectors have zero similarity with
    everything (eps-normalised), so the result is always finite.
    """
    if h.dim() != 3:
        raise ValueError(f"h must have shape [B, T, D], got shape {tuple(h.shape)}")
    # the Gram matrix scaled by its diagonal: the elementwise work is on [B, T, T], not [B, T, D]
    # (F.normalize's broadcast division was the search step's largest non-matmul op). The Gram
    # matmul runs in h's dtype (bf16 states of the search's bf16 replica: the step's other matmuls
    # are bf16 too), everything after it in float32 [issue #15: a layer's six RKD + NMSE terms, forward
    # and backward, 27.5 -> 21.9 ms]
    gram = _float(_Gram.apply(h) if h.requires_grad else h @ h.transpose(1, 2))
    inv = gram.diagonal(dim1=1, dim2=2).clamp_min(EPS * EPS).rsqrt()  # 1 / max(|h_i|, eps)
    rel = gram * (inv[:, :, None] * inv[:, None, :])
    if mask is not None:
        m = _token_mask(h, mask).to(rel.dtype)
        rel = rel * m[:, :, None] * m[:, None, :]
    return rel


def _pair_mask(mask: Tensor) -> Tensor:
    """Valid token pairs (i, j) with j < i: ``[B, T, T]`` bool."""
    t = mask.shape[1]
    lower = torch.ones(t, t, dtype=torch.bool, device=mask.device).tril(-1)
    return lower[None] & mask[:, :, None] & mask[:, None, :]


def rkd_sequences(attention_mask: Tensor) -> Tensor:
    """``[B]`` bool: the sequences :func:`rkd_loss` averages over (>= 3 valid tokens = >= 2 pairs).

    Distributed / accumulated training weights each micro-batch's RKD by this count, so that the
    loss over a global batch does not depend on how it was split.
    """
    return (attention_mask != 0).sum(dim=-1) >= 3


def rkd_target(teacher: Tensor, attention_mask: Tensor | None = None, eps: float = EPS) -> dict[str, Tensor]:
    """The teacher's side of :func:`rkd_loss` (centred relations over valid pairs, their variance),
    computed once and shared by every student compared with the same teacher state."""
    mask = _token_mask(teacher, attention_mask)
    rt = relation_matrix(teacher)
    pairs = _pair_mask(mask).to(rt.dtype)
    n = pairs.sum(dim=(1, 2)).clamp_min(1.0)  # [B]
    dt = (rt - ((rt * pairs).sum(dim=(1, 2)) / n)[:, None, None]) * pairs
    return {"dt": dt, "pairs": pairs, "n": n, "std": torch.sqrt(dt.square().sum(dim=(1, 2)) / n + eps),
            "valid": rkd_sequences(mask).to(rt.dtype)}  # fmt: skip


def rkd_loss(student: Tensor, teacher: Tensor | dict[str, Tensor], attention_mask: Tensor | None = None,
             causal: bool = False, eps: float = EPS) -> Tensor:
    """Relational KD: 1 - Pearson(student relations, teacher relations). [project decision]

    For each sequence the token-token cosine-relation matrices of student ``[B, T, Ds]`` and
    teacher ``[B, T, Dt]`` are compared by Pearson correlation over the valid token pairs
    (i, j) with j < i (the diagonal is always 1 and is excluded). With ``causal=True`` only a
    token's relations to earlier tokens count; because cosine relations are symmetric this is
    the same set of pairs as the bidirectional case, so both give the same value (``causal`` is
    kept so that callers pass their model's setting uniformly). ``Ds`` and ``Dt`` may differ (no
    projection needed). The loss is averaged over sequences that have at least 2 valid pairs; it
    is 0 if none has. ``eps`` guards the variances (constant relations give correlation 0, not
    NaN). ``teacher`` may be a precomputed :func:`rkd_target`.
    """
    target = teacher if isinstance(teacher, dict) else None
    shape = target["dt"].shape if target is not None else teacher.shape[:2]
    if student.shape[:2] != tuple(shape[:2]):
        raise ValueError(f"student and teacher must share [B, T], got {tuple(student.shape)} and {tuple(shape)}")
    if target is None:
        target = rkd_target(teacher, attention_mask, eps)
    rs = relation_matrix(student)
    pairs, n = target["pairs"].to(rs.dtype), target["n"].to(rs.dtype)
    ds = (rs - ((rs * pairs).sum(dim=(1, 2)) / n)[:, None, None]) * pairs
    cov = (ds * target["dt"].to(rs.dtype)).sum(dim=(1, 2)) / n
    var_s = ds.square().sum(dim=(1, 2)) / n
    corr = cov / (torch.sqrt(var_s + eps) * target["std"].to(rs.dtype))
    valid = target["valid"].to(rs.dtype)
    return ((1.0 - corr) * valid).sum() / valid.sum().clamp_min(1.0)


def mse_loss(student: Tensor, teacher: Tensor, proj: nn.Module | None = None,
             attention_mask: Tensor | None = None) -> Tensor:
    """Point-wise MSE between ``proj(student)`` and ``teacher`` (``[B, T, D]``).

    ``proj`` (owned and trained by the caller) maps the student width to the teacher's; without
    it the widths must match. Mean over valid tokens and features.
    """
    s, t = _projected(student, teacher, proj)
    per_token = (s - t).square().mean(dim=-1)
    return _masked_token_mean(per_token, _token_mask(t, attention_mask))


def normalised_mse(student: Tensor, target: Tensor, variance: Tensor | float, attention_mask: Tensor | None = None) -> Tensor:
    """Point-wise distance in a shared basis: ``mean_tokens ||s - t||^2 / variance``.

    [project decision] ``variance`` is the teacher state's total variance (trace of its covariance)
    in the same coordinates, so the loss is the fraction of the teacher's variance the student
    misses (0 = exact, 1 = as far as the teacher's mean); comparable across layers and widths, and
    not dominated by a few large coordinates the way a raw MSE is. Mean over valid tokens.
    """
    s, t = _float(student), _float(target).to(_float(student).dtype)
    if s.shape != t.shape:
        raise ValueError(f"student {tuple(s.shape)} and target {tuple(t.shape)} must share one basis")
    per_token = F.mse_loss(s, t, reduction="none").sum(dim=-1)  # fused: one pass each way, unlike (s - t).square()
    return _masked_token_mean(per_token, _token_mask(t, attention_mask)) / variance


def kl_hidden_loss(student: Tensor, teacher: Tensor, proj: nn.Module | None = None,
                   attention_mask: Tensor | None = None, temperature: float = 1.0) -> Tensor:
    """KL(softmax(teacher / T) || softmax(proj(student) / T)) over the feature dimension.

    [project decision] A point-wise KL ablation for hidden states: each token's feature vector
    is turned into a distribution over features by a softmax, as if it were logits. Needs equal
    widths (hence ``proj``). Mean over valid tokens.
    """
    return forward_kl(*_projected(student, teacher, proj), attention_mask, temperature)


def attention_relation_loss(student_attn: Tensor, teacher_attn: Tensor, attention_mask: Tensor | None = None,
                            eps: float = EPS) -> Tensor:
    """MiniLM-style KL(teacher attention || student attention).

    Inputs are attention probabilities ``[B, H, T, T]`` (rows sum to 1 over keys) or
    ``[B, T, T]``. [project decision] Maps are averaged over heads first, so student and teacher
    may have different head counts (the search changes them); the KL of each valid query row
    is averaged over valid queries. Student probabilities are clamped at ``eps`` in the log.
    """

    def heads_mean(a: Tensor) -> Tensor:
        if a.dim() not in (3, 4):
            raise ValueError(f"attention maps must be [B, H, T, T] or [B, T, T], got {tuple(a.shape)}")
        return _float(a).mean(dim=1) if a.dim() == 4 else _float(a)

    s, t = heads_mean(student_attn), heads_mean(teacher_attn)
    if s.shape != t.shape:
        raise ValueError(f"student {tuple(s.shape)} and teacher {tuple(t.shape)} attention maps differ")
    t = t.to(s.dtype)
    per_query = (torch.xlogy(t, t) - t * torch.log(s.clamp_min(eps))).sum(dim=-1)  # [B, T]
    return _masked_token_mean(per_query, _token_mask(s, attention_mask))


def _token_kl(student_logits: Tensor, teacher_logits: Tensor, attention_mask: Tensor | None, temperature: float,
              reverse: bool) -> Tensor:  # fmt: skip
    """Per-token KL over the vocabulary, mean over valid tokens: KL(p_t || p_s), or KL(p_s || p_t)
    when ``reverse``; computed in the student's (float) precision."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    s = _float(student_logits)
    t = _float(teacher_logits).to(s.dtype)
    if temperature != 1:  # (a [tokens, vocab] pass each way saved at T = 1)
        s, t = s / temperature, t / temperature
    if not reverse and not t.requires_grad:  # a frozen teacher: its side needs no graph
        with torch.no_grad():
            log_pt = F.log_softmax(t, dim=-1)
            pt = log_pt.exp()
            neg_entropy = (pt * log_pt).sum(dim=-1)
        # [issue #15] KL(p_t || p_s) = CE(s, p_t) - H(p_t): soft-target cross-entropy is one fused
        # log-softmax pass with a fused backward (softmax(s) - p_t); the retrain step's logit KD
        # ([~300 masked tokens, 30522]) took 98 ms forward + backward instead of 142
        per_token = F.cross_entropy(s.flatten(0, -2), pt.flatten(0, -2), reduction="none").view(s.shape[:-1])
        per_token = per_token + neg_entropy
    else:
        log_ps, log_pt = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)
        log_p, log_q = (log_ps, log_pt) if reverse else (log_pt, log_ps)
        per_token = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    return _masked_token_mean(per_token, _token_mask(student_logits, attention_mask))


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, attention_mask: Tensor | None = None,
               temperature: float = 1.0) -> Tensor:
    """Token-level KL(p_teacher || p_student) over the last (vocabulary) dim, at ``temperature``.

    Logits ``[B, T, V]``. Mean over valid tokens. Not multiplied by ``temperature**2``
    (Hinton's gradient scaling is left to the caller).
    """
    return _token_kl(student_logits, teacher_logits, attention_mask, temperature, reverse=False)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, attention_mask: Tensor | None = None,
               temperature: float = 1.0) -> Tensor:
    """Token-level KL(p_student || p_teacher) (mode-seeking), mean over valid tokens.

    [project decision] The exact per-token reverse KL over the vocabulary, the token-level
    objective behind MiniLLM; MiniLLM's sequence-level policy-gradient estimator is not used.
    """
    return _token_kl(student_logits, teacher_logits, attention_mask, temperature, reverse=True)


def soft_label_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Task distillation's soft-label loss over examples (Hinton et al.; TinyBERT's prediction layer).

    Classification (``[N, C]``, C >= 2): ``T^2 * KL(softmax(t / T) || softmax(s / T))`` averaged over
    the N examples; the ``T^2`` keeps gradient sizes comparable across temperatures. Regression
    (``[N]`` or ``[N, 1]``): the MSE between the student's and the teacher's predictions
    (``temperature`` unused). 0 when the logits are equal; computed in at least float32.
    """
    s = _float(student_logits)
    t = _float(teacher_logits).to(s.dtype)
    if s.shape != t.shape:
        raise ValueError(f"student {tuple(s.shape)} and teacher {tuple(t.shape)} logits differ in shape")
    if s.dim() == 1 or s.shape[-1] == 1:
        return F.mse_loss(s.reshape(-1), t.reshape(-1))
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    log_ps = F.log_softmax(s / temperature, dim=-1)
    log_pt = F.log_softmax(t / temperature, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=-1)
    return kl.mean() * temperature**2


@torch.no_grad()
def cosine_diversity(outputs: list[Tensor], mask: Tensor | None = None) -> float:
    """Mean pairwise cosine similarity between candidate blocks' outputs of one layer.

    [paper] metric (lower = more diverse candidates). ``outputs``: one ``[B, T, D]`` tensor per
    candidate, all the same shape (every candidate outputs the student hidden size). For each
    pair of candidates, the per-token cosine similarity is averaged over valid tokens; the
    result is the mean over pairs. Needs at least two candidates.
    """
    if len(outputs) < 2:
        raise ValueError(f"cosine_diversity needs at least 2 candidate outputs, got {len(outputs)}")
    shape = outputs[0].shape
    if any(o.shape != shape for o in outputs) or len(shape) != 3:
        raise ValueError(f"all outputs must share one [B, T, D] shape, "
                         f"got {[tuple(o.shape) for o in outputs]}")
    valid = _token_mask(outputs[0], mask).reshape(-1)
    z = torch.stack([F.normalize(_float(o).reshape(-1, shape[-1])[valid], dim=-1, eps=EPS) for o in outputs])
    if z.shape[1] == 0:
        raise ValueError("mask selects no tokens")
    flat = z.reshape(len(outputs), -1)
    sims = (flat @ flat.T) / z.shape[1]  # [C, C] mean per-token cosine (one matmul; einsum took 30 ms)
    c = len(outputs)
    iu = torch.triu_indices(c, c, offset=1)
    return float(sims[iu[0], iu[1]].mean())


@dataclass(frozen=True)
class HiddenLoss:
    """A hidden-state distillation loss (``distill.loss``), as the search's blocks and the retrained
    student both use it, against the teacher's state in the shared teacher -> student basis.

    ``prepare(teacher_state, mask)`` is the teacher's side, computed once per layer boundary and
    shared by every student state compared with it; ``main(student, prepared, mask)`` the mean over
    ``units`` (``"sequences"`` with >= 2 token pairs, or valid ``"tokens"``): what a micro-batch's
    term is weighted by when a global batch is split. ``main=None``: no term of its own (the
    point-wise normalised MSE, weighted by ``distill.point``, is the whole loss). ``basis``: the loss
    compares coordinates, so it needs both states in one basis (relations are width-free).
    """

    name: str
    main: Callable[[Tensor, Any, Tensor], Tensor] | None
    prepare: Callable[[Tensor, Tensor], Any]
    units: str
    basis: bool

    def count(self, attention_mask: Tensor) -> Tensor:
        """How many units a batch holds."""
        return rkd_sequences(attention_mask).sum() if self.units == "sequences" else (attention_mask != 0).sum()


def _as_is(teacher: Tensor, attention_mask: Tensor) -> Tensor:
    return teacher


HIDDEN_LOSSES: dict[str, HiddenLoss] = {
    "rkd": HiddenLoss("rkd", lambda s, t, m: rkd_loss(s, t), rkd_target, "sequences", basis=False),
    "mse": HiddenLoss("mse", None, _as_is, "tokens", basis=True),
    "kl": HiddenLoss("kl", lambda s, t, m: kl_hidden_loss(s, t, attention_mask=m), _as_is, "tokens", basis=True),
}


def hidden_loss(name: str) -> HiddenLoss:
    """``distill.loss`` looked up in :data:`HIDDEN_LOSSES` (one ``ValueError`` line naming the valid ones)."""
    if name not in HIDDEN_LOSSES:
        raise ValueError(f"distill.loss={name!r} is unknown; valid: {', '.join(HIDDEN_LOSSES)}")
    return HIDDEN_LOSSES[name]
