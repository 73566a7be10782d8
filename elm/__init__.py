"""elm: Elastic Architecture Search for compact language models.

Pipeline: ``elm.space`` (what an architecture is) -> ``elm.supernet`` (elastic candidates) ->
``elm.search`` (PCA growth, CKA pruning, relational KD, budgeted choice) -> ``elm.retrain``
(distil + export) -> ``elm.finetune`` / ``elm.compare`` (evaluate); ``elm.api`` runs each stage from
Python (``elm.api.search(...)``, ``elm.api.retrain(...)``). ``import elm`` registers the exported model
with the ``transformers`` Auto classes.
"""

from .modeling import (
    ElmConfig,
    ElmForCausalLM,
    ElmForMaskedLM,
    ElmForSequenceClassification,
    ElmModel,
    arch_from_config,
    config_from_arch,
    register,
)
from .space import ArchConfig, ArchError, LayerConfig

register()

from . import api  # noqa: E402  (the stages as functions; imports them lazily)

__version__ = "0.1.0"

__all__ = [
    "api",
    "ArchConfig",
    "ArchError",
    "LayerConfig",
    "ElmConfig",
    "ElmModel",
    "ElmForMaskedLM",
    "ElmForCausalLM",
    "ElmForSequenceClassification",
    "config_from_arch",
    "arch_from_config",
]
