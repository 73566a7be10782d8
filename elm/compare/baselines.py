"""Baseline architectures for the equal-budget comparison (method doc, section 7).

* :func:`uniform_arch` - a hand-designed, BERT-tiny-shaped model: the same BERT block in every
  layer (no weight sharing), the searched model's depth, hidden and embedding sizes, the space's
  head dim; heads and FFN width chosen so its total parameters match a target, FFN ~ 4x the
  attention width as in BERT.
* :func:`random_arch` - a random point of the search space under the same layer budget.

Budgets are counts of *layer* (non-embedding) parameters, as in the search's ``pareto.json``
(``elm.search.choose``): every model here shares the searched model's embeddings, so equal layer
parameters and equal total parameters differ by the same constant. Both functions are pure: the
only randomness is the ``rng`` passed in.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np

from ..blocks import family
from ..space import SpaceConfig
from ..space.arch import ArchConfig, LayerConfig


def layer_params(arch: ArchConfig) -> int:
    """Non-embedding parameters (what search budgets count)."""
    return arch.num_parameters() - arch.embedding_parameters()


def uniform_arch(
    params_target: int, like: ArchConfig, head_dim: int, *, max_heads: int | None = None, ffn_step: int = 8,
    ffn_max: int | None = None, budget: int | None = None, tolerance: float = 0.05, ffn_ratio: float = 4.0,
) -> ArchConfig:
    """The BERT-shaped uniform model whose total params are within ``tolerance`` of
    ``params_target`` and whose layer params are <= ``budget``.

    Depth, hidden/embedding sizes, vocabulary and positions come from ``like``; every layer is
    the same ``bert`` block (no sharing) with ``head_dim``-wide heads. Grid: heads in
    ``1..max_heads`` (default ``hidden // head_dim``), FFN widths in multiples of ``ffn_step`` up
    to ``ffn_max`` (default ``8 * hidden``). [project decision] For each head count the FFN width
    closest to the target is taken; among the head counts that land within the tolerance, the
    one whose FFN / attention-width ratio is closest to BERT's ``ffn_ratio`` (4: BERT-Tiny 128 ->
    512, BERT-base 768 -> 3072) wins, so the model is a scaled-down BERT rather than full
    attention with a starved FFN. Raises ``ValueError`` when no point of the grid is feasible.
    """
    if params_target <= 0 or not like.layers:
        raise ValueError(f"uniform_arch needs a positive target and a model to copy, got {params_target}")
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance!r}")
    h, depth = like.hidden_size, like.num_layers
    max_heads = max_heads or max(1, h // head_dim)
    ffn_max = ffn_max or 8 * h
    best: tuple[float, ArchConfig] | None = None
    closest: int | None = None  # the nearest total under the budget, for the error message
    for heads in range(1, max_heads + 1):
        pick: tuple[int, int, ArchConfig] | None = None  # (error, ffn, arch) closest to the target
        for ffn in range(ffn_step, ffn_max + 1, ffn_step):
            layers = [LayerConfig("bert", num_heads=heads, head_dim=head_dim, ffn_dim=ffn, share="none")
                      for _ in range(depth)]
            arch = replace(like, layers=layers).validate()
            if budget is not None and layer_params(arch) > budget:
                break  # wider FFNs only add parameters
            error = abs(arch.num_parameters() - params_target)
            if pick is None or error < pick[0]:
                pick = (error, ffn, arch)
        if pick is None:
            continue
        error, ffn, arch = pick
        if closest is None or error < abs(closest - params_target):
            closest = arch.num_parameters()
        if error <= tolerance * params_target:
            shape = abs(math.log(ffn / (ffn_ratio * heads * head_dim)))
            if best is None or shape < best[0]:
                best = (shape, arch)
    if best is None:
        raise ValueError(
            f"no uniform {depth}-layer BERT model (hidden {h}, head_dim {head_dim}, <= {max_heads} heads, FFN <= "
            f"{ffn_max}) has {params_target:,} params within {tolerance:.0%}"
            + (f" and <= {budget:,} layer params" if budget is not None else "")
            + (f"; the closest has {closest:,}" if closest is not None else "")
        )
    return best[1]


def _ffn_choices(space: SpaceConfig) -> list[int]:
    """FFN widths the search can reach: ``ffn_init + k * ffn_unit <= ffn_max``."""
    return list(range(space.ffn_init, space.ffn_max + 1, space.ffn_unit))


def _random_layer(space: SpaceConfig, rng: np.random.Generator) -> LayerConfig:
    """A layer the searched space holds: the block family's own head count and head width (its
    ``head_dim`` setting when set; a grouped-query family rounds the heads up to whole groups), an
    FFN width the growth can reach."""
    block = str(rng.choice(space.blocks))
    heads = int(rng.integers(1, max(1, space.heads_of(block)) + 1))
    ffn_dim = int(rng.choice(_ffn_choices(space)))
    share = str(rng.choice(family(block).shares(space)))
    return LayerConfig(**family(block).layer_config_fields(space, share, heads, ffn_dim))


def _moves(space: SpaceConfig, layer: LayerConfig, sign: int) -> list[dict[str, Any]]:
    """One-step changes of a layer's heads or FFN width (sign -1 shrinks, +1 grows) within the space."""
    widths, moves = _ffn_choices(space), []
    if family(layer.block).identity:  # nothing to widen or narrow
        return moves
    step = family(layer.block).head_step(layer.share)  # (grouped-query attention: whole groups)
    heads = layer.num_heads + sign * step
    if step <= heads <= space.heads_of(layer.block):
        moves.append({"num_heads": heads})
    i = widths.index(layer.ffn_dim) + sign if layer.ffn_dim in widths else -1
    if 0 <= i < len(widths):
        moves.append({"ffn_dim": widths[i]})
    return moves


def random_arch(space: SpaceConfig, budget: int, rng: np.random.Generator, like: ArchConfig, *,
                min_params: int = 0, max_tries: int = 2000) -> ArchConfig:
    """A random architecture of ``space`` with ``min_params <= layer params <= budget``.

    Per layer, uniformly: a block type of ``space.blocks`` (an identity ``skip`` drops the layer), a
    sharing mode of ``space.shares``, ``1..max`` heads of ``space.head_dim`` and an FFN width the
    search can reach (``ffn_init + k * ffn_unit <= ffn_max``); MobileBERT blocks use the space's
    bottleneck and FFN count. Vocabulary and positions come from ``like``, causality from ``space``.
    Draws are rejected until one lands in the window (uniform over the feasible set); after
    ``max_tries`` misses, the last draw is moved into it one random head / FFN step at a time.
    """
    space = space.validate()
    if min_params > budget:
        raise ValueError(f"min_params={min_params:,} is above the budget {budget:,}")
    base = replace(like, hidden_size=space.hidden_size, embedding_size=space.embedding_size,
                   causal=space.causal)

    def build(layers: list[LayerConfig]) -> ArchConfig:  # a skipped (identity) layer is no layer
        return replace(base, layers=[x for x in layers if not family(x.block).identity]).validate()

    layers: list[LayerConfig] = []
    for _ in range(max(1, max_tries)):
        layers = [_random_layer(space, rng) for _ in range(space.num_layers)]
        if all(family(layer.block).identity for layer in layers):
            continue
        if min_params <= layer_params(build(layers)) <= budget:
            return build(layers)
    if all(family(layer.block).identity for layer in layers):  # the last draw: the repair below needs a layer
        raise ValueError(f"every draw of {max_tries} skipped all layers; raise random.max_tries")
    for _ in range(100 * space.num_layers * len(_ffn_choices(space))):
        n = layer_params(build(layers))
        if min_params <= n <= budget:
            return build(layers)
        sign = -1 if n > budget else 1
        options = [(i, m) for i, layer in enumerate(layers) for m in _moves(space, layer, sign)]
        if sign > 0:  # growing must not jump over the budget
            options = [(i, m) for i, m in options
                       if layer_params(build(_replace(layers, i, m))) <= budget]  # fmt: skip
        if not options:
            break
        i, move = options[int(rng.integers(len(options)))]
        layers = _replace(layers, i, move)
    raise ValueError(
        f"no random architecture of this space fits {min_params:,} <= layer params <= {budget:,} "
        f"(last try: {layer_params(build(layers)):,}); widen the window or change the space"
    )


def _replace(layers: list[LayerConfig], i: int, move: dict[str, Any]) -> list[LayerConfig]:
    return [replace(layer, **move) if j == i else layer for j, layer in enumerate(layers)]
