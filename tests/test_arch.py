"""ArchConfig / LayerConfig: validation messages, JSON round trip, exact parameter counts."""

from __future__ import annotations

import json

import pytest
import torch

from elm import ArchConfig, ArchError, LayerConfig, config_from_arch
from elm.modeling import (
    ElmForCausalLM,
    ElmForMaskedLM,
    ElmForSequenceClassification,
    ElmModel,
    arch_from_config,
)
from elm.space import layer_parameters


def mixed_arch(**overrides) -> ArchConfig:
    """BERT + MobileBERT blocks with every sharing mode (tiny sizes)."""
    kwargs = dict(
        hidden_size=24,
        embedding_size=12,
        vocab_size=40,
        max_positions=16,
        type_vocab_size=2,
        layers=[
            LayerConfig("bert", num_heads=2, head_dim=6, ffn_dim=20, share="qv"),
            LayerConfig(
                "mobilebert", num_heads=2, head_dim=4, ffn_dim=10, num_ffn=2, bottleneck_size=16, share="kv"
            ),
            LayerConfig("mobilebert", num_heads=1, head_dim=8, ffn_dim=12, num_ffn=1, bottleneck_size=24),
            LayerConfig("bert", num_heads=3, head_dim=4, ffn_dim=8, share="none"),
        ],
    )
    kwargs.update(overrides)
    return ArchConfig(**kwargs).validate()


def arch_dict(**overrides) -> dict:
    data = mixed_arch().to_dict()
    data.update(overrides)
    return data


def with_layer(index: int = 0, **fields) -> dict:
    data = arch_dict()
    data["layers"][index].update(fields)
    return data


# ---- validation ------------------------------------------------------------------------
INVALID = {
    "unknown block": (
        with_layer(0, block="transformer"),
        r"layers\[0\]\.block='transformer' is unknown; valid: bert, mobilebert",
    ),
    "unknown share": (with_layer(1, share="qk"), r"layers\[1\]\.share='qk' is unknown for block='mobilebert'; valid: none, qv, kv"),
    "zero heads": (with_layer(0, num_heads=0), r"layers\[0\]\.num_heads must be a positive integer, got 0"),
    "zero head_dim": (with_layer(2, head_dim=0), r"layers\[2\]\.head_dim must be a positive integer"),
    "zero ffn_dim": (with_layer(0, ffn_dim=0), r"layers\[0\]\.ffn_dim must be a positive integer, got 0"),
    "negative ffn_dim": (
        with_layer(3, ffn_dim=-132),
        r"layers\[3\]\.ffn_dim must be a positive integer, got -132",
    ),
    "float heads": (with_layer(0, num_heads=2.0), r"num_heads must be a positive integer, got 2\.0"),
    "bool heads": (with_layer(0, num_heads=True), r"num_heads must be a positive integer, got True"),
    "bottleneck > hidden": (
        with_layer(1, bottleneck_size=25),
        r"layers\[1\]\.bottleneck_size=25 is larger than hidden_size=24",
    ),
    "bottleneck missing": (
        with_layer(1, bottleneck_size=None),
        r"layers\[1\]\.bottleneck_size is required for block='mobilebert'",
    ),
    "bottleneck zero": (
        with_layer(1, bottleneck_size=0),
        r"layers\[1\]\.bottleneck_size must be a positive integer",
    ),
    "bottleneck on bert": (
        with_layer(0, bottleneck_size=16),
        r"layers\[0\]\.bottleneck_size=16 is only valid for block='mobilebert'",
    ),
    "bert num_ffn 2": (with_layer(0, num_ffn=2), r"layers\[0\]\.num_ffn=2: a 'bert' block has exactly 1 FFN"),
    "num_ffn 0": (with_layer(1, num_ffn=0), r"layers\[1\]\.num_ffn must be a positive integer"),
    "unknown arch field": (arch_dict(hiden_size=24), r"arch has unknown field\(s\) \['hiden_size'\]"),
    "unknown layer field": (with_layer(2, heads=4), r"layers\[2\] has unknown field\(s\) \['heads'\]"),
    "layer not an object": (arch_dict(layers=[3]), r"layers\[0\] must be a JSON object, got int"),
    "layers not a list": (arch_dict(layers={"block": "bert"}), r"layers must be a list"),
    "empty layers": (arch_dict(layers=[]), r"layers is empty; an architecture needs at least one layer"),
    "zero hidden": (arch_dict(hidden_size=0), r"hidden_size must be a positive integer, got 0"),
    "zero vocab": (arch_dict(vocab_size=0), r"vocab_size must be a positive integer"),
    "negative type vocab": (
        arch_dict(type_vocab_size=-1),
        r"type_vocab_size must be an integer >= 0, got -1",
    ),
    "causal not bool": (arch_dict(causal="yes"), r"causal must be true or false, got 'yes'"),
}


@pytest.mark.parametrize("data, message", list(INVALID.values()), ids=list(INVALID))
def test_invalid_arch_raises_clear_error(data, message):
    with pytest.raises(ArchError, match=message):
        ArchConfig.from_dict(data)
    # the same message through the JSON entry point
    with pytest.raises(ArchError, match=message):
        ArchConfig.from_json(json.dumps(data))


def test_arch_error_is_value_error_and_validate_catches_direct_construction():
    arch = ArchConfig(hidden_size=16, layers=[LayerConfig("mobilebert", bottleneck_size=32)])
    with pytest.raises(ValueError, match=r"bottleneck_size=32 is larger than hidden_size=16"):
        arch.validate()
    with pytest.raises(ArchError, match="layers is empty"):
        ArchConfig().validate()


def test_bottleneck_equal_to_hidden_and_type_vocab_zero_are_valid():
    arch = mixed_arch(type_vocab_size=0)
    assert arch.layers[2].bottleneck_size == arch.hidden_size
    assert arch.validate() is arch


def test_from_json_errors():
    with pytest.raises(ArchError, match="does not exist"):
        ArchConfig.from_json("/nonexistent/arch.json")
    with pytest.raises(ArchError, match="architecture JSON is not valid"):
        ArchConfig.from_json('{"hidden_size": 24,')
    with pytest.raises(ArchError, match="must be a JSON object, got list"):
        ArchConfig.from_dict([1, 2])
    with pytest.raises(ArchError, match="head='mlm' is unknown"):
        mixed_arch().num_parameters(head="mlm")


# ---- JSON ------------------------------------------------------------------------------
def test_json_round_trip_string_and_file(tmp_path):
    arch = mixed_arch(causal=True, type_vocab_size=0)
    text = arch.to_json()
    again = ArchConfig.from_json(text)
    assert again == arch
    assert isinstance(again.layers[1], LayerConfig)
    assert json.loads(text) == arch.to_dict()
    # leading whitespace is still a JSON string, not a path
    assert ArchConfig.from_json("\n  " + text) == arch

    path = tmp_path / "arch.json"
    assert arch.to_json(path) == text
    assert ArchConfig.from_json(path) == arch
    assert ArchConfig.from_json(str(path)) == arch


def test_config_round_trip_through_elm_config():
    arch = mixed_arch(causal=True)
    config = config_from_arch(arch, hidden_dropout_prob=0.0)
    assert config.num_hidden_layers == arch.num_layers
    assert arch_from_config(config) == arch


# ---- parameter counts --------------------------------------------------------------------
def _layers_all_modes() -> list[LayerConfig]:
    return [
        LayerConfig("bert", num_heads=2, head_dim=6, ffn_dim=20, share="qv"),
        LayerConfig(
            "mobilebert", num_heads=2, head_dim=4, ffn_dim=10, num_ffn=3, bottleneck_size=16, share="kv"
        ),
        LayerConfig("bert", num_heads=1, head_dim=5, ffn_dim=9, share="kv"),
        LayerConfig(
            "mobilebert", num_heads=3, head_dim=4, ffn_dim=12, num_ffn=1, bottleneck_size=8, share="qv"
        ),
        LayerConfig("mobilebert", num_heads=1, head_dim=8, ffn_dim=7, num_ffn=2, bottleneck_size=24),
        LayerConfig("bert", num_heads=3, head_dim=4, ffn_dim=8, share="none"),
    ]


COUNT_ARCHS = {
    "E<H,types2": dict(embedding_size=12, type_vocab_size=2),
    "E==H,types0": dict(embedding_size=24, type_vocab_size=0),
    "E>H,types2,causal": dict(embedding_size=32, type_vocab_size=2, causal=True),
    "E==H,types2": dict(embedding_size=24, type_vocab_size=2),
    "E<H,types0,causal": dict(embedding_size=12, type_vocab_size=0, causal=True),
}


@pytest.fixture(params=list(COUNT_ARCHS.values()), ids=list(COUNT_ARCHS))
def count_arch(request) -> ArchConfig:
    return ArchConfig(
        hidden_size=24, vocab_size=37, max_positions=11, layers=_layers_all_modes(), **request.param
    ).validate()


def numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_num_parameters_backbone(count_arch):
    model = ElmModel(config_from_arch(count_arch))
    assert count_arch.num_parameters() == numel(model)
    assert count_arch.embedding_parameters() == numel(model.embeddings)
    for layer_cfg, layer in zip(count_arch.layers, model.layers, strict=True):
        assert layer_cfg.num_parameters(count_arch.hidden_size) == numel(layer)
        assert layer_parameters(layer_cfg, count_arch.hidden_size) == numel(layer)


def test_num_parameters_lm_head(count_arch):
    model = ElmForMaskedLM(config_from_arch(count_arch))
    assert count_arch.num_parameters(head="lm") == numel(model)
    # the decoder is the word embedding itself, not a copy
    assert all(p is not model.elm.embeddings.word.weight for p in model.lm_head.parameters())
    if count_arch.causal:
        assert count_arch.num_parameters(head="lm") == numel(ElmForCausalLM(config_from_arch(count_arch)))


@pytest.mark.parametrize("num_labels", [1, 3])
def test_num_parameters_cls_head(count_arch, num_labels):
    model = ElmForSequenceClassification(config_from_arch(count_arch, num_labels=num_labels))
    assert count_arch.num_parameters(head="cls", num_labels=num_labels) == numel(model)


def test_sharing_saves_one_projection():
    h = 24
    base = dict(num_heads=2, head_dim=6, ffn_dim=20)
    none = LayerConfig("bert", share="none", **base).num_parameters(h)
    a = 2 * 6
    for share in ("qv", "kv"):
        assert none - LayerConfig("bert", share=share, **base).num_parameters(h) == h * a + a
