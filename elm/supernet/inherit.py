"""Start the supernet from its teacher (method doc §10; issue "Students worth using").

[project decision] Every candidate starts from its mapped teacher layer, in the shared basis
(:mod:`elm.supernet.basis`), with its heads and FFN neurons ranked by importance
(:mod:`elm.supernet.teacher_weights`) and laid out most important first. Elastic widths are
prefixes, so the active heads are the most important teacher heads and PCA growth activates the
next most important teacher neurons, which wait, inherited, in the stored slice (DynaBERT's
rewiring; once-for-all sorts channels the same way before shrinking).

* **bert** candidate, student width == teacher width: the teacher layer itself, sliced. With all
  heads and neurons it computes the teacher layer exactly (tested). Narrower student: the teacher
  weights in the basis, ``W P`` on inputs and ``P^T W`` on outputs; a LayerNorm's gain becomes the
  diagonal of ``P^T diag(g) P`` times the ratio of its input's per-coordinate RMS over the basis
  coordinates to that over all the teacher's coordinates (measured on the teacher's own LayerNorm
  inputs: a LayerNorm divides by that RMS), its bias ``P^T (b - mean)``, and residual writers add
  ``P^T mean`` so the LayerNorm sees the teacher's (centred) input.
* **shared attention** (``qv``: Q serves as V; ``kv``: K serves as V): the attention pattern is
  the teacher's exactly (Q and K are kept); per head, the value is refitted by least squares as an
  affine function of the shared projection (``v ~= s M + c`` over the teacher's inputs), and the
  output projection absorbs ``M`` and ``c`` (attention rows sum to one, so ``c`` is a bias).
* **mobilebert** candidate: its own PCA basis of the layer's input at the bottleneck width
  (``bottleneck_in`` = that projection, ``norm_in`` restores the input's scale); inside, attention
  and the stacked FFNs are the teacher layer in that basis, the FFNs splitting the ranked neurons
  between them (interleaved, so every FFN's prefix holds important neurons; their mean
  compensation uses the neurons' ReLU means, as MobileBERT FFNs use ReLU); ``bottleneck_out`` is
  fitted by least squares to what the teacher's layer adds to its input, and ``norm_out`` is the
  LayerNorm of the last teacher layer of the span.
* **embeddings**: the teacher's word, position and type embeddings through one PCA basis of their
  (occurrence-weighted) sums when the factorised size is smaller, and the teacher's LayerNorm.

Heads whose width differs from the teacher's (e.g. ``space.families.mobilebert.head_dim`` = 33 under a
32-wide teacher) keep their random init; so do LM/classifier heads (not in the supernet) and the
layers of a student deeper than its teacher whose span of teacher layers is empty (their target
is their input). Stored heads or units the teacher cannot fill start switched off (zero output).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from .basis import Basis, Moments, principal_directions
from .elastic import CandidateBlock, ElasticAttention, ElasticFFN
from .teacher_weights import TeacherEmbeddings, TeacherLayer, TeacherStats

log = logging.getLogger("elm.supernet")
RIDGE = 1e-6  # relative ridge of the shared-value least squares (scaled by the mean feature variance)


def source_layers(layer_map: list[int]) -> list[int | None]:
    """The teacher layer each student layer inherits from: the first layer of its span
    ``[m[l], m[l+1])`` (whose input is exactly what the block reads); None for an empty span (a
    student deeper than its teacher: nothing to inherit)."""
    return [a if b > a else None for a, b in zip(layer_map, layer_map[1:])]


# ---- the teacher layer in another basis --------------------------------------------------------
def moments_in_basis(m: Moments, basis: Basis) -> Moments:
    """Moments of ``(x - mean) @ proj`` from the moments of ``x``."""
    if basis.is_identity:
        return m
    mu, n = basis.mean.double(), m.count
    sum_xx = m.sum_xx - torch.outer(m.sum_x, mu) - torch.outer(mu, m.sum_x) + n * torch.outer(mu, mu)
    return linear_moments(Moments(m.sum_x - n * mu, sum_xx, n), basis.proj)


def linear_moments(m: Moments, a: Tensor) -> Moments:
    """Moments of ``x @ a`` from the moments of ``x``."""
    a = a.double()
    return Moments(a.T @ m.sum_x, a.T @ m.sum_xx @ a, m.count)


def centring(dim: int) -> Tensor:
    """``C = I - 11^T / dim``: what a LayerNorm subtracts (the mean over coordinates)."""
    return torch.eye(dim, dtype=torch.float64) - 1.0 / dim


def ln_scale(pre: Moments, proj: Tensor) -> float:
    """Gain correction of a LayerNorm moved into the basis ``proj``: the per-coordinate RMS of its
    (centred) input over the basis coordinates, over that over all the teacher's coordinates
    (``pre``: moments of the teacher LayerNorm's input)."""
    d, k = proj.shape
    energy = centring(d) @ pre.second @ centring(d)
    p = proj.double()
    return math.sqrt(float((p.T @ energy @ p).trace()) / k / max(float(energy.trace()) / d, 1e-30))


def norm_in_basis(weight: Tensor, bias: Tensor, basis: Basis, pre: Moments) -> tuple[Tensor, Tensor]:
    """A LayerNorm's gain and bias for the same vectors in ``basis`` coordinates (see module doc)."""
    p = basis.proj
    return ln_scale(pre, p) * (p.square().T @ weight), p.T @ (bias - basis.mean)


def layer_in_basis(layer: TeacherLayer, basis: Basis, pre_ln1: Moments, pre_ln2: Moments) -> TeacherLayer:
    """The same layer acting on ``(x - mean) @ proj`` coordinates (identity: unchanged); ``pre_ln*``
    are the moments of what its LayerNorms normalise, in the layer's current coordinates."""
    if basis.is_identity:
        return layer
    p, mu = basis.proj, basis.mean
    ln1 = norm_in_basis(layer.ln1_w, layer.ln1_b, basis, pre_ln1)
    ln2 = norm_in_basis(layer.ln2_w, layer.ln2_b, basis, pre_ln2)
    return replace(
        layer,
        q_w=layer.q_w @ p, q_b=layer.q_b + layer.q_w @ mu,
        k_w=layer.k_w @ p, k_b=layer.k_b + layer.k_w @ mu,
        v_w=layer.v_w @ p, v_b=layer.v_b + layer.v_w @ mu,
        o_w=p.T @ layer.o_w, o_b=p.T @ (layer.o_b + mu),
        ln1_w=ln1[0], ln1_b=ln1[1],
        up_w=layer.up_w @ p, up_b=layer.up_b + layer.up_w @ mu,
        down_w=p.T @ layer.down_w, down_b=p.T @ (layer.down_b + mu),
        ln2_w=ln2[0], ln2_b=ln2[1],
    )  # fmt: skip


# ---- shared attention -------------------------------------------------------------------------
def shared_value_fit(shared_w: Tensor, shared_b: Tensor, v_w: Tensor, v_b: Tensor, inputs: Moments):
    """Least-squares ``M [d, d]``, ``c [d]`` with ``x W_v^T + b_v ~= (x W_s^T + b_s) M + c`` over the
    inputs summarised by ``inputs`` (only their augmented second moment is needed)."""
    s = inputs.augmented()  # [H + 1, H + 1]
    a_s = torch.cat([shared_w.T, shared_b[None]]).double()  # [H + 1, d]
    a_v = torch.cat([v_w.T, v_b[None]]).double()
    design = torch.cat([a_s, torch.zeros(a_s.shape[0], 1, dtype=torch.float64)], 1)
    design[-1, -1] = 1.0  # the constant feature (for c)
    gram = design.T @ s @ design
    ridge = RIDGE * gram.diagonal()[:-1].mean().clamp_min(1e-12)
    theta = torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0], dtype=torch.float64), design.T @ s @ a_v)
    return theta[:-1].float(), theta[-1].float()


# ---- copying into the elastic modules ----------------------------------------------------------
@torch.no_grad()
def inherit_attention(attn: ElasticAttention, layer: TeacherLayer, order: Tensor, inputs: Moments,
                      head_mean: Tensor) -> bool:  # fmt: skip
    """Heads ``order[:max_heads]`` of ``layer`` into ``attn`` (same width), most important first; the
    mean output of the heads left out (``head_mean [heads, width]``) goes into the output bias.
    Returns False (attention left as it is) when the head widths differ."""
    d = layer.head_dim
    if attn.head_dim != d or attn.dim != layer.hidden_size:
        return False
    heads = order[: attn.max_heads].tolist()  # more stored heads than the teacher has: the rest stay random

    def rows(w: Tensor, h: int) -> Tensor:
        return w[h * d : (h + 1) * d]

    projections = {"none": ("q", "k", "v"), "qv": ("q", "k"), "kv": ("q", "k")}[attn.share]
    weight = attn.qkv.weight.view(attn.projections, attn.max_heads, d, attn.dim)
    bias = attn.qkv.bias.view(attn.projections, attn.max_heads, d)
    out_w = attn.out.weight.view(attn.dim, attn.max_heads, d)
    out_w[:, len(heads) :] = 0  # stored slots the teacher cannot fill: switched off
    out_b = layer.o_b + head_mean[order[attn.max_heads :]].sum(0)
    for slot, h in enumerate(heads):
        for i, name in enumerate(projections):
            weight[i, slot] = rows(getattr(layer, f"{name}_w"), h)
            bias[i, slot] = rows(getattr(layer, f"{name}_b"), h)
        o = layer.o_w[:, h * d : (h + 1) * d]
        if attn.share != "none":  # the value now comes from Q (qv) or K (kv): refit it
            src = "q" if attn.share == "qv" else "k"
            m, c = shared_value_fit(rows(getattr(layer, f"{src}_w"), h), rows(getattr(layer, f"{src}_b"), h),
                                    rows(layer.v_w, h), rows(layer.v_b, h), inputs)  # fmt: skip
            out_b += o @ c
            o = o @ m.T
        out_w[:, slot] = o
    attn.out.bias.copy_(out_b)
    attn.norm.weight.copy_(layer.ln1_w)
    attn.norm.bias.copy_(layer.ln1_b)
    return True


@torch.no_grad()
def inherit_ffn(ffn: ElasticFFN, layer: TeacherLayer, neurons: Tensor, neuron_mean: Tensor, share: float = 1.0) -> None:
    """Teacher neurons ``neurons`` (ranked) into the stored units of ``ffn`` (more stored units than
    neurons: the rest stay random). The mean output of every listed neuron that is not active (not
    stored, or stored beyond the active width) is folded into the output bias, with ``share`` of the
    teacher's own bias (stacked FFNs split it)."""
    n = min(ffn.max_dim, neurons.numel())
    idx = neurons[:n]
    ffn.up.weight[:n] = layer.up_w[idx]
    ffn.up.bias[:n] = layer.up_b[idx]
    ffn.down.weight[:, :n] = layer.down_w[:, idx]  # inactive ones wait, inherited, for growth
    ffn.down.weight[:, n:] = 0  # units the teacher cannot fill add nothing until trained
    ffn.inherited[:n] = True
    ffn.unit_mean[:n] = neuron_mean[idx]
    idle = neurons[ffn.active_dim :]
    ffn.down.bias.copy_(share * layer.down_b + layer.down_w[:, idle] @ neuron_mean[idle])
    ffn.norm.weight.copy_(layer.ln2_w)
    ffn.norm.bias.copy_(layer.ln2_b)


@dataclass
class LayerSource:
    """What a student layer inherits, in the student's coordinates: its teacher layer, the ranked
    heads and neurons with their mean outputs (``neuron_mean``: GELU, ``neuron_mean_relu``: ReLU),
    the moments of the layer's input and of what its LayerNorms normalise, and the LayerNorm of the
    last teacher layer of the span (``out_norm``, for a MobileBERT block's output)."""

    layer: TeacherLayer
    heads: Tensor
    neurons: Tensor
    head_mean: Tensor
    neuron_mean: Tensor
    inputs: Moments
    neuron_mean_relu: Tensor | None = None
    pre_ln1: Moments | None = None
    pre_ln2: Moments | None = None
    out_norm: tuple[Tensor, Tensor] | None = None


@torch.no_grad()
def inherit_candidate(cand: CandidateBlock, src: LayerSource) -> dict[str, bool]:
    """Initialise ``cand`` from ``src`` (a MobileBERT candidate then needs :func:`fit_bottleneck_out`;
    a family with its own candidate class inherits itself: ``inherit_from``)."""
    if hasattr(cand, "inherit_from"):
        return cand.inherit_from(src)
    layer, inputs, head_mean, neuron_mean = src.layer, src.inputs, src.head_mean, src.neuron_mean
    if cand.bottleneck:
        basis = Basis.pca(inputs, cand.bottleneck_size)
        inner_inputs = moments_in_basis(inputs, basis)
        p = basis.proj
        cand.bottleneck_in.weight.copy_(p.T)
        cand.bottleneck_in.bias.copy_(-(p.T @ basis.mean))
        cand.norm_in.weight.fill_(math.sqrt(float(inner_inputs.covariance.trace()) / p.shape[1]))
        cand.norm_in.bias.zero_()
        cand.bottleneck_out.weight.copy_(p)  # refitted by fit_bottleneck_out
        cand.bottleneck_out.bias.copy_(basis.mean)
        out_w, out_b = src.out_norm or (layer.ln2_w, layer.ln2_b)
        cand.norm_out.weight.copy_(out_w)
        cand.norm_out.bias.copy_(out_b)
        layer = layer_in_basis(layer, basis, src.pre_ln1 or inputs, src.pre_ln2 or inputs)
        inputs, head_mean = inner_inputs, head_mean @ p
        neuron_mean = src.neuron_mean_relu if src.neuron_mean_relu is not None else neuron_mean  # ReLU FFNs
    attention = inherit_attention(cand.attention, layer, src.heads, inputs, head_mean)
    k = len(cand.ffns)
    for i, ffn in enumerate(cand.ffns):  # stacked FFNs share the ranked neurons, interleaved
        inherit_ffn(ffn, layer, src.neurons[i::k], neuron_mean, share=1.0 / k)
    return {"attention": attention, "ffn": True}


@torch.no_grad()
def fit_bottleneck_out(cand: CandidateBlock, pairs) -> None:
    """Least-squares ``bottleneck_out`` of an inherited MobileBERT candidate.

    ``pairs`` yields ``(x, delta, valid)``: the block's input (student coordinates), the change the
    teacher's layer makes to it before its last LayerNorm (``pre_ln2 - x``, in the coordinates that
    LayerNorm sees) and the valid-token mask. The bottleneck cannot reproduce ``x`` itself (the
    residual adds it), so its output projection is fitted to ``delta`` from the block's inner state:
    ``norm_out(x + W f + b)`` then normalises what the teacher's last LayerNorm normalises."""
    was = cand.training
    cand.eval()
    from ..modeling.modeling_elm import attention_bias

    def rows():
        for x, delta, valid in pairs:
            h = cand.norm_in(cand.bottleneck_in(x))
            h, _ = cand.attention(h, attention_bias(valid, False, x.shape[1]), False)
            for ffn in cand.ffns:
                h = ffn(h)
            yield h[valid], delta[valid]

    fit_linear(cand.bottleneck_out, rows(), cand.bottleneck_size)
    cand.train(was)


@torch.no_grad()
def fit_linear(linear: nn.Module, rows, width: int) -> None:
    """Ridge least squares of ``linear``'s first ``width`` input columns and its bias over ``rows``
    of ``(features [N, width], target [N, out])``."""
    gram = cross = None
    for f, target in rows:
        f = torch.cat([f, torch.ones(f.shape[0], 1, dtype=f.dtype, device=f.device)], 1).double().cpu()
        g, c = f.T @ f, f.T @ target.double().cpu()
        gram, cross = (g, c) if gram is None else (gram + g, cross + c)
    ridge = RIDGE * gram.diagonal()[:-1].mean().clamp_min(1e-12)
    theta = torch.linalg.solve(gram + ridge * torch.eye(width + 1, dtype=torch.float64), cross)
    linear.weight[:, :width] = theta[:-1].T.to(linear.weight)
    linear.bias.copy_(theta[-1])


@torch.no_grad()
def inherit_embeddings(emb: nn.Module, teacher: TeacherEmbeddings, sums: Moments, basis: Basis) -> None:
    """The teacher's embeddings into an ``ElmEmbeddings`` (factorised size E, hidden H).

    ``project(word_s + position_s + type_s)`` reproduces the teacher's pre-LayerNorm sum through a
    rank-E PCA basis ``Q`` of the sums (``word_s = (word - m) Q``, ``project = Q e + m``), composed
    with the shared basis and its LayerNorm rule when the student is narrower."""
    e = emb.word.weight.shape[1]
    t_dim = teacher.word.shape[1]
    if e == t_dim:
        q, m = torch.eye(t_dim), torch.zeros(t_dim)
    else:
        q, m = principal_directions(sums, e).float(), sums.mean.float()
    rows = min(emb.position.weight.shape[0], teacher.position.shape[0])
    emb.word.weight.copy_((teacher.word - m) @ q)
    emb.position.weight[:rows] = teacher.position[:rows] @ q
    if emb.token_type is not None and teacher.token_type is not None:
        types = min(emb.token_type.weight.shape[0], teacher.token_type.shape[0])
        emb.token_type.weight[:types] = teacher.token_type[:types] @ q
    ln_w, ln_b = teacher.ln_w, teacher.ln_b
    if not basis.is_identity:  # into the student's coordinates (P^T: the basis is orthogonal to 1)
        q, m = basis.proj.T @ q, basis.proj.T @ m
        ln_w, ln_b = norm_in_basis(ln_w, ln_b, basis, sums)
    if emb.project is not None:
        emb.project.weight.copy_(q)
        emb.project.bias.copy_(m)
    elif e != t_dim or not basis.is_identity:  # E == H but != the teacher's width: fold Q into the rows
        emb.word.weight.copy_(emb.word.weight @ q.T + m)
        emb.position.weight.copy_(emb.position.weight @ q.T)
        if emb.token_type is not None:
            emb.token_type.weight.copy_(emb.token_type.weight @ q.T)
    emb.norm.weight.copy_(ln_w)
    emb.norm.bias.copy_(ln_b)


def fit_basis(hidden: list[Moments], layer_map: list[int], width: int) -> tuple[Basis, Tensor]:
    """The shared basis for a student of ``width`` reading/targeting the teacher states ``layer_map``
    (moments in ``hidden``, index 0 = embeddings), and the variance of every mapped state in it (the
    scale of the point-wise loss). The directions come from the states pooled with equal weight per
    layer (each scaled to unit variance), so a layer whose states vary less (MiniLM's last) is
    represented as well as the others."""
    states = [hidden[t] for t in sorted(set(layer_map))]
    weighted = [mo.scaled(float(mo.covariance.trace().clamp_min(1e-30).rsqrt())) for mo in states]
    pooled, weighted = functools.reduce(Moments.merge, states), functools.reduce(Moments.merge, weighted)
    basis = Basis.pca(pooled, width, directions=weighted)
    variance = torch.tensor([float(moments_in_basis(hidden[t], basis).covariance.trace()) for t in layer_map])
    return basis, variance.float()


def install_basis(supernet, hidden: list[Moments]) -> Basis:
    """:func:`fit_basis` for ``supernet``, installed in it."""
    basis, variance = fit_basis(hidden, supernet.layer_map, supernet.space.hidden_size)
    supernet.set_basis(basis.to(supernet.basis_proj.device), variance.to(supernet.basis_proj.device))
    return basis


def rankings(stats: TeacherStats, teacher_layer: int) -> tuple[Tensor, Tensor]:
    """(heads, neurons) of a teacher layer, most important first (ties by index, deterministic)."""
    heads = torch.argsort(stats.head_importance[teacher_layer], descending=True, stable=True)
    neurons = torch.argsort(stats.neuron_importance[teacher_layer], descending=True, stable=True)
    return heads, neurons


@torch.no_grad()
def inherit_supernet(supernet, teacher, batches: list[dict[str, Tensor]], weights: bool = True) -> dict:
    """Initialise every candidate and the embeddings of ``supernet`` from ``teacher``.

    ``batches``: a few corpus batches (``input_ids``, ``attention_mask``) for the statistics (and
    the MobileBERT output fits). Installs the shared basis; with ``weights=False`` that is all it
    does (any teacher works then). Returns a JSON-able report.
    """
    from .teacher_weights import InheritError, collect_stats, hidden_moments, read_teacher

    if not weights:
        moments = hidden_moments(teacher, batches)
        basis = install_basis(supernet, moments)
        return {"basis": "identity" if basis.is_identity else "pca", "tokens": moments[0].count}
    embeddings, layers = read_teacher(teacher)
    if supernet.space.embedding_size > teacher.hidden_size:
        raise InheritError(f"space.embedding_size={supernet.space.embedding_size} is wider than the teacher's "
                           f"{teacher.hidden_size}: its embeddings cannot be inherited (set inherit.enabled=false)")  # fmt: skip
    stats = collect_stats(teacher, embeddings, layers, batches)
    basis = install_basis(supernet, stats.hidden)
    device = supernet.basis_proj.device
    try:
        inherit_embeddings(supernet.embeddings.cpu(), embeddings, stats.embedding_sum, basis)
        return _inherit_layers(supernet, teacher, layers, stats, basis, batches)
    finally:
        supernet.to(device)


def _inherit_layers(supernet, teacher, layers, stats, basis: Basis, batches) -> dict:
    from .teacher_weights import layer_forward

    m = supernet.layer_map
    states = [(tuple(h.float().cpu() for h in teacher(b["input_ids"], b["attention_mask"]).hidden_states),
               b["attention_mask"].bool().cpu()) for b in batches]  # fmt: skip
    offset = basis.proj.T @ basis.mean  # P^T mean: what a LayerNorm input has beyond to_student(.)
    to_ln = basis.proj.double()  # a teacher LayerNorm input z reaches the student's as P^T z
    sources = source_layers(m)
    bottlenecks = any(c.bottleneck for layer in supernet.layers for c in layer)
    fitted = any(hasattr(c, "fit_to_teacher") for layer in supernet.layers for c in layer)
    report = {"basis": "identity" if basis.is_identity else "pca", "teacher_layers": sources, "tokens": stats.tokens,
              "attention_inherited": 0, "candidates": 0}  # fmt: skip
    for li, candidates in enumerate(supernet.layers):
        t = sources[li]
        if t is None:  # an empty span: nothing to inherit, the candidates keep their random init
            continue
        last = m[li + 1] - 1  # the teacher layer whose last LayerNorm gives the block's target
        heads, neurons = rankings(stats, t)
        pre1, pre2 = stats.pre_ln1[t], stats.pre_ln2[t]
        last_layer = layer_in_basis(layers[last], basis, stats.pre_ln1[last], stats.pre_ln2[last])
        src = LayerSource(layer=layer_in_basis(layers[t], basis, pre1, pre2), heads=heads, neurons=neurons,
                          head_mean=stats.head_mean[t] @ basis.proj, neuron_mean=stats.neuron_mean[t],
                          inputs=moments_in_basis(stats.hidden[m[li]], basis),
                          neuron_mean_relu=stats.neuron_mean_relu[t],
                          pre_ln1=pre1 if basis.is_identity else linear_moments(pre1, to_ln),
                          pre_ln2=pre2 if basis.is_identity else linear_moments(pre2, to_ln),
                          out_norm=(last_layer.ln2_w, last_layer.ln2_b))  # fmt: skip
        pairs, teacher_states = [], []
        for hidden, valid in states if bottlenecks or fitted else ():
            x = basis.to_student(hidden[m[li]])
            needed = ({last} if bottlenecks else set()) | ({t} if fitted else set())  # (one run when t == last)
            runs = {i: layer_forward(layers[i], hidden[i], valid) for i in needed}
            if bottlenecks:
                pairs.append((x, basis.to_student(runs[last]["pre_ln2"]) + offset - x, valid))
            if fitted:
                a = runs[t]["attn_out"]
                teacher_states.append((x, basis.to_student(a), basis.to_student(hidden[m[li + 1]]), valid))
        for cand in candidates:
            if cand.identity:  # nothing to inherit
                continue
            cand.cpu()
            done = inherit_candidate(cand, src)
            if cand.bottleneck:
                fit_bottleneck_out(cand, pairs)
            if hasattr(cand, "fit_to_teacher"):  # a family that fits its outputs to the teacher's states
                cand.fit_to_teacher(teacher_states)
            report["attention_inherited"] += int(done["attention"])
            report["candidates"] += 1
    return report
