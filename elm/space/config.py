"""The search space's settings: what a supernet may contain (``configs/space/*.yaml`` mirrors it)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from ..blocks import BLOCKS, DEFAULT_BLOCKS, FLAT_SPACE_FIELDS, family
from .arch import SHARE_MODES, ArchError, _positive_int


@dataclass
class SpaceConfig:
    """What the supernet may contain (mirrors ``configs/space/*.yaml``).

    Candidates per layer = ``blocks`` x ``shares`` (:meth:`candidates`). Defaults follow the method doc: FFN widths
    start at 132 and move in units of 132 up to 792 [paper / W-PCA]. Each block family's own
    settings (its heads, head width, stacked FFNs, bottleneck width) live under ``families``, e.g.
    ``families: {mobilebert: {heads: 4, bottleneck_size: 128}}`` in YAML, over the family's defaults
    (``elm.blocks``: ``BlockFamily.defaults``).
    """

    num_layers: int = 6
    hidden_size: int | None = None  # None = the teacher's (exact inheritance); narrower = a PCA basis
    embedding_size: int = 128
    causal: bool = False
    blocks: list[str] = field(default_factory=lambda: list(DEFAULT_BLOCKS))
    shares: list[str] = field(default_factory=lambda: ["none", "qv", "kv"])
    head_dim: int = 32  # a family's head width unless it sets its own
    families: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-family settings over its defaults
    ffn_init: int = 132
    ffn_unit: int = 132
    ffn_max: int = 792
    dropout: float = 0.1
    attention_dropout: float | None = None  # on attention probabilities; None = dropout (see the class doc)
    layer_map: list[int] | None = None  # teacher hidden-state index per student layer boundary

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpaceConfig:
        """A space from ``asdict`` output, also one written when the family settings were flat fields
        (``bert_heads``, ``bottleneck_size``, ...: ``elm.blocks.FLAT_SPACE_FIELDS``)."""
        data, families = dict(data), {k: dict(v) for k, v in (data.get("families") or {}).items()}
        for flat, (name, key) in FLAT_SPACE_FIELDS.items():
            if flat in data:
                families.setdefault(name, {})[key] = data.pop(flat)
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ArchError(f"space has unknown key(s) {unknown}; valid: {sorted(names)}")
        return cls(**{**data, "families": families})

    def heads_of(self, block: str) -> int:
        """Maximum (stored) heads of a candidate of this block type."""
        return family(block).heads(self)

    def head_dim_of(self, block: str) -> int:
        """Head width of a candidate of this block type."""
        return family(block).head_dim(self)

    def layer_fields(self, block: str, share: str) -> dict:
        """``LayerConfig`` fields of the ``block``/``share`` candidates, all but heads and FFN width."""
        return family(block).layer_fields(self, share)

    def candidates(self) -> list[tuple[str, str]]:
        """``(block, share)`` of every candidate of a layer: ``blocks`` x ``shares``, one per family
        that takes no sharing mode (the identity ``skip``)."""
        return [(block, share) for block in self.blocks for share in family(block).shares(self)]

    def validate(self) -> SpaceConfig:
        if not self.blocks or any(b not in BLOCKS for b in self.blocks):
            raise ArchError(f"space.blocks={list(self.blocks)} has unknown/no block types; valid: {tuple(BLOCKS)}")
        if all(family(b).identity for b in self.blocks):
            raise ArchError(f"space.blocks={list(self.blocks)} has only identity blocks; add a block with "
                            f"weights, e.g. {', '.join(n for n, f in BLOCKS.items() if not f.identity)}")  # fmt: skip
        if not self.shares or any(s not in SHARE_MODES for s in self.shares):
            raise ArchError(f"space.shares={list(self.shares)} has unknown/no modes; valid: {SHARE_MODES}")
        for name in ("blocks", "shares"):  # duplicates would give two candidates the same key
            values = list(getattr(self, name))
            if len(set(values)) != len(values):
                raise ArchError(f"space.{name}={values} lists a value twice")
        if self.hidden_size is None:
            raise ArchError("space.hidden_size is not set; resolve it from the teacher first (SpaceConfig.resolve)")
        for name in ("num_layers", "hidden_size", "embedding_size", "head_dim", "ffn_init", "ffn_unit", "ffn_max"):
            _positive_int(f"space.{name}", getattr(self, name))
        self.check_families()
        if not isinstance(self.causal, bool):
            raise ArchError(f"space.causal must be true or false, got {self.causal!r}")
        dropout = self.dropout
        if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
            raise ArchError(f"space.dropout must be a number in [0, 1), got {self.dropout!r}")
        attn = self.attention_dropout
        if attn is not None and (isinstance(attn, bool) or not isinstance(attn, int | float) or not 0 <= attn < 1):
            raise ArchError(f"space.attention_dropout must be a number in [0, 1) or null, got {attn!r}")
        if self.ffn_init > self.ffn_max:
            raise ArchError(f"space.ffn_init={self.ffn_init} exceeds space.ffn_max={self.ffn_max}")
        for b in self.blocks:
            width = family(b).bottleneck_size(self)
            if width is not None and width > self.hidden_size:
                raise ArchError(f"space.families.{b}.bottleneck_size={width} is larger than hidden_size={self.hidden_size}")
        if self.layer_map is not None:
            m = list(self.layer_map)
            if (
                len(m) != self.num_layers + 1
                or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in m)
                or any(b < a for a, b in zip(m, m[1:]))
            ):
                raise ArchError(
                    f"space.layer_map={m} must list {self.num_layers + 1} non-decreasing teacher hidden-state "
                    f"indices (integers >= 0), one per student layer boundary"
                )
        return self

    def check_families(self) -> SpaceConfig:
        """The family settings (known families, known keys, positive integers): what can be checked
        before the teacher is loaded (``validate`` does it too)."""
        if not isinstance(self.families, dict) or any(not isinstance(v, dict | None) for v in self.families.values()):
            raise ArchError(f"space.families={self.families!r} must map block families to their settings")
        bad = [name for name in self.families if name not in BLOCKS]
        if bad:
            raise ArchError(f"space.families has settings for unknown block famil(ies) {bad}; valid: {tuple(BLOCKS)}")
        for name in dict.fromkeys([*self.blocks, *self.families]):  # the families in use and any set
            if name in BLOCKS:  # an unknown name in space.blocks is validate()'s error
                family(name).check_settings(self)
        return self

    def resolve(self, teacher_hidden_size: int) -> SpaceConfig:
        """Fill ``hidden_size: null`` with the teacher's width; refuse a student wider than its teacher."""
        if self.hidden_size is None:
            self.hidden_size = int(teacher_hidden_size)
        elif not isinstance(self.hidden_size, bool) and isinstance(self.hidden_size, int) \
                and self.hidden_size > teacher_hidden_size:  # fmt: skip
            raise ArchError(f"space.hidden_size={self.hidden_size} is wider than the teacher ({teacher_hidden_size}); "
                            f"use at most {teacher_hidden_size} (null = the teacher's width)")  # fmt: skip
        return self
