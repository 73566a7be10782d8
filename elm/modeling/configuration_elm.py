"""``ElmConfig``: the Hugging Face config of a searched ELM model.

It stores the per-layer architecture as plain dicts (the fields of ``elm.space.LayerConfig``)
so that this file, together with ``modeling_elm.py``, is self-contained and can be shipped
with an export for ``trust_remote_code=True`` loading without ``import elm``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import transformers
from transformers import PretrainedConfig
from transformers.modeling_outputs import BaseModelOutputWithPast


def check_transformers(outputs: type = BaseModelOutputWithPast) -> None:
    """Refuse, at import, a transformers whose output classes lack the ``cache`` field the models
    fill (older than the tested floor, 5.24): otherwise the first forward fails with an
    unexpected-keyword ``TypeError`` far from the cause. This file loads first in every path
    (``import elm`` and ``trust_remote_code=True``), so the check covers exports too."""
    if "cache" not in {field.name for field in dataclasses.fields(outputs)}:
        raise ImportError(f"ELM models need transformers >= 5.24 (installed: {transformers.__version__}); "
                          "upgrade with: pip install -U 'transformers>=5.24'")


check_transformers()


class ElmConfig(PretrainedConfig):
    model_type = "elm"

    def __init__(
        self,
        vocab_size: int = 30522,
        hidden_size: int = 256,
        embedding_size: int = 128,
        max_position_embeddings: int = 512,
        type_vocab_size: int = 2,
        causal: bool = False,
        layers: list[dict[str, Any]] | None = None,
        hidden_dropout_prob: float = 0.1,
        attention_probs_dropout_prob: float = 0.1,
        layer_norm_eps: float = 1e-12,
        initializer_range: float = 0.02,
        mlm_masked_only: bool = True,
        classifier_dropout: float | None = None,
        pad_token_id: int | None = 0,
        block_activations: dict[str, str] | None = None,
        block_layouts: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.embedding_size = embedding_size
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.causal = causal
        self.layers = [dict(layer) for layer in (layers or [])]
        self.num_hidden_layers = len(self.layers)
        self.num_attention_heads = max((layer.get("num_heads", 1) for layer in self.layers), default=1)
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.mlm_masked_only = mlm_masked_only
        self.classifier_dropout = classifier_dropout
        # FFN activation per block family ({"bert": "gelu", ...}), written from elm's block registry
        # so that the remote code needs none (modeling_elm.block_activation)
        self.block_activations = dict(block_activations or {})
        # layer layout per block family when not the post-LayerNorm one ({"llama": "llama"}), idem
        self.block_layouts = dict(block_layouts or {})
        kwargs.setdefault("is_decoder", causal)
        super().__init__(pad_token_id=pad_token_id, **kwargs)

    def arch_dict(self) -> dict[str, Any]:
        """The architecture fields, in the form ``elm.space.ArchConfig.from_dict`` takes."""
        return {
            "hidden_size": self.hidden_size,
            "embedding_size": self.embedding_size,
            "vocab_size": self.vocab_size,
            "max_positions": self.max_position_embeddings,
            "type_vocab_size": self.type_vocab_size,
            "causal": self.causal,
            "layers": [dict(layer) for layer in self.layers],
        }

    @classmethod
    def from_arch_dict(cls, arch: dict[str, Any], **kwargs: Any) -> ElmConfig:
        return cls(
            vocab_size=arch["vocab_size"],
            hidden_size=arch["hidden_size"],
            embedding_size=arch["embedding_size"],
            max_position_embeddings=arch["max_positions"],
            type_vocab_size=arch.get("type_vocab_size", 2),
            causal=arch.get("causal", False),
            layers=arch["layers"],
            **kwargs,
        )
