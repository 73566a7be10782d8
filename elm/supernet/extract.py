"""Materialise the supernet's active path as a standalone ``transformers`` model.

Copies the active slices of every chosen candidate (heads prefix, FFN width prefix) and the
embeddings into an ``ElmModel``-based class; the result computes the same function as
``Supernet.forward`` (tested to 1e-5 for every block type, sharing mode, causal or not).
"""

from __future__ import annotations

import torch
from torch import nn

from ..modeling import ElmModel, config_from_arch
from ..modeling.modeling_elm import ElmLayer
from .elastic import CandidateBlock, ElasticAttention, ElasticLinear
from .supernet import Supernet


def copy_linear(dst: nn.Linear, src: ElasticLinear, out_features: int, in_features: int) -> None:
    """The active ``[out_features, in_features]`` slice of ``src`` into ``dst`` (families' copy hooks use it)."""
    dst.weight.copy_(src.weight[:out_features, :in_features])
    dst.bias.copy_(src.bias[:out_features])


def copy_attention(dst, src: ElasticAttention) -> None:
    """The active heads of ``src`` (fused QKV, output, norm) into a static attention module."""
    w, b = src.qkv_weight()
    dst.qkv.weight.copy_(w)
    dst.qkv.bias.copy_(b)
    copy_linear(dst.out, src.out, src.dim, src.active_heads * src.head_dim)
    dst.norm.load_state_dict(src.norm.state_dict())


@torch.no_grad()
def copy_candidate(dst: ElmLayer, src: CandidateBlock) -> None:
    """Copy a candidate's active weights into a standalone layer of the same configuration (a
    family with its own candidate class copies itself: ``copy_into``)."""
    if hasattr(src, "copy_into"):
        src.copy_into(dst)
        return
    if src.bottleneck:
        h, b = src.hidden_size, src.bottleneck_size
        copy_linear(dst.bottleneck_in, src.bottleneck_in, b, h)
        copy_linear(dst.bottleneck_out, src.bottleneck_out, h, b)
        dst.norm_in.load_state_dict(src.norm_in.state_dict())
        dst.norm_out.load_state_dict(src.norm_out.state_dict())
    copy_attention(dst.attention, src.attention)
    for d, s in zip(dst.ffns, src.ffns, strict=True):
        width = s.up.weight.shape[1]
        copy_linear(d.up, s.up, s.active_dim, width)
        copy_linear(d.down, s.down, width, s.active_dim)
        d.norm.load_state_dict(s.norm.state_dict())


@torch.no_grad()
def extract(supernet: Supernet, model_cls: type = ElmModel, choice: list[int] | None = None, **config_kwargs):
    """A ``model_cls`` (``ElmModel``, ``ElmForMaskedLM``, ...) holding the active subnet's weights.

    Heads that the supernet does not have (LM or classifier heads) keep their fresh init.
    """
    if choice is not None:
        supernet.set_active(choice)
    arch = supernet.active_arch()
    config_kwargs.setdefault("hidden_dropout_prob", supernet.space.dropout)
    space = supernet.space
    attention = space.dropout if space.attention_dropout is None else space.attention_dropout
    config_kwargs.setdefault("attention_probs_dropout_prob", attention)
    config_kwargs.setdefault("pad_token_id", supernet.pad_token_id)
    model = model_cls(config_from_arch(arch, **config_kwargs))
    backbone = model if isinstance(model, ElmModel) else model.elm
    backbone.embeddings.load_state_dict(supernet.embeddings.state_dict())
    for dst, li in enumerate(supernet.kept_layers()):  # identity candidates leave no layer
        copy_candidate(backbone.layers[dst], supernet.layers[li][supernet.active[li]])
    return model
