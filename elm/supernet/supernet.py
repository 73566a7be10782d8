"""The ELM supernet: embeddings + L layers, each holding candidate blocks side by side.

Two ways to run it:

* ``blockwise(teacher_hidden_states, mask)`` — search time. [project decision] Every candidate
  of student layer l reads the teacher's hidden state at mapped layer ``m[l]``, in the one
  shared basis of the whole supernet (:mod:`elm.supernet.basis`: the identity when the student
  is as wide as the teacher, else a fixed PCA basis), and is distilled towards the teacher's
  state ``m[l + 1]`` in the same coordinates. Because every block reads and writes the same
  coordinates, the blocks chosen for different layers chain (a learned map per layer would let
  each layer drift into its own rotation). ``chain`` makes a layer read a candidate of the
  previous layer instead of the teacher (chained training), so blocks also learn to work on
  each other's outputs.
* ``forward(input_ids, mask)`` — the active path (one candidate per layer, chained from the
  student embeddings), which is exactly what ``extract()`` turns into a standalone model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..modeling.modeling_elm import ElmEmbeddings, attention_bias
from ..space import BLOCK_TYPES, SHARE_MODES, ArchConfig, ArchError
from .basis import Basis
from .elastic import CandidateBlock, uniform_layer_map


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ArchError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class SpaceConfig:
    """What the supernet may contain (mirrors ``configs/space/*.yaml``).

    Candidates per layer = ``blocks`` x ``shares``. Defaults follow the method doc: FFN widths
    start at 132 and move in units of 132 up to 792 [paper / W-PCA]; MobileBERT blocks narrow to
    ``bottleneck_size`` and stack ``mobilebert_num_ffn`` FFNs.
    """

    num_layers: int = 6
    hidden_size: int | None = None  # None = the teacher's (exact inheritance); narrower = a PCA basis
    embedding_size: int = 128
    causal: bool = False
    blocks: list[str] = field(default_factory=lambda: ["bert", "mobilebert"])
    shares: list[str] = field(default_factory=lambda: ["none", "qv", "kv"])
    head_dim: int = 32
    bert_heads: int = 8
    mobilebert_heads: int = 4
    mobilebert_head_dim: int | None = None  # None = head_dim (W-PCA: 12 x 44 in BERT, 4 x 33 in MobileBERT)
    bottleneck_size: int = 128
    mobilebert_num_ffn: int = 2
    ffn_init: int = 132
    ffn_unit: int = 132
    ffn_max: int = 792
    dropout: float = 0.1
    attention_dropout: float | None = None  # on attention probabilities; None = dropout (see the class doc)
    layer_map: list[int] | None = None  # teacher hidden-state index per student layer boundary

    def heads_of(self, block: str) -> int:
        """Maximum (stored) heads of a candidate of this block type."""
        return self.mobilebert_heads if block == "mobilebert" else self.bert_heads

    def head_dim_of(self, block: str) -> int:
        """Head width of a candidate of this block type."""
        return (self.mobilebert_head_dim or self.head_dim) if block == "mobilebert" else self.head_dim

    def validate(self) -> SpaceConfig:
        bad = [b for b in self.blocks if b not in BLOCK_TYPES]
        if bad or not self.blocks:
            raise ArchError(f"space.blocks={list(self.blocks)} has unknown/no block types; valid: {BLOCK_TYPES}")
        bad = [s for s in self.shares if s not in SHARE_MODES]
        if bad or not self.shares:
            raise ArchError(f"space.shares={list(self.shares)} has unknown/no modes; valid: {SHARE_MODES}")
        for name in ("blocks", "shares"):  # duplicates would give two candidates the same key
            values = list(getattr(self, name))
            if len(set(values)) != len(values):
                raise ArchError(f"space.{name}={values} lists a value twice")
        if self.hidden_size is None:
            raise ArchError("space.hidden_size is not set; resolve it from the teacher first (SpaceConfig.resolve)")
        for name in ("num_layers", "hidden_size", "embedding_size", "head_dim", "bert_heads",
                     "mobilebert_heads", "bottleneck_size", "mobilebert_num_ffn", "ffn_init",
                     "ffn_unit", "ffn_max"):  # fmt: skip
            _positive_int(f"space.{name}", getattr(self, name))
        if self.mobilebert_head_dim is not None:
            _positive_int("space.mobilebert_head_dim", self.mobilebert_head_dim)
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
        if "mobilebert" in self.blocks and self.bottleneck_size > self.hidden_size:
            raise ArchError(
                f"space.bottleneck_size={self.bottleneck_size} is larger than hidden_size={self.hidden_size}"
            )
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

    def resolve(self, teacher_hidden_size: int) -> SpaceConfig:
        """Fill ``hidden_size: null`` with the teacher's width; refuse a student wider than its teacher."""
        if self.hidden_size is None:
            self.hidden_size = int(teacher_hidden_size)
        elif not isinstance(self.hidden_size, bool) and isinstance(self.hidden_size, int) \
                and self.hidden_size > teacher_hidden_size:  # fmt: skip
            raise ArchError(f"space.hidden_size={self.hidden_size} is wider than the teacher ({teacher_hidden_size}); "
                            f"use at most {teacher_hidden_size} (null = the teacher's width)")  # fmt: skip
        return self


class Supernet(nn.Module):
    def __init__(
        self,
        space: SpaceConfig,
        vocab_size: int,
        max_positions: int,
        teacher_hidden_size: int,
        teacher_layers: int,
        type_vocab_size: int = 2,
        pad_token_id: int = 0,
    ) -> None:
        super().__init__()
        from ..modeling import ElmConfig  # local: keeps elm.supernet importable in isolation

        self.space = space.validate()
        self.arch_base = dict(
            hidden_size=space.hidden_size,
            embedding_size=space.embedding_size,
            vocab_size=vocab_size,
            max_positions=max_positions,
            type_vocab_size=type_vocab_size,
            causal=space.causal,
        )
        self.embeddings = ElmEmbeddings(
            ElmConfig.from_arch_dict({**self.arch_base, "layers": []}, hidden_dropout_prob=space.dropout,
                                     pad_token_id=pad_token_id)  # fmt: skip
        )
        self.layers = nn.ModuleList(
            nn.ModuleList(self._candidate(block, share) for block in space.blocks for share in space.shares)
            for _ in range(space.num_layers)
        )
        layer_map = list(space.layer_map) if space.layer_map else uniform_layer_map(space.num_layers, teacher_layers)
        if len(layer_map) != space.num_layers + 1 or not all(0 <= i <= teacher_layers for i in layer_map):
            raise ArchError(
                f"space.layer_map={layer_map} must list {space.num_layers + 1} teacher hidden-state "
                f"indices in [0, {teacher_layers}]"
            )
        self.layer_map = layer_map
        if space.hidden_size > teacher_hidden_size:
            raise ArchError(f"space.hidden_size={space.hidden_size} is wider than the teacher ({teacher_hidden_size})")
        # the shared teacher -> student basis (fixed; set by inheritance when the student is narrower)
        self.identity_basis = space.hidden_size == teacher_hidden_size
        self.register_buffer("basis_mean", torch.zeros(teacher_hidden_size))
        self.register_buffer("basis_proj", torch.eye(teacher_hidden_size, space.hidden_size))
        # variance of each layer's teacher target in the basis: the scale of the point-wise loss
        self.register_buffer("target_variance", torch.ones(space.num_layers + 1))
        self.active = [0] * space.num_layers
        self.pad_token_id = pad_token_id

    def _candidate(self, block: str, share: str) -> CandidateBlock:
        s = self.space
        mobile = block == "mobilebert"
        return CandidateBlock(
            block=block,
            hidden_size=s.hidden_size,
            max_heads=s.heads_of(block),
            head_dim=s.head_dim_of(block),
            share=share,
            ffn_init=s.ffn_init,
            ffn_max=s.ffn_max,
            num_ffn=s.mobilebert_num_ffn if mobile else 1,
            bottleneck_size=s.bottleneck_size if mobile else None,
            dropout=s.dropout,
            attention_dropout=s.dropout if s.attention_dropout is None else s.attention_dropout,
        )

    # ---- search-time path -----------------------------------------------------------------
    def candidates(self):
        """Yield ``(layer, index, key, block)`` for every candidate; key is e.g. ``L3.mobilebert.qv``."""
        for li, layer in enumerate(self.layers):
            for ci, cand in enumerate(layer):
                yield li, ci, f"L{li}.{cand.name}", cand

    @property
    def basis(self) -> Basis:
        return Basis(self.basis_mean, self.basis_proj)

    @torch.no_grad()
    def set_basis(self, basis: Basis, target_variance: torch.Tensor | None = None) -> None:
        """Install the shared basis (must be the identity when the widths agree) and the per-boundary
        variance of the teacher's states in it (``[num_layers + 1]``, boundary 0 = embeddings)."""
        if tuple(basis.proj.shape) != tuple(self.basis_proj.shape):
            raise ValueError(f"basis {tuple(basis.proj.shape)} does not fit {tuple(self.basis_proj.shape)}")
        if self.identity_basis and not basis.is_identity:
            raise ValueError("a student as wide as its teacher uses the identity basis")
        self.basis_mean.copy_(basis.mean)
        self.basis_proj.copy_(basis.proj)
        if target_variance is not None:
            self.target_variance.copy_(target_variance)

    def to_student(self, h: torch.Tensor) -> torch.Tensor:
        """Teacher states in the shared basis (no-op when the widths agree)."""
        if self.identity_basis:
            return h
        return (h - self.basis_mean.to(h.dtype)) @ self.basis_proj.to(h.dtype)

    def block_inputs(self, teacher_hidden_states, layer: int) -> torch.Tensor:
        return self.to_student(teacher_hidden_states[self.layer_map[layer]])

    def block_targets(self, teacher_hidden_states, layer: int) -> torch.Tensor:
        """The teacher's state a layer is distilled towards, in the teacher's coordinates (for RKD)."""
        return teacher_hidden_states[self.layer_map[layer + 1]]

    def blockwise(self, teacher_hidden_states, attention_mask=None, layers=None, chain=None):
        """Outputs of every candidate of every layer: list[list[Tensor]].

        By default every layer reads the teacher's mapped state (in the basis). ``chain[l]`` = a
        candidate index of layer l-1 makes layer l read that candidate's (detached) output of this
        same pass instead: chained training. ``layers`` restricts the pass (no chaining then)."""
        t = teacher_hidden_states[0].shape[1]
        mask = attention_bias(attention_mask, self.space.causal, t)
        outputs = []
        for li in layers if layers is not None else range(len(self.layers)):
            src = chain[li] if chain is not None and layers is None and li > 0 else None
            x = outputs[li - 1][src].detach() if src is not None else self.block_inputs(teacher_hidden_states, li)
            outputs.append([cand(x, mask, self.space.causal)[0] for cand in self.layers[li]])
        return outputs

    # ---- active path ----------------------------------------------------------------------
    def set_active(self, choice: list[int]) -> None:
        if len(choice) != len(self.layers) or any(not 0 <= c < len(self.layers[0]) for c in choice):
            raise ValueError(f"choice {choice} must pick one of {len(self.layers[0])} candidates per layer")
        self.active = list(choice)

    def active_arch(self, choice: list[int] | None = None) -> ArchConfig:
        choice = self.active if choice is None else choice
        layers = [self.layers[li][ci].layer_config() for li, ci in enumerate(choice)]
        return ArchConfig(**self.arch_base, layers=layers).validate()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        """Chain the active candidates from the student embeddings; returns the last hidden state."""
        x = self.embeddings(input_ids, token_type_ids)
        mask = attention_bias(attention_mask, self.space.causal, x.shape[1])
        for li, ci in enumerate(self.active):
            x, _ = self.layers[li][ci](x, mask, self.space.causal)
        return x

    def embedding_parameters(self) -> int:
        return ArchConfig(**self.arch_base, layers=[]).embedding_parameters()
