"""The ``teacher_slice`` baseline: what a user would try instead of a search.

[project decision] The teacher's own layers, heads and FFN neurons, kept by importance down to the
searched model's layer parameters, with no search: as many layers as the searched model (the
uniform layer map of the teacher, the layer each student layer inherits from), in every layer the
same number of most important heads and FFN neurons (DynaBERT-style width slicing, the FFN kept at
about the teacher's FFN-to-attention ratio), at the teacher's hidden width, and embeddings of the
searched model's factorised size (so both rows have the same embedding parameters). The weights
come from the very inheritance code the search starts from (:mod:`elm.supernet.inherit`: a
one-candidate supernet of BERT blocks), so the two rows differ only by what the search did.
"""

from __future__ import annotations

import math
from dataclasses import replace

from ..space import ArchConfig, LayerConfig, SpaceConfig
from ..space.arch import layer_parameters


def slice_shape(target: int, hidden: int, head_dim: int, heads: int, ffn: int, depth: int) -> tuple[int, int]:
    """``(heads, ffn)`` of a uniform slice with at most ``target`` layer parameters over ``depth``
    layers: per head count, the widest FFN that fits; of those, the one whose FFN / attention width
    ratio is closest to the teacher's (``ffn / (heads x head_dim)``)."""
    ratio = ffn / (heads * head_dim)
    best: tuple[float, int, int] | None = None
    for h in range(1, heads + 1):
        attention = depth * layer_parameters(LayerConfig("bert", num_heads=h, head_dim=head_dim, ffn_dim=1), hidden)
        per_unit = depth * (2 * hidden + 1)  # one more FFN neuron in every layer
        w = min(ffn, (target - attention) // per_unit + 1)
        if w < 1:
            continue
        shape = abs(math.log(w / (ratio * h * head_dim)))
        if best is None or shape < best[0]:
            best = (shape, h, w)
    if best is None:
        raise ValueError(f"no slice of the teacher fits {target:,} layer parameters in {depth} layers")
    return best[1], best[2]


def slice_arch(like: ArchConfig, target: int, teacher) -> ArchConfig:
    """The slice's architecture: ``like``'s depth, vocabulary and embedding size, the teacher's width."""
    head_dim = teacher.hidden_size // teacher.num_heads
    ffn = int(teacher.model.config.intermediate_size)
    h, w = slice_shape(target, teacher.hidden_size, head_dim, teacher.num_heads, ffn, like.num_layers)
    layers = [LayerConfig("bert", num_heads=h, head_dim=head_dim, ffn_dim=w) for _ in range(like.num_layers)]
    return replace(like, hidden_size=teacher.hidden_size, layers=layers).validate()


def teacher_slice(teacher, arch: ArchConfig, batches, model_cls, **config_kwargs):
    """A ``model_cls`` of ``arch`` (from :func:`slice_arch`) holding the teacher's most important heads
    and neurons, inherited on ``batches`` (corpus batches for the importance statistics)."""
    from ..supernet import Supernet, extract
    from ..supernet.inherit import inherit_supernet

    layer = arch.layers[0]
    space = SpaceConfig(num_layers=arch.num_layers, hidden_size=arch.hidden_size, embedding_size=arch.embedding_size,
                        causal=arch.causal, blocks=["bert"], shares=["none"], head_dim=layer.head_dim,
                        families={"bert": {"heads": layer.num_heads}}, ffn_init=layer.ffn_dim, ffn_unit=1, ffn_max=layer.ffn_dim,
                        dropout=0.0).validate()  # fmt: skip
    net = Supernet(space, vocab_size=arch.vocab_size, max_positions=arch.max_positions,
                   teacher_hidden_size=teacher.hidden_size, teacher_layers=teacher.num_layers,
                   type_vocab_size=arch.type_vocab_size, pad_token_id=teacher.tokenizer.pad_token_id or 0)  # fmt: skip
    report = inherit_supernet(net, teacher, batches)
    model = extract(net, model_cls, [0] * arch.num_layers, **config_kwargs)
    return model, report
