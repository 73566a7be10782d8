"""Elastic supernet: candidate BERT/MobileBERT blocks per layer with elastic heads and FFN width."""

from .elastic import (
    CandidateBlock,
    ElasticAttention,
    ElasticFFN,
    ElasticLinear,
    IdentityCandidate,
    uniform_layer_map,
)
from .extract import copy_candidate, extract
from .supernet import CommonDropout, SpaceConfig, Supernet  # SpaceConfig lives in elm.space; re-exported

__all__ = [
    "CandidateBlock",
    "CommonDropout",
    "IdentityCandidate",
    "ElasticAttention",
    "ElasticFFN",
    "ElasticLinear",
    "SpaceConfig",
    "Supernet",
    "copy_candidate",
    "extract",
    "uniform_layer_map",
]
