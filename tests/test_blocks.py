"""The block-family registry (elm.blocks): one description per family, asked by every stage."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from elm.blocks import BLOCKS, ArchError, BlockFamily, family, register
from elm.modeling.modeling_elm import ElmLayer
from elm.search.choose import layer_param_range
from elm.space import ArchConfig, LayerConfig, SpaceConfig
from elm.supernet import Supernet

SPACE = dict(num_layers=2, hidden_size=48, embedding_size=16, head_dim=8, ffn_init=12, ffn_unit=12, ffn_max=36,
             families={"bert": {"heads": 3}, "mobilebert": {"heads": 2, "head_dim": 6, "bottleneck_size": 24, "num_ffn": 2}})  # fmt: skip


def test_every_stage_builds_the_same_layer_fields_from_the_family():
    """The supernet's candidates, the space's reachable range and the baselines all take their
    LayerConfig fields from the family: a MobileBERT candidate has its own head width and FFN stack."""
    space = SpaceConfig(**SPACE).validate()
    net = Supernet(space, vocab_size=30, max_positions=8, teacher_hidden_size=48, teacher_layers=2)
    for _, _, key, cand in net.candidates():
        assert dataclasses.asdict(cand.layer_config()) == dict(
            num_heads=space.heads_of(cand.block), ffn_dim=space.ffn_init, **space.layer_fields(cand.block, cand.share)
        ), key
    mobile = space.layer_fields("mobilebert", "qv")
    assert (mobile["head_dim"], mobile["num_ffn"], mobile["bottleneck_size"]) == (6, 2, 24)
    assert space.layer_fields("bert", "none") == dict(block="bert", head_dim=8, share="none", num_ffn=1,
                                                      bottleneck_size=None)  # fmt: skip
    lo, hi = layer_param_range(space)
    every = [LayerConfig(num_heads=h, ffn_dim=f, **space.layer_fields(b, s))
             for b, s in itertools.product(space.blocks, space.shares)
             for h, f in ((1, space.ffn_init), (space.heads_of(b), space.ffn_max))]  # fmt: skip
    counts = [layer.num_parameters(48) for layer in every]
    assert (lo, hi) == (2 * min(counts), 2 * max(counts))


@pytest.mark.parametrize("name", sorted(n for n, f in BLOCKS.items() if not f.identity))  # skip: tests/test_skip.py
def test_family_parameter_count_is_exact(name):
    space = SpaceConfig(**SPACE).validate()
    layer = LayerConfig(num_heads=2, ffn_dim=24, **space.layer_fields(name, family(name).shares(space)[-1]))
    layer.validate(48)
    built = ElmLayer(_config(block_layouts={name: family(name).layout}), dataclasses.asdict(layer))
    assert layer.num_parameters(48) == sum(p.numel() for p in built.parameters())
    assert family(name).width(layer, 48) == (24 if family(name).bottleneck else 48)


def test_unknown_and_duplicate_families_are_clear_errors():
    with pytest.raises(ArchError, match=r"block 'gpt' is unknown; valid: bert, mobilebert, skip, llama"):
        family("gpt")
    with pytest.raises(ArchError, match="already registered"):
        register(BLOCKS["bert"])
    with pytest.raises(ArchError, match=r"layer.bottleneck_size=8 is only valid for block='mobilebert'"):
        LayerConfig("bert", 2, 8, 16, bottleneck_size=8).validate(48)


def test_a_registered_family_is_known_to_the_space_and_the_architecture(monkeypatch):
    """A family added through the registry alone: it brings its own space settings (defaults, set
    under ``space.families``), the space and LayerConfig accept it, count its parameters with its
    bottleneck, and plots label it (nothing else names it)."""
    wide = BlockFamily("widebert", "Wide", "#000000", bottleneck=True, stacked_ffns=False,
                       defaults=(("heads", 3), ("bottleneck_size", 16)))  # fmt: skip
    monkeypatch.setitem(BLOCKS, "widebert", wide)
    space = SpaceConfig(**{**SPACE, "blocks": ["bert", "widebert"]}).validate()
    assert space.heads_of("widebert") == 3 and space.layer_fields("widebert", "none")["bottleneck_size"] == 16
    space.families = {**space.families, "widebert": {"bottleneck_size": 24}}
    layer = LayerConfig(num_heads=3, ffn_dim=12, **space.validate().layer_fields("widebert", "none"))
    layer.validate(48)
    assert (layer.head_dim, layer.num_ffn, layer.bottleneck_size) == (8, 1, 24)
    space.families["widebert"] = {"num_ffn": 2}  # a setting the family does not have
    with pytest.raises(ArchError, match=r"space.families.widebert has unknown key\(s\) \['num_ffn'\]; valid: \['bottleneck_size', 'heads'\]"):
        space.validate()
    space.families["widebert"] = {"bottleneck_size": 24}
    arch = ArchConfig(hidden_size=48, embedding_size=16, vocab_size=30, max_positions=8, layers=[layer]).validate()
    assert ArchConfig.from_json(arch.to_json()).layers[0].block == "widebert"
    from elm.search import plots

    assert plots._layer_text(layer).startswith("Wide  |") and plots._colour("widebert") == "#000000"
    with pytest.raises(ArchError, match="exactly 1 FFN"):
        LayerConfig(num_heads=3, ffn_dim=12, **{**space.layer_fields("widebert", "none"), "num_ffn": 2}).validate(48)


def _config(**kw):
    from elm.modeling import ElmConfig

    return ElmConfig(hidden_size=48, layer_norm_eps=1e-12, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw)


def test_bottleneck_structure_follows_the_fields_in_the_exported_layer():
    """modeling_elm ships alone as remote code: its layer reads the bottleneck from the fields."""
    space = SpaceConfig(**SPACE).validate()
    mobile = ElmLayer(_config(), dataclasses.asdict(LayerConfig(num_heads=2, ffn_dim=12, **space.layer_fields("mobilebert", "none"))))
    bert = ElmLayer(_config(), dataclasses.asdict(LayerConfig(num_heads=2, ffn_dim=12, **space.layer_fields("bert", "none"))))
    assert mobile.bottleneck and hasattr(mobile, "bottleneck_in") and not bert.bottleneck
    x = torch.randn(2, 5, 48)
    assert mobile.eval()(x)[0].shape == bert.eval()(x)[0].shape == x.shape


def test_ffn_activation_comes_from_the_family_and_travels_with_the_export(monkeypatch, tmp_path):
    """The registry says each family's activation; an export records it per family
    (``block_activations``), so the remote code needs no table of block names. Exports written
    before the field existed keep their activations (GELU in BERT blocks, ReLU behind a bottleneck)."""
    import torch.nn.functional as F

    from elm.modeling import ElmConfig, ElmModel, config_from_arch
    from elm.supernet.elastic import ElasticFFN

    relu_bert = BlockFamily("relubert", "ReLU-BERT", "#111111", bottleneck=False, stacked_ffns=False,
                            defaults=(("heads", 3),), activation="relu")  # fmt: skip
    monkeypatch.setitem(BLOCKS, "relubert", relu_bert)
    space = SpaceConfig(**{**SPACE, "blocks": ["bert", "mobilebert", "relubert"]}).validate()
    layers = [LayerConfig(num_heads=2, ffn_dim=12, **space.layer_fields(b, "none")) for b in space.blocks]
    arch = ArchConfig(hidden_size=48, embedding_size=16, vocab_size=30, max_positions=8, layers=layers)
    config = config_from_arch(arch)
    assert config.block_activations == {"bert": "gelu", "mobilebert": "relu", "relubert": "relu"}
    model = ElmModel(config)
    assert [layer.ffns[0].act for layer in model.layers] == [F.gelu, F.relu, F.relu]
    assert ElasticFFN(48, 24, 12, "relubert", 0.0, 1e-12).act is F.relu  # the supernet asks the same family
    model.save_pretrained(tmp_path)
    assert ElmConfig.from_pretrained(tmp_path).block_activations == config.block_activations
    older = ElmConfig.from_arch_dict(arch.to_dict())  # no block_activations: an export from before
    assert [layer.ffns[0].act for layer in ElmModel(older).layers[:2]] == [F.gelu, F.relu]


TOY_LAYER = '''"""A test family's own exported layer: BERT attention, an FFN with tanh (a file of its own)."""
try:
    from .modeling_elm import ElmAttention, ElmFFN
except ModuleNotFoundError:
    from elm.modeling.modeling_elm import ElmAttention, ElmFFN


class TanhFFN(ElmFFN):
    def forward(self, x):
        return self.norm(x + self.dropout(self.down(self.up(x).tanh())))


def layer_parts(config, width, layer):
    attention = ElmAttention(config, width, layer["num_heads"], layer["head_dim"], layer["share"])
    return attention, [TanhFFN(config, width, layer["ffn_dim"], "gelu")]
'''


def test_a_family_with_its_own_layer_needs_no_file_outside_the_registry(monkeypatch, tmp_path):
    """A family whose exported layer differs lives in ``elm.blocks.<layout>_layer`` and the registry
    alone: the package's models build it, an export ships it, and it loads as remote code."""
    import importlib.util
    import sys

    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from elm.modeling import ElmModel, config_from_arch

    (tmp_path / "toy_layer.py").write_text(TOY_LAYER)
    spec = importlib.util.spec_from_file_location("elm.blocks.toy_layer", tmp_path / "toy_layer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "elm.blocks.toy_layer", module)
    toy = BlockFamily("toy", "Toy", "#333333", bottleneck=False, stacked_ffns=False, defaults=(("heads", 3),),
                      layout="toy")  # fmt: skip
    monkeypatch.setitem(BLOCKS, "toy", toy)
    space = SpaceConfig(**{**SPACE, "blocks": ["bert", "toy"]}).validate()
    layers = [LayerConfig(num_heads=2, ffn_dim=12, **space.layer_fields(b, "none")) for b in space.blocks]
    arch = ArchConfig(hidden_size=48, embedding_size=16, vocab_size=30, max_positions=8, layers=layers)
    torch.manual_seed(0)
    model = ElmModel(config_from_arch(arch)).eval()
    assert model.config.block_layouts == {"toy": "toy"}
    assert [type(layer.ffns[0]).__name__ for layer in model.layers] == ["ElmFFN", "TanhFFN"]
    model.save_pretrained(tmp_path / "toy_export")
    assert (tmp_path / "toy_export" / "modeling_elm_toy.py").read_text() == TOY_LAYER
    remote = get_class_from_dynamic_module("modeling_elm.ElmModel", tmp_path / "toy_export")  # the export's code
    loaded = remote.from_pretrained(tmp_path / "toy_export").eval()
    assert type(loaded.layers[1].ffns[0]).__module__.startswith("transformers_modules.")
    ids = torch.randint(0, 30, (2, 6))
    assert torch.equal(loaded(ids).last_hidden_state, model(ids).last_hidden_state)


def test_a_family_unknown_to_this_process_loads_with_what_its_export_recorded():
    """An export of a family registered in another process (post-LayerNorm: no ``block_layouts``
    entry) builds here from the config alone, with its recorded activation."""
    import torch.nn.functional as F

    layer = {**dataclasses.asdict(LayerConfig("bert", 2, 8, 12)), "block": "elsewhere"}
    built = ElmLayer(_config(block_activations={"elsewhere": "relu"}), layer)
    assert type(built.ffns[0]).__name__ == "ElmFFN" and built.ffns[0].act is F.relu


def test_a_layout_this_elm_lacks_is_a_clear_error():
    layer = dataclasses.asdict(LayerConfig("bert", 2, 8, 12))
    with pytest.raises(ArchError, match=r"layout 'newer' is not one this elm has \(no elm.blocks.newer_layer\); upgrade"):
        ElmLayer(_config(block_layouts={"bert": "newer"}), layer)


def test_a_family_with_an_unknown_activation_is_refused_when_registered():
    odd = BlockFamily("oddbert", "Odd", "#222222", bottleneck=False, stacked_ffns=False, defaults=(("heads", 3),),
                      activation="swish2")  # fmt: skip
    with pytest.raises(ArchError, match=r"activation='swish2'; valid: gelu, relu"):
        register(odd)
    assert "oddbert" not in BLOCKS


def test_spaces_written_with_flat_family_fields_still_load():
    """Search states and run dirs from before ``space.families`` (flat ``bert_heads``, ``bottleneck_size``,
    ...) give the same space; a key that was never a field is named."""
    flat = {k: v for k, v in SPACE.items() if k != "families"}
    flat.update(bert_heads=3, mobilebert_heads=2, mobilebert_head_dim=6, bottleneck_size=24, mobilebert_num_ffn=2)
    assert SpaceConfig.from_dict(flat) == SpaceConfig(**SPACE)
    assert SpaceConfig.from_dict(dataclasses.asdict(SpaceConfig(**SPACE))) == SpaceConfig(**SPACE)
    with pytest.raises(ArchError, match=r"space has unknown key\(s\) \['bert_head'\]"):
        SpaceConfig.from_dict({**flat, "bert_head": 2})
