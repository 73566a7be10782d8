"""The LLaMA-style block family (issue #17): pre-RMSNorm, rotary positions, grouped-query attention
and a SwiGLU FFN with elastic width, causal or bidirectional.

Here: its settings (``space.families.llama``: ``heads``, ``head_dim``, ``group``), its sharing
modes (``none`` and ``gqa<g>``: ``g`` query heads read one key/value head), its validation and
parameter count. Its elastic candidate is :mod:`elm.blocks.llama_elastic`, its exported layer
:mod:`elm.blocks.llama_layer` (shipped in exports as ``modeling_elm_llama.py``, remote code).

[project decision] Mixing rule: a supernet may hold llama candidates beside BERT and MobileBERT ones
in every layer. Every block maps a state in the supernet's one shared basis to the next state in
that basis (``elm.supernet.supernet``), whatever its norms: a post-LN block normalises its output,
a pre-norm block normalises what its attention and FFN read and leaves the residual stream as it is,
and the LM / classifier heads normalise what they read. So any sequence of the three computes a
well-formed model, and the chosen blocks chain.

[project decision] GQA under head pruning: a *unit* (one key/value head and its ``g`` queries) is
what CKA compares and prunes, so a pruned candidate keeps whole groups (``num_heads`` stays a
multiple of ``g``); ``cka.min_heads`` counts units for these candidates.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from . import ArchError, BlockFamily

_GQA = re.compile(r"gqa([1-9][0-9]*)")


def group_of(share: str) -> int:
    """Query heads per key/value head of a llama sharing mode (``none``: 1)."""
    return 1 if share == "none" else int(share[3:])


@dataclass(frozen=True)
class LlamaFamily(BlockFamily):
    def shares(self, space: Any) -> list[str]:
        return ["none", f"gqa{self.settings(space)['group']}"]

    def share_modes(self) -> tuple[str, ...]:
        return ("none", "gqa<g>")

    def head_step(self, share: str) -> int:
        return group_of(share)

    def check_share(self, share: Any, where: str) -> None:
        match = _GQA.fullmatch(share) if isinstance(share, str) else None
        if share != "none" and (match is None or int(match.group(1)) < 2):
            raise ArchError(f"{where}.share={share!r} is unknown for block={self.name!r}; valid: none, or gqa<g> "
                            f"with g >= 2 query heads per key/value head (e.g. gqa2)")  # fmt: skip

    def check_settings(self, space: Any) -> None:
        super().check_settings(space)
        own = self.settings(space)
        if own["group"] < 2 or own["heads"] % own["group"]:
            raise ArchError(f"space.families.{self.name}.group={own['group']} must be >= 2 and divide "
                            f"space.families.{self.name}.heads={own['heads']}")  # fmt: skip
        if isinstance(space.head_dim, int) and self.head_dim(space) % 2:
            raise ArchError(f"the {self.name} head width {self.head_dim(space)} (space.families.{self.name}.head_dim or "
                            "space.head_dim) must be even: rotary positions rotate pairs")  # fmt: skip

    def validate(self, layer: Any, where: str) -> None:
        super().validate(layer, where)
        g = group_of(layer.share)
        if layer.num_heads % g:
            raise ArchError(f"{where}.num_heads={layer.num_heads} must be a multiple of {g} (share={layer.share!r})")
        if layer.head_dim % 2:
            raise ArchError(f"{where}.head_dim={layer.head_dim} must be even (rotary positions rotate pairs)")

    def layer_config_fields(self, space: Any, share: str, num_heads: int, ffn_dim: int) -> dict[str, Any]:
        """Heads rounded up to whole key/value groups (at most the stored heads)."""
        g = group_of(share)
        num_heads = min(-(-num_heads // g) * g, self.heads(space))
        return super().layer_config_fields(space, share, num_heads, ffn_dim)

    def parameters(self, layer: Any, hidden_size: int) -> int:
        h, d, f, g = hidden_size, layer.head_dim, layer.ffn_dim, group_of(layer.share)
        fused = layer.num_heads // g * (g + 2) * d  # Q of every head, one K and V per group
        attention = h + fused * (h + 1) + layer.num_heads * d * h + h  # RMSNorm, QKV, O
        ffn = h + 2 * (h * f + f) + f * h + h  # RMSNorm, gate and up, down
        return attention + layer.num_ffn * ffn

    def candidate(self, hidden_size: int, max_heads: int, head_dim: int, share: str, ffn_init: int, ffn_max: int,
                  num_ffn: int = 1, bottleneck_size: int | None = None, dropout: float = 0.1,
                  attention_dropout: float | None = None):  # fmt: skip
        from .llama_elastic import LlamaCandidate  # torch and the supernet: imported on use

        return LlamaCandidate(self.name, hidden_size, max_heads, head_dim, share, ffn_init, ffn_max, dropout=dropout,
                              attention_dropout=attention_dropout)  # fmt: skip


# heads 8 of the space's head width, 2 query heads per key/value head in the gqa candidate
LLAMA = LlamaFamily("llama", "LLaMA", "#8ac926", bottleneck=False, stacked_ffns=False,
                    defaults=(("heads", 8), ("head_dim", None), ("group", 2)), activation="silu", layout="llama")  # fmt: skip
