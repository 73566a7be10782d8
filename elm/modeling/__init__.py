"""The exported model: ``ElmConfig`` + ``ElmFor*`` Hugging Face classes, registered with the Auto API."""

from __future__ import annotations

import transformers

from ..blocks import family
from ..space import ArchConfig
from . import modeling_elm
from .configuration_elm import ElmConfig
from .modeling_elm import (
    ElmForCausalLM,
    ElmForMaskedLM,
    ElmForSequenceClassification,
    ElmModel,
    ElmPreTrainedModel,
)


def register() -> None:
    """Register ELM with the ``transformers`` Auto classes (idempotent; done on ``import elm``).

    ``register_for_auto_class`` makes ``save_pretrained`` copy this folder's modelling files
    into the export and write ``auto_map``, so ``trust_remote_code=True`` loads it without elm.
    """
    transformers.AutoConfig.register("elm", ElmConfig, exist_ok=True)
    ElmConfig.register_for_auto_class()
    for auto, name in modeling_elm.AUTO_MAP.items():  # the Auto classes the export's auto_map names
        cls = getattr(modeling_elm, name)
        getattr(transformers, auto).register(ElmConfig, cls, exist_ok=True)
        cls.register_for_auto_class(auto)


def config_from_arch(arch: ArchConfig, **kwargs) -> ElmConfig:
    """An ``ElmConfig`` for a validated architecture (extra kwargs: dropout, num_labels, ...), with
    the FFN activation and layer layout of each of its block families (``elm.blocks``)."""
    arch = arch.validate()
    kwargs.setdefault("block_activations", {layer.block: family(layer.block).activation for layer in arch.layers})
    kwargs.setdefault("block_layouts", {layer.block: family(layer.block).layout for layer in arch.layers
                                        if family(layer.block).layout != "post_ln"})  # fmt: skip
    return ElmConfig.from_arch_dict(arch.to_dict(), **kwargs)


def arch_from_config(config: ElmConfig) -> ArchConfig:
    return ArchConfig.from_dict(config.arch_dict())


__all__ = [
    "ElmConfig",
    "ElmModel",
    "ElmPreTrainedModel",
    "ElmForMaskedLM",
    "ElmForCausalLM",
    "ElmForSequenceClassification",
    "config_from_arch",
    "arch_from_config",
    "register",
]
