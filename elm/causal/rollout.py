"""MiniLLM's model calls, rollouts and losses (the stage itself: :mod:`elm.causal.minillm`).

Model calls that count positions over real tokens only (left-padded prompts), on-policy rollouts
sampled from the student mixed with the teacher, the single-step / policy-gradient MiniLLM loss
with per-token importance weights and length-normalised future rewards, and the token-level KL
on teacher-forced data. The module docstring of :mod:`elm.causal.minillm` derives them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..distill.losses import forward_kl, reverse_kl


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids counting only real tokens (left padding gets position 0), as HF generation does."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def logits(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T, V] logits with explicit positions (:func:`positions`)."""
    return model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits


@dataclass
class Rollout:
    """Prompts (left-padded) followed by sampled responses (right-padded after eos)."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    gen_mask: torch.Tensor  # [B, T] 1 at generated tokens (eos included)

    @property
    def lengths(self) -> torch.Tensor:
        return self.gen_mask.sum(-1)


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long, device=device)
    return ids, mask


class LastLogits:
    """Next-token logits of a growing batch of sequences with the model's KV cache: the teacher
    (any Hugging Face causal LM) and the ELM student both encode only the new tokens each step."""

    def __init__(self, model) -> None:
        import inspect

        self.model, self.past, self.seen = model, None, 0
        # transformers >= 5.x names the cache argument `cache` (older: `past_key_values`)
        self.key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pos = positions(mask)
        out = self.model(input_ids=ids[:, self.seen :], attention_mask=mask, position_ids=pos[:, self.seen :],
                         use_cache=True, logits_to_keep=1, **{self.key: self.past})  # fmt: skip
        self.past, self.seen = getattr(out, self.key), ids.shape[1]
        return out.logits[:, -1]


def newline_ids(tokenizer) -> list[int]:
    """Ids of every token whose text holds a newline (where a BBC response paragraph ends)."""
    return [i for i in range(len(tokenizer)) if "\n" in tokenizer.decode([i])]


@torch.no_grad()
def sample_rollouts(student, teacher, prompts: list[list[int]], *, max_new_tokens: int, mix_alpha: float,
                    stop_ids: list[int] | tuple[int, ...] = (), end_ids: list[int] | tuple[int, ...] = (),
                    pad_id: int, generator: torch.Generator | None = None, device="cpu") -> Rollout:  # fmt: skip
    """Sample a response per prompt from p~ = alpha p_teacher + (1 - alpha) q_student (temperature 1).

    A response ends after a token of ``stop_ids`` (eos), after a token of ``end_ids`` (newlines)
    that follows some other generated token (leading newlines do not end it), or after
    ``max_new_tokens``; the closing token is kept and scored.
    """
    if not 0.0 <= mix_alpha < 1.0:
        raise ValueError(f"minillm.mix_alpha={mix_alpha} must be in [0, 1)")
    ids, mask = left_pad(prompts, pad_id, device)
    gen = torch.zeros_like(mask)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    ends = torch.tensor(sorted(set(end_ids)), dtype=torch.long, device=device)
    started = torch.zeros_like(done)  # some token other than an end token was generated
    q_next, p_next = LastLogits(student), LastLogits(teacher)
    for _ in range(max_new_tokens):
        q = F.softmax(q_next(ids, mask).float(), -1)
        if mix_alpha > 0:
            p = F.softmax(p_next(ids, mask)[:, : q.shape[-1]].float(), -1)
            q = (1 - mix_alpha) * q + mix_alpha * p
        tok = torch.multinomial(q, 1, generator=generator).squeeze(-1)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        live = (~done).long()
        ids = torch.cat([ids, tok[:, None]], 1)
        mask = torch.cat([mask, live[:, None]], 1)
        gen = torch.cat([gen, live[:, None]], 1)
        is_end = torch.isin(tok, ends)
        done = done | torch.isin(tok, stops) | (is_end & started)
        started = started | ~is_end
        if bool(done.all()):
            break
    return Rollout(ids, mask, gen)


def future_rewards(r: torch.Tensor, m: torch.Tensor, include_current: bool, normalise: bool) -> torch.Tensor:
    """Per position: sum (or mean, ``normalise``) of ``r`` over the later (``include_current``: and
    this) scored positions of the sequence; 0 where there is none. ``r``, ``m``: [B, T]."""
    r = r * m
    after = r.flip(-1).cumsum(-1).flip(-1)  # sum over t' >= t
    count = m.flip(-1).cumsum(-1).flip(-1)
    if not include_current:
        after, count = after - r, count - m
    if normalise:
        after = torch.where(count > 0, after / count.clamp_min(1), torch.zeros_like(after))
    return after


def minillm_loss(student, teacher, ro: Rollout, *, mix_alpha: float, single_step: bool = True,
                 length_norm: bool = True) -> dict[str, torch.Tensor]:  # fmt: skip
    """The MiniLLM loss of one rollout batch (see the module docstring); ``total`` is what to minimise.

    The gradient of ``total`` is the paper's estimator: ``single`` = weighted token-level reverse
    KL on the sampled prefixes (single-step part), ``long`` = -w_t * R_{t+1} * log q(y_t) with R
    detached (policy-gradient part; without ``single_step`` it carries R_t, the whole return).
    """
    ids, mask = ro.input_ids, ro.attention_mask
    log_q = F.log_softmax(logits(student, ids, mask)[:, :-1].float(), -1)  # position t predicts t+1
    with torch.no_grad():
        log_p = F.log_softmax(logits(teacher, ids, mask)[:, :-1, : log_q.shape[-1]].float(), -1)
    target = ids[:, 1:, None]
    m = ro.gen_mask[:, 1:].float()
    n = m.sum().clamp_min(1.0)
    lq = log_q.gather(-1, target).squeeze(-1)
    lp = log_p.gather(-1, target).squeeze(-1)
    with torch.no_grad():
        r = lp - lq
        if mix_alpha > 0:
            w = lq.exp() / (mix_alpha * lp.exp() + (1 - mix_alpha) * lq.exp())
        else:
            w = torch.ones_like(lq)
        ret = future_rewards(r, m, include_current=not single_step, normalise=length_norm)
    terms = {"long": -(w * ret * lq * m).sum() / n}
    kl_t = (log_q.exp() * (log_q - log_p)).sum(-1)  # exact KL(q || p) at each sampled prefix
    if single_step:
        terms["single"] = (w * kl_t * m).sum() / n
    terms["total"] = sum(terms.values())
    terms["rkl_token"] = ((w * kl_t * m).sum() / n).detach()
    terms["rkl_seq"] = (-(w * r * m).sum() / n).detach()
    return terms


def teacher_forced_kl(student, teacher, batch: dict[str, torch.Tensor], objective: str,
                      temperature: float = 1.0) -> torch.Tensor:  # fmt: skip
    """Token-level forward or reverse KL on teacher-forced sequences, at the ``score_mask`` targets."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    s = logits(student, ids, mask)[:, :-1]
    with torch.no_grad():
        t = logits(teacher, ids, mask)[:, :-1, : s.shape[-1]]
    scored = batch["score_mask"][:, 1:] * mask[:, 1:]
    fn = {"forward_kl": forward_kl, "reverse_kl": reverse_kl}[objective]
    return fn(s, t, scored, temperature)
