"""The llama family's elastic candidate (:mod:`elm.blocks.llama`): the supernet twin of
``elm.blocks.llama_layer`` (same sub-module names, same function on the active slices).

Elastic like the BERT families' candidates: stored units are a prefix-sliced maximum, pruning
permutes whole key/value groups to the front, growth activates FFN units. The analysis reads it
through the same attributes as ``elm.supernet.elastic.CandidateBlock``: ``attention.active_heads``
and ``attention.head_dim`` count and size *units* (a key/value head with its ``group`` queries),
``attention.last_context`` is ``[B, units, T, group * head_dim]`` and ``ffns[0].last_hidden`` is the
gated activation ``silu(gate) * up`` that the PCA score reads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling.modeling_elm import Dropout, ElmLayer, attention_bias
from ..space import LayerConfig
from ..supernet.elastic import CandidateBlock, ElasticAttention, ElasticFFN, ElasticLinear
from ..supernet.extract import copy_attention, copy_linear
from ..supernet.inherit import fit_linear
from .llama_layer import RMSNorm, group_of, grouped_attention

EPS = 1e-12  # ElmConfig.layer_norm_eps's default, which the exported layer's RMSNorms take


class ElasticGroupedAttention(ElasticAttention):
    """Pre-RMSNorm grouped-query attention with rotary positions over ``max_heads // group`` stored
    units; ``active_heads`` counts active units (see the module doc)."""

    def __init__(self, dim: int, max_heads: int, head_dim: int, share: str, dropout: float,
                 attention_dropout: float | None = None) -> None:  # fmt: skip
        nn.Module.__init__(self)
        self.group, self.query_dim, self.share = group_of(share), head_dim, share
        self.dim, self.max_heads, self.head_dim = dim, max_heads // self.group, self.group * head_dim
        self.projections = 1  # (one row block per unit: [group queries, key, value] x head_dim)
        self.norm = RMSNorm(dim, EPS)
        self.qkv = ElasticLinear(dim, self.max_heads * (self.group + 2) * head_dim)
        self.out = ElasticLinear(self.max_heads * self.head_dim, dim)
        self.dropout = Dropout(dropout)
        self.attn_dropout = dropout if attention_dropout is None else attention_dropout
        self.active_heads = self.max_heads
        self.capture, self.last_context = False, None

    def qkv_rows(self, perm: torch.Tensor) -> torch.Tensor:
        rows = (self.group + 2) * self.query_dim
        return perm[:, None] * rows + torch.arange(rows)

    def qkv_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.active_heads * (self.group + 2) * self.query_dim
        return self.qkv.weight[:rows], self.qkv.bias[:rows]

    def forward(self, x, mask, causal: bool, output_attentions: bool = False):
        w, b = self.qkv_weight()
        drop = self.attn_dropout if self.training else 0.0
        ctx, probs = grouped_attention(x, F.linear(self.norm(x), w, b), self.group, self.query_dim, mask, causal,
                                       drop, output_attentions)  # fmt: skip
        if self.capture:  # per unit: its queries' contexts side by side
            units = ctx.detach().unflatten(1, (self.active_heads, self.group))  # [B, u, g, T, d]
            self.last_context = units.permute(0, 1, 3, 2, 4).flatten(3)
        ctx = ctx.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        return x + self.dropout(self.out(ctx, in_features=self.active_heads * self.head_dim)), probs


class ElasticSwiGLU(ElasticFFN):
    """Pre-RMSNorm SwiGLU FFN ``x + down(silu(gate(n)) * up(n))`` with elastic width."""

    def __init__(self, dim: int, max_dim: int, active_dim: int, block: str, dropout: float) -> None:
        super().__init__(dim, max_dim, active_dim, block, dropout, EPS)
        self.gate = ElasticLinear(dim, max_dim)
        self.norm = RMSNorm(dim, EPS)

    def input_projections(self) -> list[ElasticLinear]:
        return [self.gate, self.up]

    def forward(self, x):
        n, a = self.norm(x), self.active_dim
        hidden = F.silu(self.gate(n, out_features=a)) * self.up(n, out_features=a)
        if self.capture:
            self.last_hidden = hidden.detach()
        return x + self.dropout(self.down(hidden, in_features=a))


class LlamaCandidate(CandidateBlock):
    """A llama candidate of a supernet layer: elastic grouped attention and one elastic SwiGLU FFN."""

    def __init__(self, block: str, hidden_size: int, max_heads: int, head_dim: int, share: str, ffn_init: int,
                 ffn_max: int, dropout: float = 0.1, attention_dropout: float | None = None) -> None:  # fmt: skip
        nn.Module.__init__(self)
        self.block, self.hidden_size, self.share, self.identity = block, hidden_size, share, False
        self.bottleneck, self.bottleneck_size = False, None
        self.attention = ElasticGroupedAttention(hidden_size, max_heads, head_dim, share, dropout,
                                                 attention_dropout)  # fmt: skip
        self.ffns = nn.ModuleList([ElasticSwiGLU(hidden_size, ffn_max, ffn_init, block, dropout)])
        self.layer_config().validate(hidden_size)

    forward = ElmLayer.forward  # the exported layer's function (no bottleneck: attention, then the FFN)

    def layer_config(self, num_heads: int | None = None, ffn_dim: int | None = None) -> LayerConfig:
        attn = self.attention
        return LayerConfig(block=self.block, num_heads=num_heads or attn.active_heads * attn.group,
                           head_dim=attn.query_dim, ffn_dim=ffn_dim or self.ffn_dim, num_ffn=1, share=self.share)  # fmt: skip

    @torch.no_grad()
    def copy_into(self, dst: nn.Module) -> None:
        """The active slices into an exported llama layer (``ElmGroupedAttention`` + ``ElmSwiGLU``)."""
        copy_attention(dst.attention, self.attention)
        ffn, to, h = self.ffns[0], dst.ffns[0], self.hidden_size
        copy_linear(to.gate, ffn.gate, ffn.active_dim, h)
        copy_linear(to.up, ffn.up, ffn.active_dim, h)
        copy_linear(to.down, ffn.down, h, ffn.active_dim)
        to.norm.load_state_dict(ffn.norm.state_dict())

    @torch.no_grad()
    def inherit_from(self, src) -> dict[str, bool]:
        """Take the inputs of the block from the teacher layer of ``src`` (an
        ``elm.supernet.inherit.LayerSource``); :meth:`fit_to_teacher`, which inheritance runs next,
        fits its two residual writers (attention output, FFN down projection and their biases), its
        FFN RMSNorm gain and the units' means.

        [project decision] A post-LN teacher layer has no exact pre-norm equivalent, so this is a
        close start, not the teacher's function:
        * attention: unit ``u`` takes the ``group`` teacher heads ranked ``u*g .. u*g + g - 1`` as its
          queries and the mean of their keys and of their values as its key and value (the
          mean-pooling GQA conversion of Ainslie et al., 2023); the RMSNorm gain is the input's
          RMS, so the attention reads the teacher state's scale;
        * FFN: the ranked teacher neurons, ``gate`` = the teacher's input weights and ``up`` = zero
          weights with bias 1, so ``silu(gate) * up`` starts as SiLU of the teacher's
          pre-activation (close to its GELU); their output columns are the teacher's (the scale
          :meth:`fit_to_teacher` adjusts for the units not active yet).
        """
        layer, attn = src.layer, self.attention
        done = attn.query_dim == layer.head_dim and attn.dim == layer.hidden_size
        if done:
            g, d = attn.group, attn.query_dim
            order = src.heads.tolist()
            fused = attn.qkv.weight.view(attn.max_heads, g + 2, d, attn.dim)
            bias = attn.qkv.bias.view(attn.max_heads, g + 2, d)
            for u in range(min(attn.max_heads, len(order) // g)):
                rows = [slice(h * d, (h + 1) * d) for h in order[u * g : (u + 1) * g]]
                for i, r in enumerate(rows):
                    fused[u, i], bias[u, i] = layer.q_w[r], layer.q_b[r]
                for j, (w, b) in enumerate(((layer.k_w, layer.k_b), (layer.v_w, layer.v_b)), start=g):
                    fused[u, j] = torch.stack([w[r] for r in rows]).mean(0)
                    bias[u, j] = torch.stack([b[r] for r in rows]).mean(0)
            power = float(src.inputs.sum_xx.trace()) / max(src.inputs.count, 1) / attn.dim
            attn.norm.weight.fill_(math.sqrt(max(power, 1e-12)))
        ffn = self.ffns[0]
        n = min(ffn.max_dim, src.neurons.numel())
        idx = src.neurons[:n]
        ffn.gate.weight[:n], ffn.gate.bias[:n] = layer.up_w[idx], layer.up_b[idx]
        ffn.up.weight[:n], ffn.up.bias[:n] = 0, 1
        ffn.down.weight[:, :n] = layer.down_w[:, idx]
        ffn.down.weight[:, n:] = 0
        ffn.inherited[:n] = True
        return {"attention": done, "ffn": True}

    @torch.no_grad()
    def fit_to_teacher(self, states) -> None:
        """Fit the two residual writers to the teacher's states, after :meth:`inherit_from`.

        ``states`` yields ``(x, a, y, valid)`` in the student's coordinates: the block's input, the
        teacher layer's first LayerNorm output (what its FFN reads), the block's target state and the
        valid-token mask. [project decision] The teacher's output weights were trained to be followed
        by a LayerNorm that a pre-norm block does not have, so as they are they start the block far
        from its target (worse than random init on MiniLM). Instead, by ridge least squares:
        the attention output so that ``x + attn(x) ~= a``; the FFN's RMSNorm gain is the mean RMS of
        ``a``, so the inherited gate reads about what the teacher's FFN read; the down projection of
        the active units so that the block's output ``~= y``. Inherited units that are not active yet
        keep the teacher's output columns, scaled like the fitted active ones, and each inherited
        unit's measured mean activation (``unit_mean``) is what growth takes out of the bias."""
        was, attn, ffn = self.training, self.attention, self.ffns[0]
        self.eval()
        masks = [attention_bias(valid, False, x.shape[1]) for x, _, _, valid in states]
        attn.capture = True

        def contexts():
            for (x, a, _, valid), mask in zip(states, masks, strict=True):
                attn(x, mask, False)
                yield attn.last_context.permute(0, 2, 1, 3).flatten(2)[valid], (a - x)[valid]

        fit_linear(attn.out, contexts(), attn.active_heads * attn.head_dim)
        attn.capture, attn.last_context = False, None
        hidden = [attn(x, mask, False)[0] for (x, *_), mask in zip(states, masks, strict=True)]
        rms = torch.cat([a[valid].pow(2).mean(-1) for _, a, _, valid in states]).mean().sqrt()
        ffn.norm.weight.fill_(float(rms))

        def gated(h, units: int):
            n = ffn.norm(h)
            return F.silu(F.linear(n, ffn.gate.weight[:units], ffn.gate.bias[:units])) * \
                F.linear(n, ffn.up.weight[:units], ffn.up.bias[:units])  # fmt: skip

        inherited, active = int(ffn.inherited.sum()), ffn.active_dim  # (inherited units are a prefix)
        if inherited:
            ffn.unit_mean[:inherited] = torch.cat([gated(h, inherited)[s[3]] for h, s in zip(hidden, states)]).mean(0)
        before = ffn.down.weight[:, :active].norm()
        fit_linear(ffn.down, ((gated(h, active)[v], (y - h)[v]) for h, (_, _, y, v) in zip(hidden, states)), active)
        ffn.down.weight[:, active:inherited] *= ffn.down.weight[:, :active].norm() / before.clamp_min(1e-12)
        self.train(was)
