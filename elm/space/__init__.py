"""Search space: architecture descriptions (what a point of the ELM space is) and the space's settings."""

from .arch import BLOCK_TYPES, FFN_UNIT, SHARE_MODES, ArchConfig, ArchError, LayerConfig, layer_parameters
from .config import SpaceConfig

__all__ = ["ArchConfig", "ArchError", "LayerConfig", "SpaceConfig", "BLOCK_TYPES", "SHARE_MODES", "FFN_UNIT", "layer_parameters"]
