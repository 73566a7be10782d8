"""Architecture descriptions: the one object that names a point of the ELM search space.

An :class:`ArchConfig` configures the supernet's active path, the exported Hugging Face
model (:class:`elm.modeling.ElmConfig`) and the reports. It round-trips through JSON and
counts its own parameters without building a model (the count is tested against ``numel``).

Block layout (what the parameter count mirrors, see ``elm/modeling/modeling_elm.py``):

* ``bert`` block at hidden size H: attention (Q, K, V: H -> A, O: A -> H, LayerNorm H) and
  one FFN (H -> d -> H, LayerNorm H), with A = num_heads * head_dim.
* ``mobilebert`` block: bottleneck in (H -> B, LayerNorm B), attention at width B,
  ``num_ffn`` stacked FFNs at width B (each B -> d -> B, LayerNorm B), bottleneck out
  (B -> H) with the residual and LayerNorm at H. [paper] bottleneck blocks; [project decision]
  LayerNorm everywhere (the earlier W-PCA code used NoNorm) and ReLU in MobileBERT FFNs.
* ``share``: ``qv`` ties the query and value projections to one parameter, ``kv`` ties key
  and value; either saves one H x A projection. [paper]
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..blocks import BLOCKS, SHARE_MODES, ArchError, family  # noqa: F401 (SHARE_MODES: re-exported)

BLOCK_TYPES = tuple(BLOCKS)  # the built-in block families; checks read elm.blocks.BLOCKS (registry)
FFN_UNIT = 132  # [paper] FFN widths move in units of 132

BlockType = str  # a name in BLOCK_TYPES
ShareMode = str  # one of its family's share_modes(): "none", "qv", "kv" (BERT families), "gqa<g>" (llama)


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ArchError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class LayerConfig:
    """One layer of a searched model."""

    block: BlockType = "bert"
    num_heads: int = 4
    head_dim: int = 64
    ffn_dim: int = FFN_UNIT
    num_ffn: int = 1
    bottleneck_size: int | None = None
    share: ShareMode = "none"

    @property
    def attention_size(self) -> int:
        return self.num_heads * self.head_dim

    def width(self, hidden_size: int) -> int:
        """Width the attention and FFNs of this block work at (H, or B behind a bottleneck)."""
        return family(self.block).width(self, hidden_size)

    def validate(self, hidden_size: int, where: str = "layer") -> None:
        if self.block not in BLOCKS:
            raise ArchError(f"{where}.block={self.block!r} is unknown; valid: {', '.join(BLOCKS)}")
        family(self.block).check_share(self.share, where)
        if not family(self.block).identity:  # (an identity block checks its zeros itself)
            for name in ("num_heads", "head_dim", "ffn_dim", "num_ffn"):
                _positive_int(f"{where}.{name}", getattr(self, name))
        family(self.block).validate(self, where)
        if self.bottleneck_size is not None:
            _positive_int(f"{where}.bottleneck_size", self.bottleneck_size)
            if self.bottleneck_size > hidden_size:
                raise ArchError(
                    f"{where}.bottleneck_size={self.bottleneck_size} is larger than "
                    f"hidden_size={hidden_size}; it must be <= hidden_size"
                )

    def num_parameters(self, hidden_size: int) -> int:
        return layer_parameters(self, hidden_size)


@dataclass
class ArchConfig:
    """A whole model: embeddings plus one :class:`LayerConfig` per layer."""

    hidden_size: int = 256
    embedding_size: int = 128
    vocab_size: int = 30522
    max_positions: int = 512
    type_vocab_size: int = 2
    causal: bool = False
    layers: list[LayerConfig] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.layers, (list, tuple)):
            raise ArchError(f"layers must be a list of layer objects, got {type(self.layers).__name__}")
        self.layers = [layer if isinstance(layer, LayerConfig)
                       else LayerConfig(**_known(LayerConfig, layer, f"layers[{i}]"))
                       for i, layer in enumerate(self.layers)]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def validate(self) -> ArchConfig:
        for name in ("hidden_size", "embedding_size", "vocab_size", "max_positions"):
            _positive_int(name, getattr(self, name))
        types = self.type_vocab_size
        if isinstance(types, bool) or not isinstance(types, int) or types < 0:
            raise ArchError(f"type_vocab_size must be an integer >= 0, got {types!r}")
        if not isinstance(self.causal, bool):
            raise ArchError(f"causal must be true or false, got {self.causal!r}")
        if not self.layers:
            raise ArchError("layers is empty; an architecture needs at least one layer")
        for i, layer in enumerate(self.layers):
            layer.validate(self.hidden_size, where=f"layers[{i}]")
        return self

    # ---- (de)serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArchConfig:
        if not isinstance(data, dict):
            raise ArchError(f"an architecture must be a JSON object, got {type(data).__name__}")
        return cls(**_known(cls, data, "arch")).validate()

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, source: str | Path) -> ArchConfig:
        """Load from a JSON string or a path to a JSON file."""
        text = str(source)
        if not text.lstrip().startswith("{"):
            path = Path(source)
            if not path.is_file():
                raise ArchError(f"architecture file {str(path)!r} does not exist")
            text = path.read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ArchError(f"architecture JSON is not valid: {err}") from None
        return cls.from_dict(data)

    # ---- size ----------------------------------------------------------------------------
    def embedding_parameters(self) -> int:
        e, h = self.embedding_size, self.hidden_size
        n = (self.vocab_size + self.max_positions + self.type_vocab_size) * e + 2 * h
        if e != h:
            n += e * h + h
        return n

    def num_parameters(self, head: Literal["none", "lm", "cls"] = "none", num_labels: int = 2) -> int:
        """Parameters of the backbone, plus the LM head (tied decoder) or a classifier head."""
        n = self.embedding_parameters() + sum(layer.num_parameters(self.hidden_size) for layer in self.layers)
        h, e = self.hidden_size, self.embedding_size
        if head == "lm":
            n += h * e + e + 2 * e + self.vocab_size  # transform H->E, LayerNorm E, decoder bias
        elif head == "cls":
            n += h * h + h + h * num_labels + num_labels  # pooler + classifier
        elif head != "none":
            raise ArchError(f"head={head!r} is unknown; valid: none, lm, cls")
        return n


def _known(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ArchError(f"{where} must be a JSON object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ArchError(f"{where} has unknown field(s) {unknown}; valid: {sorted(names)}")
    return dict(data)


def layer_parameters(layer: LayerConfig, hidden_size: int) -> int:
    """Exact parameter count of one block, from its description alone (its family's count)."""
    return family(layer.block).parameters(layer, hidden_size)
