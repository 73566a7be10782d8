"""The LLaMA-style block of an exported ELM model: pre-RMSNorm, rotary positions, grouped-query
attention and a SwiGLU FFN (the ``llama`` family's layout, ``elm.blocks.llama``).

An export that holds llama layers ships this file as ``modeling_elm_llama.py`` beside
``modeling_elm.py`` (``elm.modeling.modeling_elm_layouts.write_export``), so it needs only
``modeling_elm`` beside it: in the package the same names come from ``elm.modeling``. The
supernet's elastic twin (``elm.blocks.llama_elastic``) computes the same function on sliced weights.

Layout of the fused projection, unit-major so an elastic candidate's active units are a prefix:
a *unit* is one key/value head with the ``group`` query heads that read it, stored as
``[unit, group + 2, head_dim]`` rows (the group's queries, then its key, then its value). ``group``
1 is plain multi-head attention. [project decision] The two residual writers (attention output,
FFN down projection) and the three input projections keep their biases, as in the BERT families:
head pruning and idle FFN units fold their mean output into a bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

try:  # an export: beside modeling_elm.py (transformers ignores imports under try when it checks requirements)
    from .modeling_elm import Dropout, attend
except ModuleNotFoundError:  # the package: elm.blocks.llama_layer (no modeling_elm beside it)
    from elm.modeling.modeling_elm import Dropout, attend

ROPE_BASE = 10000.0  # rotary frequency base, as in LLaMA


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``, computed in fp32 (the weight multiplies in the input's dtype)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = x.float()
        return (f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def group_of(share: str) -> int:
    """Query heads per key/value head of a sharing mode: ``none`` 1, ``gqa<g>`` g."""
    return 1 if share == "none" else int(share[3:])


def rotary(x: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Rotary position embedding of ``x [B, h, T, d]`` at positions ``start .. start + T - 1``
    (half-split pairs, as in LLaMA). Relative by construction: a left-padded row only shifts every
    position of the row by the same amount, which leaves its attention scores unchanged."""
    d, t = x.shape[-1], x.shape[-2]
    inv = ROPE_BASE ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    angles = torch.arange(start, start + t, device=x.device, dtype=torch.float32)[:, None] * inv
    cos, sin = angles.cos().repeat(1, 2).to(x.dtype), angles.sin().repeat(1, 2).to(x.dtype)
    half = torch.cat((-x[..., d // 2 :], x[..., : d // 2]), dim=-1)
    return x * cos + half * sin


def split_units(qkv: torch.Tensor, group: int, head_dim: int):
    """Fused projection ``[B, T, units * (group + 2) * d]`` -> q ``[B, units * group, T, d]`` and the
    units' k, v ``[B, units, T, d]``."""
    b, t, _ = qkv.shape
    parts = qkv.view(b, t, -1, group + 2, head_dim).permute(0, 2, 3, 1, 4)  # [B, units, g + 2, T, d]
    q = parts[:, :, :group].flatten(1, 2)
    return q, parts[:, :, group], parts[:, :, group + 1]


def grouped_attention(x, qkv, group: int, head_dim: int, mask, causal: bool, dropout: float,
                      need_probs: bool, cache=None, layer_idx: int = 0):  # fmt: skip
    """Attention of the fused projection ``qkv`` of ``x``: rotary q and k, the cache (holding one
    key/value per unit, GQA's memory saving) extended, each unit's k/v read by its ``group`` queries.
    Returns the context ``[B, heads, T, d]`` and the probabilities (or None)."""
    q, k, v = split_units(qkv, group, head_dim)
    start = cache.get_seq_length(layer_idx) if cache is not None else 0
    q, k = rotary(q, start), rotary(k, start)
    if cache is not None:
        k, v = cache.update(k, v, layer_idx)
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return attend(q, k, v, mask, causal, dropout, need_probs)


class ElmGroupedAttention(nn.Module):
    """Pre-RMSNorm grouped-query attention with rotary positions: ``x + O(attn(RMSNorm(x)))``."""

    def __init__(self, config, dim: int, num_heads: int, head_dim: int, share: str) -> None:
        super().__init__()
        self.group, self.head_dim = group_of(share), head_dim
        units = num_heads // self.group
        self.norm = RMSNorm(dim, config.layer_norm_eps)
        self.qkv = nn.Linear(dim, units * (self.group + 2) * head_dim)
        self.out = nn.Linear(num_heads * head_dim, dim)
        self.attn_dropout = config.attention_probs_dropout_prob
        self.dropout = Dropout(config.hidden_dropout_prob)
        self.config = config  # read at call time: set_attn_implementation("eager" | "sdpa")

    def forward(self, x, mask, causal: bool, output_attentions: bool = False, cache=None, layer_idx: int = 0):
        drop = self.attn_dropout if self.training else 0.0
        eager = getattr(self.config, "_attn_implementation", None) == "eager"
        ctx, probs = grouped_attention(x, self.qkv(self.norm(x)), self.group, self.head_dim, mask, causal, drop,
                                       output_attentions or eager, cache, layer_idx)  # fmt: skip
        ctx = ctx.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        return x + self.dropout(self.out(ctx)), probs if output_attentions else None


class ElmSwiGLU(nn.Module):
    """Pre-RMSNorm SwiGLU FFN: ``x + down(silu(gate(n)) * up(n))`` with ``n = RMSNorm(x)``."""

    def __init__(self, config, dim: int, ffn_dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, config.layer_norm_eps)
        self.gate = nn.Linear(dim, ffn_dim)
        self.up = nn.Linear(dim, ffn_dim)
        self.down = nn.Linear(ffn_dim, dim)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, x):
        n = self.norm(x)
        return x + self.dropout(self.down(F.silu(self.gate(n)) * self.up(n)))


def layer_parts(config, width: int, layer: dict):
    """The attention and FFNs of a llama layer of ``ElmLayer`` (the layout's one entry point)."""
    attention = ElmGroupedAttention(config, width, layer["num_heads"], layer["head_dim"], layer["share"])
    return attention, [ElmSwiGLU(config, width, layer["ffn_dim"]) for _ in range(layer.get("num_ffn", 1))]
