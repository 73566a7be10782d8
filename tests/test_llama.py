"""The LLaMA-style family (elm.blocks.llama): pre-RMSNorm, rotary positions, grouped-query attention
and an elastic SwiGLU FFN, added through the block registry and mixed with BERT / MobileBERT."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from elm.blocks import family
from elm.blocks.llama_layer import rotary
from elm.modeling import ElmForCausalLM, ElmModel, config_from_arch
from elm.modeling.modeling_elm import ElmLayer, attention_bias
from elm.space import ArchConfig, ArchError, LayerConfig, SpaceConfig
from elm.supernet import Supernet, extract
from elm.supernet.basis import Moments
from elm.supernet.inherit import LayerSource
from elm.supernet.teacher_weights import TeacherLayer

SPACE = dict(num_layers=3, hidden_size=24, embedding_size=12, head_dim=4, ffn_init=8, ffn_unit=8, ffn_max=40, dropout=0.0,
             blocks=["bert", "mobilebert", "llama"], shares=["none", "qv"],
             families={"bert": {"heads": 4}, "mobilebert": {"heads": 2, "bottleneck_size": 12},
                       "llama": {"heads": 4, "group": 2}})  # fmt: skip


def make_supernet(causal: bool = False, seed: int = 0) -> Supernet:
    torch.manual_seed(seed)
    net = Supernet(SpaceConfig(**SPACE, causal=causal), vocab_size=50, max_positions=16, teacher_hidden_size=24,
                   teacher_layers=3)  # fmt: skip
    for p in net.parameters():  # away from the init, so every block computes something distinct
        p.data.add_(0.2 * torch.randn_like(p))
    return net.eval()


def llama_candidates(net: Supernet, layer: int = 0) -> dict[str, int]:
    return {c.share: ci for ci, c in enumerate(net.layers[layer]) if c.block == "llama"}


@pytest.mark.parametrize("causal", [False, True])
def test_extraction_equals_the_supernet_mixed_with_the_other_families(causal):
    """Pruned units and grown SwiGLU widths included, padded batch, llama beside BERT / MobileBERT
    layers; the exported parameter count is the architecture's."""
    net = make_supernet(causal)
    assert [c.name for c in net.layers[0]][-2:] == ["llama", "llama.gqa2"]
    for li in range(3):
        gqa = net.layers[li][llama_candidates(net, li)["gqa2"]]
        gqa.attention.keep_heads([1])  # one unit (a key/value head and its 2 queries) left
        gqa.grow_ffn(24)
    ids, mask = torch.randint(0, 50, (2, 9)), torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    ll = llama_candidates(net)
    for choice in ([ll["gqa2"], 0, ll["none"]], [2, ll["gqa2"], ll["gqa2"]], [ll["none"]] * 3):
        net.set_active(choice)
        arch = net.active_arch()
        model = extract(net, ElmModel).eval()
        with torch.no_grad():
            ref, got = net(ids, mask), model(ids, mask).last_hidden_state
        torch.testing.assert_close(got[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=1e-5)
        assert arch.num_parameters() == sum(p.numel() for p in model.parameters())
        assert model.config.block_layouts == {"llama": "llama"}
    assert net.layers[1][ll["gqa2"]].layer_config() == LayerConfig("llama", num_heads=2, head_dim=4, ffn_dim=24,
                                                                     share="gqa2")  # fmt: skip


@pytest.mark.parametrize("share, heads", [("none", 3), ("gqa2", 4), ("gqa4", 8)])
def test_parameter_count_is_exact(share, heads):
    layer = LayerConfig("llama", num_heads=heads, head_dim=6, ffn_dim=20, share=share)
    layer.validate(24)
    config = config_from_arch(ArchConfig(hidden_size=24, embedding_size=12, vocab_size=30, max_positions=8, layers=[layer]))
    built = ElmLayer(config, dataclasses.asdict(layer))
    assert layer.num_parameters(24) == sum(p.numel() for p in built.parameters())
    units = heads // (1 if share == "none" else int(share[3:]))
    assert built.attention.qkv.out_features == (heads + 2 * units) * 6  # one K and V per group


@pytest.mark.parametrize("layer, needle", [
    (LayerConfig("llama", 4, 4, 8, share="qv"), r"share='qv' is unknown for block='llama'; valid: none, or gqa<g>"),
    (LayerConfig("llama", 4, 4, 8, share="gqa1"), r"share='gqa1' is unknown"),
    (LayerConfig("llama", 3, 4, 8, share="gqa2"), r"num_heads=3 must be a multiple of 2"),
    (LayerConfig("llama", 4, 5, 8), r"head_dim=5 must be even"),
    (LayerConfig("bert", 4, 4, 8, share="gqa2"), r"share='gqa2' is unknown for block='bert'; valid: none, qv, kv"),
])  # fmt: skip
def test_bad_llama_layers_are_clear_errors(layer, needle):
    with pytest.raises(ArchError, match=needle):
        layer.validate(24)


def test_space_settings_and_candidates():
    space = SpaceConfig(**SPACE).validate()
    assert space.candidates()[-2:] == [("llama", "none"), ("llama", "gqa2")]
    assert family("llama").layer_config_fields(space, "gqa2", 3, 8)["num_heads"] == 4  # whole groups
    with pytest.raises(ArchError, match=r"space.families.llama.group=3 must be >= 2 and divide .*heads=8"):
        SpaceConfig(**{**SPACE, "families": {"llama": {"group": 3}, "bert": {"heads": 4}}}).validate()


def test_pruning_drops_whole_groups_and_pca_reads_the_gated_activation():
    net = make_supernet()
    cand = net.layers[0][llama_candidates(net)["gqa2"]]
    x = torch.randn(2, 7, 24)
    attn = cand.attention
    with torch.no_grad():  # reference: unit 0 silenced by hand (its output columns zeroed)
        saved = attn.out.weight.clone()
        attn.out.weight[:, :8] = 0
        ref = cand(x, None, False)[0]
        attn.out.weight.copy_(saved)
    attn.keep_heads([1])
    assert (attn.active_heads, cand.layer_config().num_heads) == (1, 2)
    torch.testing.assert_close(cand(x, None, False)[0], ref)
    cand.set_capture(True)
    cand(x, None, False)
    ffn = cand.ffns[0]
    n = ffn.norm(attn(x, None, False)[0])
    gated = F.silu(F.linear(n, ffn.gate.weight[:8], ffn.gate.bias[:8])) * F.linear(n, ffn.up.weight[:8], ffn.up.bias[:8])
    torch.testing.assert_close(ffn.last_hidden, gated)
    assert attn.last_context.shape == (2, 1, 7, 8)  # [B, units, T, group x head_dim]
    cand.set_capture(False)
    before = cand(x, None, False)[0]
    cand.grow_ffn(24)  # new units start with zero output weights
    torch.testing.assert_close(cand(x, None, False)[0], before)
    assert ffn.gate.weight[8:24].abs().sum() > 0 and ffn.up.weight[8:24].abs().sum() > 0


def test_causal_mask_and_rotary_are_relative():
    net = make_supernet(causal=True)
    cand = net.layers[0][llama_candidates(net)["gqa2"]]
    x = torch.randn(2, 10, 24)
    y = x.clone()
    y[:, 6:] = torch.randn(2, 4, 24)
    a, b = cand(x, None, True)[0], cand(y, None, True)[0]
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    scores = rotary(q) @ rotary(k).transpose(-1, -2)
    torch.testing.assert_close(rotary(q, 7) @ rotary(k, 7).transpose(-1, -2), scores)  # a shift changes nothing


def test_generation_with_cache_and_left_padding():
    torch.manual_seed(0)
    layers = [LayerConfig("llama", 4, 4, 12, share="gqa2"), LayerConfig("bert", 2, 4, 8),
              LayerConfig("llama", 2, 4, 8)]  # fmt: skip
    arch = ArchConfig(hidden_size=24, embedding_size=12, vocab_size=40, max_positions=32, type_vocab_size=0,
                      causal=True, layers=layers)  # fmt: skip
    model = ElmForCausalLM(config_from_arch(arch, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    prompts = [torch.randint(1, 40, (1, n)) for n in (3, 6)]
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    alone = [model.generate(p, **kw)[0, p.shape[1] :] for p in prompts]
    assert torch.equal(model.generate(prompts[0], use_cache=False, **kw)[0, 3:], alone[0])
    ids = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros(2, 6, dtype=torch.long)
    for row, p in enumerate(prompts):  # left padding
        ids[row, 6 - p.shape[1] :], mask[row, 6 - p.shape[1] :] = p[0], 1
    batched = model.generate(ids, attention_mask=mask, **kw)[:, 6:]
    assert torch.equal(batched[0], alone[0]) and torch.equal(batched[1], alone[1])


def _teacher_layer(width: int = 24, heads: int = 4, ffn: int = 16) -> TeacherLayer:
    g = torch.Generator().manual_seed(3)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    return TeacherLayer(q_w=r(width, width), q_b=r(width), k_w=r(width, width), k_b=r(width), v_w=r(width, width),
                        v_b=r(width), o_w=r(width, width), o_b=r(width), ln1_w=1 + r(width), ln1_b=r(width),
                        up_w=r(ffn, width), up_b=r(ffn), down_w=r(width, ffn), down_b=r(width), ln2_w=1 + r(width),
                        ln2_b=r(width), num_heads=heads)  # fmt: skip


def test_inheritance_mean_pools_the_group_keys_and_gates_with_the_teacher_neurons():
    cand = family("llama").candidate(24, 4, 6, "gqa2", ffn_init=8, ffn_max=16, dropout=0.0)
    layer = _teacher_layer()
    inputs = Moments.zeros(24)
    x = torch.randn(64, 24) * 2
    inputs.add(x)
    order, neurons = torch.tensor([2, 0, 3, 1]), torch.randperm(16)
    src = LayerSource(layer=layer, heads=order, neurons=neurons, head_mean=torch.zeros(4, 24),
                      neuron_mean=torch.rand(16), inputs=inputs)  # fmt: skip
    assert cand.inherit_from(src) == {"attention": True, "ffn": True}
    attn = cand.attention
    rows = attn.qkv.weight.view(2, 4, 6, 24)  # [unit, (q, q, k, v), head_dim, in]
    torch.testing.assert_close(rows[0, 0], layer.q_w[12:18])  # unit 0 = teacher heads 2 and 0
    torch.testing.assert_close(rows[0, 1], layer.q_w[0:6])
    torch.testing.assert_close(rows[0, 2], (layer.k_w[12:18] + layer.k_w[0:6]) / 2)
    torch.testing.assert_close(rows[1, 3], (layer.v_w[18:24] + layer.v_w[6:12]) / 2)
    torch.testing.assert_close(attn.norm.weight, torch.full((24,), float(x.pow(2).mean().sqrt())), rtol=1e-4, atol=1e-4)
    ffn = cand.ffns[0]
    n = torch.randn(5, 24)
    gated = F.silu(F.linear(n, ffn.gate.weight[:8], ffn.gate.bias[:8])) * F.linear(n, ffn.up.weight[:8], ffn.up.bias[:8])
    torch.testing.assert_close(gated, F.silu(F.linear(n, layer.up_w[neurons[:8]], layer.up_b[neurons[:8]])))


def test_attention_mask_helper_is_shared():
    """The llama layer takes the same boolean mask as the other families (one mask per model)."""
    net = make_supernet(causal=True)
    mask = attention_bias(torch.tensor([[1, 1, 1, 0]]), True, 4)
    cand = net.layers[1][llama_candidates(net, 1)["none"]]
    out = cand(torch.randn(1, 4, 24), mask, False)[0]
    assert out.shape == (1, 4, 24) and torch.isfinite(out).all()


@pytest.mark.parametrize("hidden", [384, 192])
def test_inherited_llama_candidates_start_closer_to_the_teacher_than_identity_or_random(teacher, hidden, tmp_path):
    """On MiniLM (held-out batches): after inheritance (mean-pooled GQA keys, gate from the teacher,
    least-squares residual writers) every llama candidate's block output is closer to its target
    than passing the input on, and than a random-init candidate, in the identity and a PCA basis."""
    from elm.data import load_corpus
    from elm.data.collate import sample_batches
    from elm.supernet.inherit import inherit_supernet

    data = load_corpus("bbc", teacher.tokenizer, seq_len=64, val_fraction=0.3, max_docs=60, cache_dir=str(tmp_path))
    fit, held = sample_batches(data["train"], 0, 3, 8), sample_batches(data["validation"], 1, 2, 8)
    space = SpaceConfig(num_layers=3, hidden_size=hidden, embedding_size=128, head_dim=32, blocks=["llama"],
                        families={"llama": {"heads": 6, "group": 2}}, dropout=0.0).validate()  # fmt: skip
    errors = {}
    for inherit in (True, False):
        torch.manual_seed(0)
        net = Supernet.for_teacher(space, teacher)
        inherit_supernet(net, teacher, fit, weights=inherit)
        for b in held:
            states = teacher(b["input_ids"], b["attention_mask"]).hidden_states
            valid = b["attention_mask"].bool()
            with torch.no_grad():
                outs = net.blockwise(states, b["attention_mask"])
            for li in range(3):
                y = net.to_student(net.block_targets(states, li))[valid]
                scale = (y - y.mean(0)).pow(2).mean()
                errors.setdefault(("identity", li), []).append(float((net.block_inputs(states, li)[valid] - y).pow(2).mean() / scale))
                for ci, cand in enumerate(net.layers[li]):
                    errors.setdefault((inherit, cand.name, li), []).append(float((outs[li][ci][valid] - y).pow(2).mean() / scale))
    mean = {k: sum(v) / len(v) for k, v in errors.items()}
    for name in ("llama", "llama.gqa2"):
        for li in range(3):
            assert mean[(True, name, li)] < 0.9 * min(mean[("identity", li)], mean[(False, name, li)]), (name, li, mean)


def test_settings_errors_come_before_anything_is_built():
    with pytest.raises(ArchError, match=r"the llama head width 5 .* must be even"):
        SpaceConfig(**{**SPACE, "head_dim": 5}).check_families()
    from elm.search.analysis import CKAConfig

    space = SpaceConfig(**{**SPACE, "families": {**SPACE["families"], "llama": {"heads": 8, "group": 4}}}).validate()
    CKAConfig(min_heads=2).validate(space)  # llama.gqa4 holds 2 key/value groups ...
    with pytest.raises(ValueError, match=r"cka.min_heads=3 must be an integer in \[1, 2\]"):
        CKAConfig(min_heads=3).validate(space)  # ... so it could never be pruned to 3


def test_a_config_without_layouts_still_builds_grouped_query_layers():
    from elm.modeling import ElmConfig

    layer = dataclasses.asdict(LayerConfig("llama", 4, 4, 8, share="gqa2"))
    built = ElmLayer(ElmConfig(hidden_size=24, layers=[layer]), layer)
    assert type(built.attention).__name__ == "ElmGroupedAttention"
