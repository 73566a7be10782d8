"""The teacher's own weights in one canonical form, and the statistics inheritance needs.

:func:`read_teacher` reads a post-LayerNorm BERT-family encoder (BERT, RoBERTa, ELECTRA, MiniLM:
``encoder.layer[i].attention.self.query`` ...), which is exactly the block an elm ``bert`` layer
computes; other teachers (GPT-2 and other pre-LN decoders) raise :class:`InheritError` and the
search falls back to random init. :func:`layer_forward` recomputes a teacher layer from its input
(tested equal to the teacher's own next hidden state), exposing what importance needs: each
head's contribution to the residual stream and each FFN neuron's activation.

:func:`collect_stats` runs over a few corpus batches and keeps, per teacher layer, the importance
of every head and FFN neuron and the second moments of every hidden state (for the shared basis,
MobileBERT bottleneck bases and the least-squares fits of shared attention).

[project decision] Importance = expected contribution to the residual stream: for a head, the
mean norm of ``ctx_h W_o,h^T`` over valid tokens; for an FFN neuron, ``mean |gelu(u_j)|`` times
the norm of its output column. DynaBERT uses gradients of a task loss, which a head-less
teacher (the default MiniLM) does not have; the contribution norm is the loss-free first-order
proxy, and it costs one teacher forward per batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .basis import Moments


class InheritError(ValueError):
    """A teacher whose weights cannot be inherited (one clear line naming it)."""


@dataclass
class TeacherLayer:
    """A post-LN transformer layer: ``a = LN1(x + O(attn(Q x, K x, V x)))``, ``y = LN2(a + D act(U a))``.

    Weights are ``[out, in]`` float32 tensors, heads laid out ``[head, head_dim]`` along Q/K/V rows
    and along the columns of ``o_w``.
    """

    q_w: Tensor
    q_b: Tensor
    k_w: Tensor
    k_b: Tensor
    v_w: Tensor
    v_b: Tensor
    o_w: Tensor
    o_b: Tensor
    ln1_w: Tensor
    ln1_b: Tensor
    up_w: Tensor
    up_b: Tensor
    down_w: Tensor
    down_b: Tensor
    ln2_w: Tensor
    ln2_b: Tensor
    num_heads: int
    eps: float = 1e-12

    @property
    def head_dim(self) -> int:
        return self.q_w.shape[0] // self.num_heads

    @property
    def hidden_size(self) -> int:
        return self.q_w.shape[1]


@dataclass
class TeacherEmbeddings:
    """``LN(word[id] + position[t] + token_type[type])`` (BERT embeddings, before dropout)."""

    word: Tensor
    position: Tensor
    token_type: Tensor | None
    ln_w: Tensor
    ln_b: Tensor
    eps: float = 1e-12


def _f32(t: Tensor) -> Tensor:
    return t.detach().to(device="cpu", dtype=torch.float32).clone()


def read_teacher(teacher) -> tuple[TeacherEmbeddings, list[TeacherLayer]]:
    """The embeddings and layers of a BERT-family teacher (CPU float32 copies)."""
    base = getattr(teacher.model, "base_model", teacher.model)
    config = teacher.model.config
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    emb = getattr(base, "embeddings", None)
    kind = getattr(config, "model_type", type(teacher.model).__name__)
    if teacher.causal or layers is None or emb is None or not hasattr(layers[0], "intermediate"):
        raise InheritError(
            f"teacher {teacher.name!r} (model_type {kind!r}) is not a post-LayerNorm BERT-family encoder; "
            f"weight inheritance supports BERT-style teachers (set inherit.enabled=false)"
        )
    hidden = int(config.hidden_size)
    if emb.word_embeddings.weight.shape[1] != hidden or getattr(base, "embeddings_project", None) is not None:
        raise InheritError(f"teacher {teacher.name!r} projects its embeddings into the hidden size (ELECTRA-style); "
                           f"inheritance needs embeddings at the hidden width (set inherit.enabled=false)")  # fmt: skip
    if getattr(emb.position_embeddings, "padding_idx", None) is not None:
        raise InheritError(f"teacher {teacher.name!r} offsets its position ids (RoBERTa-style); inheritance needs "
                           f"BERT-style positions 0..T-1 (set inherit.enabled=false)")  # fmt: skip
    act = getattr(config, "hidden_act", "gelu")
    if act != "gelu":
        raise InheritError(f"teacher {teacher.name!r} uses hidden_act={act!r}; inheritance needs gelu FFNs "
                           f"(elm's bert blocks use exact gelu); set inherit.enabled=false")  # fmt: skip
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        raise InheritError(f"teacher {teacher.name!r} has {config.position_embedding_type} position embeddings; "
                           f"inheritance needs absolute ones (set inherit.enabled=false)")  # fmt: skip
    heads, out = int(config.num_attention_heads), []
    for layer in layers:
        att = layer.attention
        modules = {"q": att.self.query, "k": att.self.key, "v": att.self.value, "o": att.output.dense,
                   "ln1": att.output.LayerNorm, "up": layer.intermediate.dense, "down": layer.output.dense,
                   "ln2": layer.output.LayerNorm}  # fmt: skip
        tensors = {f"{name}_{p}": _f32(getattr(m, w)) for name, m in modules.items()
                   for p, w in (("w", "weight"), ("b", "bias"))}  # fmt: skip
        out.append(TeacherLayer(**tensors, num_heads=heads, eps=float(att.output.LayerNorm.eps)))
    token_type = getattr(emb, "token_type_embeddings", None)
    embeddings = TeacherEmbeddings(
        word=_f32(emb.word_embeddings.weight),
        position=_f32(emb.position_embeddings.weight),
        token_type=_f32(token_type.weight) if token_type is not None else None,
        ln_w=_f32(emb.LayerNorm.weight),
        ln_b=_f32(emb.LayerNorm.bias),
        eps=float(emb.LayerNorm.eps),
    )
    return embeddings, out


def _heads(x: Tensor, w: Tensor, b: Tensor, heads: int) -> Tensor:
    """``x [B, T, H] -> [B, heads, T, d]`` through one projection."""
    y = F.linear(x, w.to(x), b.to(x))
    return y.view(*x.shape[:2], heads, -1).transpose(1, 2)


def layer_forward(layer: TeacherLayer, x: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
    """Recompute a teacher layer (eval mode) from its input ``x [B, T, H]``.

    Returns ``out`` (the layer's output), ``contrib`` (each head's contribution to the attention
    output, ``[B, heads, T, H]``), ``pre_ln1`` / ``attn_out`` (before / after the first LayerNorm),
    ``ffn_pre`` / ``ffn`` (the FFN's pre-activations and activations ``[B, T, F]``) and ``pre_ln2``
    (what the last LayerNorm normalises).
    """
    h = layer.num_heads
    q, k, v = (_heads(x, w, b, h) for w, b in ((layer.q_w, layer.q_b), (layer.k_w, layer.k_b), (layer.v_w, layer.v_b)))
    bias = None if mask is None else mask[:, None, None, :].bool()
    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # [B, h, T, d]
    o_w = layer.o_w.to(x).view(layer.hidden_size, h, -1)  # [H, h, d]
    contrib = torch.einsum("bhtd,ohd->bhto", ctx, o_w)
    pre1 = x + contrib.sum(1) + layer.o_b.to(x)
    a = F.layer_norm(pre1, (x.shape[-1],), layer.ln1_w.to(x), layer.ln1_b.to(x), layer.eps)
    u = F.linear(a, layer.up_w.to(x), layer.up_b.to(x))
    ffn = F.gelu(u)
    pre = a + F.linear(ffn, layer.down_w.to(x), layer.down_b.to(x))
    out = F.layer_norm(pre, (x.shape[-1],), layer.ln2_w.to(x), layer.ln2_b.to(x), layer.eps)
    return {"out": out, "contrib": contrib, "pre_ln1": pre1, "attn_out": a, "ffn_pre": u, "ffn": ffn,
            "pre_ln2": pre}  # fmt: skip


@dataclass
class TeacherStats:
    """What inheritance reads from the data, per teacher layer: importance and mean output of every
    head (``head_mean [heads, H]``) and FFN neuron (``neuron_mean [F]``, its mean GELU activation;
    ``neuron_mean_relu``: with ReLU, what a MobileBERT FFN computes), the second moments of every
    hidden state (index 0 = embeddings), of what each LayerNorm normalises (``pre_ln1``,
    ``pre_ln2``) and of the pre-LN embedding sums."""

    head_importance: list[Tensor] = field(default_factory=list)
    neuron_importance: list[Tensor] = field(default_factory=list)
    head_mean: list[Tensor] = field(default_factory=list)
    neuron_mean: list[Tensor] = field(default_factory=list)
    neuron_mean_relu: list[Tensor] = field(default_factory=list)
    hidden: list[Moments] = field(default_factory=list)
    pre_ln1: list[Moments] = field(default_factory=list)
    pre_ln2: list[Moments] = field(default_factory=list)
    embedding_sum: Moments | None = None
    tokens: int = 0


def embedding_sum(emb: TeacherEmbeddings, input_ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
    """The teacher's pre-LayerNorm embedding sum ``word + position (+ token type)`` ``[B, T, H]``."""
    ids = input_ids.cpu()
    z = emb.word[ids] + emb.position[: ids.shape[1]]
    if emb.token_type is not None:
        z = z + (emb.token_type[token_type_ids.cpu()] if token_type_ids is not None else emb.token_type[0])
    return z


@torch.no_grad()
def hidden_moments(teacher, batches) -> list[Moments]:
    """Second moments of every teacher hidden state over the valid tokens of ``batches`` (any teacher)."""
    moments: list[Moments] = []
    for batch in batches:
        valid = batch["attention_mask"].bool().cpu()
        states = teacher(batch["input_ids"], batch["attention_mask"]).hidden_states
        if not moments:
            moments = [Moments.zeros(h.shape[-1]) for h in states]
        for m, h in zip(moments, states, strict=True):
            m.add(h.float().cpu()[valid])
    return moments


@torch.no_grad()
def collect_stats(teacher, embeddings: TeacherEmbeddings, layers: list[TeacherLayer], batches) -> TeacherStats:
    """Importance and moments over ``batches`` (dicts with ``input_ids``, ``attention_mask``)."""
    hidden_size = layers[0].hidden_size
    def zeros(*shape: int) -> list[Tensor]:
        return [torch.zeros(*shape, dtype=torch.float64) for _ in layers]

    ffn = layers[0].up_w.shape[0]
    stats = TeacherStats(
        head_importance=zeros(layers[0].num_heads), head_mean=zeros(layers[0].num_heads, hidden_size),
        neuron_importance=zeros(ffn), neuron_mean=zeros(ffn), neuron_mean_relu=zeros(ffn),
        hidden=[Moments.zeros(hidden_size) for _ in range(len(layers) + 1)], embedding_sum=Moments.zeros(hidden_size),
        pre_ln1=[Moments.zeros(hidden_size) for _ in layers], pre_ln2=[Moments.zeros(hidden_size) for _ in layers],
    )  # fmt: skip
    for batch in batches:
        mask = batch["attention_mask"]
        valid = mask.bool().cpu()
        states = [h.float().cpu() for h in teacher(batch["input_ids"], mask).hidden_states]
        stats.embedding_sum.add(embedding_sum(embeddings, batch["input_ids"])[valid])
        for t, h in enumerate(states):
            stats.hidden[t].add(h[valid])
        for t, layer in enumerate(layers):
            parts = layer_forward(layer, states[t], mask.cpu())
            contrib = parts["contrib"].permute(0, 2, 1, 3)[valid].double()  # [N, heads, H]
            stats.head_importance[t] += contrib.norm(dim=-1).sum(0)
            stats.head_mean[t] += contrib.sum(0)
            act = parts["ffn"][valid].double()
            stats.neuron_importance[t] += act.abs().sum(0) * layer.down_w.norm(dim=0).double()
            stats.neuron_mean[t] += act.sum(0)
            stats.neuron_mean_relu[t] += parts["ffn_pre"][valid].double().clamp_min(0).sum(0)
            stats.pre_ln1[t].add(parts["pre_ln1"][valid])
            stats.pre_ln2[t].add(parts["pre_ln2"][valid])
        stats.tokens += int(valid.sum())
    n = max(stats.tokens, 1)
    for name in ("head_importance", "head_mean", "neuron_importance", "neuron_mean", "neuron_mean_relu"):
        setattr(stats, name, [(v / n).float() for v in getattr(stats, name)])
    return stats
