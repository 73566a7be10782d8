"""Elastic modules (once-for-all style): max-size weights, computation on the active slice.

They know nothing about search policy: the trainer calls ``grow_ffn`` / ``keep_heads``; the
modules only slice, re-initialise and permute. Every parameter is allocated at its maximum size
up front, so DDP and the optimiser never see a new parameter (growth only changes slices).

Active heads are always a prefix of the stored heads: pruning a head permutes the weights
(and the optimiser's per-parameter state) so the kept heads come first. Slicing a prefix is a
view, so the hot path has no per-head Python loop and no gather.

The sub-module names mirror ``elm.modeling.modeling_elm.ElmLayer`` so extraction is a copy of
the active slices (``elm.supernet.extract``).

``compact_()`` cuts a module down to its active part, for the bf16 replica the optimiser never sees
(``elm.utils.master``): the replica then computes on contiguous weights of the active size, and
its gradients are the size of the active slices instead of zero-padded maxima.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..blocks import family
from ..modeling.modeling_elm import ACTIVATIONS, Dropout, ElmLayer, attend, split_qkv
from ..space import LayerConfig
from ..utils.master import Index, take


class ElasticLinear(nn.Module):
    """``nn.Linear`` holding [out_max, in_max] weights; ``forward`` uses ``weight[:out, :in]``."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor, out_features: int | None = None, in_features: int | None = None):
        w = self.weight[:out_features, :in_features]
        return F.linear(x, w, self.bias[:out_features])

    @torch.no_grad()
    def keep_(self, rows: slice | torch.Tensor = slice(None), cols: slice = slice(None)) -> dict[str, Index]:
        """Keep only ``weight[rows][:, cols]`` and ``bias[rows]`` (``rows``: a prefix slice, or row
        indices), as contiguous copies; returns where each kept parameter lies in the full one."""
        kept = {"weight": (rows, cols), "bias": (rows,)}
        for name, index in kept.items():
            old = getattr(self, name)
            setattr(self, name, nn.Parameter(take(old, index).clone(memory_format=torch.contiguous_format),
                                             requires_grad=old.requires_grad))
        return kept


def compacted(parts: dict[str, dict[str, Index]]) -> dict[str, Index]:
    """``{child: {param: index}}`` -> ``{"child.param": index}`` (what ``compact_`` returns)."""
    return {f"{child}.{name}": index for child, kept in parts.items() for name, index in kept.items()}


def _reset_state(optimizer: torch.optim.Optimizer | None, param: nn.Parameter, index) -> None:
    """Zero the optimiser's running statistics of ``param[index]`` (e.g. Adam moments)."""
    if optimizer is None or param not in optimizer.state:
        return
    for value in optimizer.state[param].values():
        if torch.is_tensor(value) and value.shape == param.shape:
            value[index] = 0


def _permute_(optimizer: torch.optim.Optimizer | None, param: nn.Parameter, perm: torch.Tensor, dim: int):
    """Permute ``param`` along ``dim`` in place, and its optimiser state with it."""
    tensors = [param.data]
    if optimizer is not None and param in optimizer.state:
        tensors += [v for v in optimizer.state[param].values() if torch.is_tensor(v) and v.shape == param.shape]
    for t in tensors:
        t.copy_(t.index_select(dim, perm.to(t.device)))


class ElasticAttention(nn.Module):
    """Self-attention with ``max_heads`` stored heads of ``head_dim`` and ``active_heads`` in use.

    The fused projection stores its rows as [projection, head, head_dim] (2 projections when
    Q=V or K=V are shared, else 3), exactly the layout of ``ElmAttention.qkv``.
    """

    def __init__(self, dim: int, max_heads: int, head_dim: int, share: str, dropout: float, eps: float,
                 attention_dropout: float | None = None):  # fmt: skip
        super().__init__()
        self.dim, self.max_heads, self.head_dim, self.share = dim, max_heads, head_dim, share
        self.projections = 3 if share == "none" else 2
        self.qkv = ElasticLinear(dim, self.projections * max_heads * head_dim)
        self.out = ElasticLinear(max_heads * head_dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.dropout = Dropout(dropout)
        self.attn_dropout = dropout if attention_dropout is None else attention_dropout
        self.active_heads = max_heads
        self.capture = False  # when True, keep the per-head context of the last call (for CKA)
        self.last_context: torch.Tensor | None = None

    def get_extra_state(self) -> dict[str, int]:  # saved with the weights: pruning changes it
        return {"active_heads": self.active_heads}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.active_heads = int(state["active_heads"])

    def qkv_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        h, n, d = self.active_heads, self.projections, self.head_dim
        w = self.qkv.weight.view(n, self.max_heads, d, self.dim)[:, :h].reshape(n * h * d, self.dim)
        b = self.qkv.bias.view(n, self.max_heads, d)[:, :h].reshape(-1)
        return w, b

    def forward(self, x, mask, causal: bool, output_attentions: bool = False):
        w, b = self.qkv_weight()
        q, k, v = split_qkv(F.linear(x, w, b), self.share, self.active_heads, self.head_dim)
        drop = self.attn_dropout if self.training else 0.0
        ctx, probs = attend(q, k, v, mask, causal, drop, output_attentions)
        if self.capture:
            self.last_context = ctx.detach()
        ctx = ctx.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        out = self.out(ctx, in_features=self.active_heads * self.head_dim)
        return self.norm(x + self.dropout(out)), probs

    @torch.no_grad()
    def keep_heads(self, heads: list[int], optimizer: torch.optim.Optimizer | None = None) -> None:
        """Keep the given active heads (in that order) and drop the others from the active set."""
        active = list(range(self.active_heads))
        if not heads or any(h not in active for h in heads) or len(set(heads)) != len(heads):
            raise ValueError(f"heads {heads} must be distinct active heads of {active}")
        perm = torch.tensor(list(heads) + [h for h in range(self.max_heads) if h not in heads])
        rows = self.qkv_rows(perm).flatten()
        _permute_(optimizer, self.qkv.weight, rows, 0)
        _permute_(optimizer, self.qkv.bias, rows, 0)
        cols = (perm[:, None] * self.head_dim + torch.arange(self.head_dim)).flatten()
        _permute_(optimizer, self.out.weight, cols, 1)
        self.active_heads = len(heads)

    @torch.no_grad()
    def compact_(self) -> dict[str, Index]:
        """Cut to the active heads (a compute replica's module only: see the module doc)."""
        h = self.active_heads
        rows = self.qkv_rows(torch.arange(h)).flatten()
        rows = slice(0, len(rows)) if torch.equal(rows, torch.arange(len(rows))) else rows.to(self.qkv.weight.device)
        parts = {"qkv": self.qkv.keep_(rows), "out": self.out.keep_(cols=slice(0, h * self.head_dim))}
        self.max_heads = h
        return compacted(parts)

    def qkv_rows(self, perm: torch.Tensor) -> torch.Tensor:
        """Rows of the fused projection in head order ``perm`` (layout [projection, head, head_dim])."""
        d, n = self.head_dim, self.projections
        return (torch.arange(n)[:, None, None] * self.max_heads + perm[None, :, None]) * d + torch.arange(d)


class ElasticFFN(nn.Module):
    """FFN with ``max_dim`` stored units and ``active_dim`` in use (``ElmFFN`` layout)."""

    def __init__(self, dim: int, max_dim: int, active_dim: int, block: str, dropout: float, eps: float):
        super().__init__()
        if not 1 <= active_dim <= max_dim:
            raise ValueError(f"active FFN width {active_dim} must be in [1, {max_dim}]")
        self.up = ElasticLinear(dim, max_dim)
        self.down = ElasticLinear(max_dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.dropout = Dropout(dropout)
        self.act = ACTIVATIONS[family(block).activation]
        self.max_dim, self.active_dim = max_dim, active_dim
        self.capture = False  # when True, keep the intermediate activations of the last call (for PCA)
        self.last_hidden: torch.Tensor | None = None
        # units holding weights inherited from the teacher: growth activates them as they are; while
        # inactive, their mean output (teacher's mean activation ``unit_mean`` x output column) is
        # folded into ``down.bias`` (mean compensation), and taken out again when they are grown
        self.register_buffer("inherited", torch.zeros(max_dim, dtype=torch.bool))
        self.register_buffer("unit_mean", torch.zeros(max_dim))
        with torch.no_grad():
            self.down.weight[:, active_dim:] = 0

    def get_extra_state(self) -> dict[str, int]:  # saved with the weights: growth changes it
        return {"active_dim": self.active_dim}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.active_dim = int(state["active_dim"])

    def forward(self, x):
        hidden = self.act(self.up(x, out_features=self.active_dim))
        if self.capture:
            self.last_hidden = hidden.detach()
        return self.norm(x + self.dropout(self.down(hidden, in_features=self.active_dim)))

    def input_projections(self) -> list[ElasticLinear]:
        """The projections that give a unit its input weights (fresh ones are drawn on growth)."""
        return [self.up]

    @torch.no_grad()
    def compact_(self) -> dict[str, Index]:
        """Cut to the active units (a compute replica's module only: see the module doc)."""
        units, inputs = slice(0, self.active_dim), self.input_projections()
        parts = {name: m.keep_(rows=units) for name, m in self.named_children() if any(m is p for p in inputs)}
        parts["down"] = self.down.keep_(cols=units)
        self.max_dim = self.active_dim
        return compacted(parts)

    @torch.no_grad()
    def grow(self, new_dim: int, optimizer: torch.optim.Optimizer | None = None, std: float = 0.02,
             generator: torch.Generator | None = None) -> None:  # fmt: skip
        """Activate units [active_dim, new_dim). Units inherited from the teacher (the next most
        important teacher neurons) start as they are; others get fresh input weights and zero output
        weights, so they leave the block's output unchanged at the moment of growth. The optimiser
        state of every new unit is reset. ``generator`` (a CPU generator) draws the fresh weights, so
        every rank of a distributed run, and a resumed run, draws the same ones."""
        if not self.active_dim <= new_dim <= self.max_dim:
            raise ValueError(f"cannot grow FFN from {self.active_dim} to {new_dim} (max {self.max_dim})")
        new = slice(self.active_dim, new_dim)
        units = torch.arange(self.max_dim, device=self.inherited.device)[new]
        fresh, kept = units[~self.inherited[new]], units[self.inherited[new]]
        self.down.bias -= self.down.weight[:, kept] @ self.unit_mean[kept]  # they now speak for themselves
        for linear in self.input_projections():  # (SwiGLU: the gate, then up)
            noise = torch.randn(len(fresh), linear.weight.shape[1], generator=generator)
            linear.weight[fresh] = noise.to(linear.weight) * std
            linear.bias[fresh] = 0
            _reset_state(optimizer, linear.weight, new)
            _reset_state(optimizer, linear.bias, new)
        self.down.weight[:, fresh] = 0
        _reset_state(optimizer, self.down.weight, (slice(None), new))
        self.active_dim = new_dim


class CandidateBlock(nn.Module):
    """One candidate of a supernet layer: a block of a registered family (``elm.blocks``: BERT, or
    MobileBERT behind its bottleneck) with elastic heads and FFN."""

    def __init__(
        self,
        block: str,
        hidden_size: int,
        max_heads: int,
        head_dim: int,
        share: str,
        ffn_init: int,
        ffn_max: int,
        num_ffn: int = 1,
        bottleneck_size: int | None = None,
        dropout: float = 0.1,
        eps: float = 1e-12,
        attention_dropout: float | None = None,
    ) -> None:
        super().__init__()
        self.block, self.hidden_size, self.share, self.identity = block, hidden_size, share, False
        self.bottleneck = family(block).bottleneck  # read by the shared forward (ElmLayer.forward)
        self.bottleneck_size = bottleneck_size if self.bottleneck else None
        width = bottleneck_size if self.bottleneck else hidden_size
        if self.bottleneck:
            self.bottleneck_in = ElasticLinear(hidden_size, width)
            self.norm_in = nn.LayerNorm(width, eps=eps)
            self.bottleneck_out = ElasticLinear(width, hidden_size)
            self.norm_out = nn.LayerNorm(hidden_size, eps=eps)
            self.dropout = Dropout(dropout)
        self.attention = ElasticAttention(width, max_heads, head_dim, share, dropout, eps, attention_dropout)
        self.ffns = nn.ModuleList(ElasticFFN(width, ffn_max, ffn_init, block, dropout, eps) for _ in range(num_ffn))
        self.layer_config().validate(hidden_size)

    @property
    def name(self) -> str:
        return self.block if self.share == "none" else f"{self.block}.{self.share}"

    # the very same block function as the exported layer (sub-module names match), so the
    # extracted model computes what the supernet computed
    forward = ElmLayer.forward

    @property
    def ffn_dim(self) -> int:
        return self.ffns[0].active_dim

    def grow_ffn(self, new_dim: int, optimizer=None, generator: torch.Generator | None = None) -> None:
        for ffn in self.ffns:  # stacked MobileBERT FFNs share one width
            ffn.grow(new_dim, optimizer, generator=generator)

    def set_capture(self, on: bool) -> None:
        self.attention.capture = on
        self.ffns[0].capture = on
        if not on:
            self.attention.last_context = None
            self.ffns[0].last_hidden = None

    def layer_config(self, num_heads: int | None = None, ffn_dim: int | None = None) -> LayerConfig:
        """The active configuration (or a hypothetical one with other heads/width) as a LayerConfig."""
        return LayerConfig(
            block=self.block,  # type: ignore[arg-type]
            num_heads=num_heads or self.attention.active_heads,
            head_dim=self.attention.head_dim,
            ffn_dim=ffn_dim or self.ffn_dim,
            num_ffn=len(self.ffns),
            bottleneck_size=self.bottleneck_size,
            share=self.share,  # type: ignore[arg-type]
        )

    def num_parameters(self) -> int:
        return self.layer_config().num_parameters(self.hidden_size)


class IdentityCandidate(nn.Module):
    """The candidate of an identity family (``skip``): passes its input on; no parameters, nothing
    elastic. Choosing it removes the layer from the architecture (``Supernet.active_arch``)."""

    identity, bottleneck, bottleneck_size, share, ffn_dim = True, False, None, "none", 0

    def __init__(self, block: str, hidden_size: int) -> None:
        super().__init__()
        self.block, self.hidden_size = block, hidden_size

    @property
    def name(self) -> str:
        return self.block

    def forward(self, x, mask=None, causal: bool = False, output_attentions: bool = False):  # noqa: ARG002
        return x, None

    def layer_config(self, num_heads: int | None = None, ffn_dim: int | None = None) -> LayerConfig:  # noqa: ARG002
        return LayerConfig(block=self.block, num_heads=0, head_dim=0, ffn_dim=0, num_ffn=0, share="none")

    def num_parameters(self) -> int:
        return 0


def uniform_layer_map(num_student: int, num_teacher: int) -> list[int]:
    """Teacher hidden-state indices for the student layers, spread uniformly (TinyBERT-style).

    Returns ``num_student + 1`` indices into the teacher's ``hidden_states`` (0 = embeddings):
    student layer l reads teacher state ``m[l]`` and is distilled towards ``m[l + 1]``.
    """
    if num_student < 1 or num_teacher < 1:
        raise ValueError(f"layer counts must be positive, got student={num_student}, teacher={num_teacher}")
    return [round(i * num_teacher / num_student) for i in range(num_student + 1)]
