"""Search space: architecture descriptions (what a point of the ELM space is)."""

from .arch import BLOCK_TYPES, FFN_UNIT, SHARE_MODES, ArchConfig, ArchError, LayerConfig, layer_parameters

__all__ = ["ArchConfig", "ArchError", "LayerConfig", "BLOCK_TYPES", "SHARE_MODES", "FFN_UNIT", "layer_parameters"]
