"""The identity family ``skip`` (elm.blocks.SKIP): a zero-parameter candidate per layer, so the DP
trades depth for width; a chosen architecture simply has fewer layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from elm.blocks import family
from elm.compare.baselines import random_arch
from elm.modeling import ElmModel
from elm.retrain.init import InitError, match_choice
from elm.search.analysis import PCAConfig, analyse, grow_widths
from elm.search.choose import choose, layer_param_range
from elm.search.score import ChainScorer, model_chain, supernet_chain
from elm.space import ArchConfig, ArchError, LayerConfig, SpaceConfig
from elm.supernet import Supernet, extract

SPACE = dict(num_layers=3, hidden_size=24, embedding_size=12, head_dim=4, ffn_init=8, ffn_unit=8, ffn_max=40, dropout=0.0,
             families={"bert": {"heads": 4}, "mobilebert": {"heads": 3, "bottleneck_size": 12, "num_ffn": 2}},
             blocks=["bert", "mobilebert", "skip"], shares=["none", "qv"])  # fmt: skip


def make_supernet(seed: int = 0, **kw) -> Supernet:
    torch.manual_seed(seed)
    net = Supernet(SpaceConfig(**{**SPACE, **kw}), vocab_size=50, max_positions=16, teacher_hidden_size=24,
                   teacher_layers=3)  # fmt: skip
    for p in net.parameters():  # away from the init, so that every block computes something distinct
        p.data.add_(0.2 * torch.randn_like(p))
    return net.eval()


def skip_index(net: Supernet) -> int:
    return next(ci for ci, c in enumerate(net.layers[0]) if c.identity)


def test_skip_is_a_zero_parameter_layer_of_the_space():
    space = SpaceConfig(**SPACE).validate()
    assert space.candidates()[-1] == ("skip", "none") and len(space.candidates()) == 5  # no sharing modes
    layer = LayerConfig(**family("skip").layer_config_fields(space, "qv", num_heads=3, ffn_dim=16))
    assert (layer.num_heads, layer.ffn_dim, layer.num_ffn, layer.share) == (0, 0, 0, "none")
    layer.validate(24)
    assert layer.num_parameters(24) == 0
    with pytest.raises(ArchError, match=r"layer.num_heads=2: a 'skip' block has none \(0\)"):
        LayerConfig(block="skip", num_heads=2, head_dim=0, ffn_dim=0, num_ffn=0).validate(24)
    with pytest.raises(ArchError, match="only identity blocks"):
        SpaceConfig(**{**SPACE, "blocks": ["skip"]}).validate()
    assert layer_param_range(space)[0] == 0  # every layer may be skipped ...


def test_extraction_drops_skipped_layers_and_keeps_the_supernet_chain():
    """For skips first, in the middle and last, the exported model is shorter and its states are
    the supernet chain's states at ``kept_boundaries`` (the last boundary of each skipped run)."""
    net = make_supernet()
    s = skip_index(net)
    ids, mask = torch.randint(0, 50, (2, 9)), torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    for choice, boundaries in (([s, 0, 2], [1, 2, 3]), ([1, s, 3], [0, 2, 3]), ([0, 2, s], [0, 1, 3]),
                               ([s, s, 1], [2, 3]), ([0, 1, 2], [0, 1, 2, 3])):  # fmt: skip
        net.set_active(choice)
        assert net.kept_boundaries() == boundaries
        arch = net.active_arch()
        assert arch.num_layers == len(boundaries) - 1 and all(layer.block != "skip" for layer in arch.layers)
        model = extract(net, ElmModel).eval()
        assert sum(p.numel() for p in model.parameters()) == arch.num_parameters()
        chain, states = supernet_chain(net, choice, ids, mask), model_chain(model, ids, mask)
        for state, b in zip(states, boundaries, strict=True):
            torch.testing.assert_close(state, chain[b], atol=1e-5, rtol=1e-5)
    with pytest.raises(ArchError, match="skips every layer"):
        net.active_arch([s, s, s])


def test_the_dp_trades_a_layer_for_width_and_never_returns_an_empty_model():
    net = make_supernet()
    s = skip_index(net)
    keys = [key for *_, key, _ in net.candidates()]
    scores = {key: 1.0 for key in keys}
    for li in range(3):  # a skip costs little score; the big MobileBERT block is the best block
        scores[f"L{li}.skip"], scores[f"L{li}.mobilebert"] = 1.05, 0.2
    mobile = net.layers[0][2].num_parameters()
    out = choose(net, scores, {"two": 2 * mobile + 10, "none": 10})
    point = out["chosen"]["two"]
    assert sorted(point["choice"])[0] == 2 and point["choice"].count(s) == 1
    assert point["layer_params"] == 2 * mobile and len(point["arch"]["layers"]) == 2
    assert "none" not in out["chosen"] and "at least one layer" in out["infeasible"]["none"]
    for li in range(3):  # skipping is now the best block everywhere: still one layer is kept, the best one
        scores[f"L{li}.skip"] = 0.1
    scores["L1.bert"] = 0.15
    point = choose(net, scores, {"all": 10**9})["chosen"]["all"]
    assert point["choice"] == [s, 0, s] and point["score"] == pytest.approx(0.35)
    assert not any(all(c == s for c in p["choice"]) for p in choose(net, scores, {"all": 10**9})["pareto"])


def test_analysis_and_growth_leave_the_identity_alone():
    net = make_supernet()
    g = torch.Generator().manual_seed(1)
    hidden = [torch.randn(4, 8, 24, generator=g) for _ in range(4)]
    result = analyse(net, hidden, torch.ones(4, 8, dtype=torch.long), PCAConfig(unit=8))
    assert not any(key.endswith("skip") for key in result.pca) and len(result.pca) == 3 * 4
    events = grow_widths(net, result, PCAConfig(unit=8, scope="global", top_k=100))
    assert len(events) == 12 and not any(e["candidate"].endswith("skip") for e in events)
    outs = net.blockwise(hidden)
    assert all(torch.equal(outs[li][skip_index(net)], hidden[li]) for li in range(3))  # teacher state passed on


def test_match_choice_places_a_shorter_arch_and_prefers_the_recorded_choice():
    net = make_supernet()
    s = skip_index(net)
    arch = net.active_arch([0, 0, s])  # [s, 0, 0] and [0, s, 0] give the same arch (equal configs)
    assert match_choice(net, arch) == [0, 0, s]  # the first placement that fits ...
    assert match_choice(net, arch, recorded=[[1, 1, 1], [s, 0, 0]]) == [s, 0, 0]  # ... unless the search chose it
    other = ArchConfig(**{**arch.to_dict(), "layers": [LayerConfig(block="bert", num_heads=1, head_dim=4, ffn_dim=8)]})
    with pytest.raises(InitError, match="does not come from this search"):
        match_choice(net, other)


def test_random_baseline_draws_shorter_models_of_the_space():
    space = SpaceConfig(**SPACE).validate()
    like = ArchConfig(hidden_size=24, embedding_size=12, vocab_size=50, max_positions=16, layers=[LayerConfig()])
    rng = np.random.default_rng(0)
    _, hi = layer_param_range(space)
    depths = set()
    for _ in range(30):
        arch = random_arch(space, hi, rng, like).validate()
        depths.add(arch.num_layers)
        assert all(layer.block in ("bert", "mobilebert") for layer in arch.layers)
    assert depths <= {1, 2, 3} and len(depths) > 1


def test_chained_random_init_is_scored_at_the_kept_boundaries():
    net = make_supernet()
    s = skip_index(net)
    ids, mask = torch.randint(0, 50, (2, 7)), torch.ones(2, 7, dtype=torch.long)
    with torch.no_grad():
        hidden = [torch.randn(2, 7, 24) for _ in range(4)]
    scorer = ChainScorer(net, [(ids, mask, hidden)], point=1.0)
    choice = [0, s, 2]
    net.set_active(choice)
    model = extract(net, ElmModel).eval()
    whole, short = scorer.of_choice(choice), scorer.of_model(model, net.kept_boundaries(choice))
    assert len(short["rkd"]) == 3 and len(whole["rkd"]) == 4
    assert short["rkd"] == pytest.approx([whole["rkd"][b] for b in net.kept_boundaries(choice)], abs=1e-5)
