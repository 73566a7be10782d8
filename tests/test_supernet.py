"""Elastic supernet: growth, head pruning, extraction, block-wise wiring and analysis (the search
trainer: test_search_trainer.py).

Every check compares against an independent computation (plain torch written out here), a
second copy of the module, or the standalone model that extraction produces; nothing is mocked.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from elm.modeling import ElmForCausalLM, ElmForMaskedLM, ElmModel
from elm.modeling.modeling_elm import attention_bias
from elm.search.analysis import CKAConfig, PCAConfig, analyse, grow_widths, prune_heads
from elm.space import ArchError
from elm.supernet import (
    CandidateBlock,
    CommonDropout,
    ElasticAttention,
    ElasticFFN,
    SpaceConfig,
    Supernet,
    extract,
    uniform_layer_map,
)

BLOCKS = ("bert", "mobilebert")
SHARES = ("none", "qv", "kv")
HIDDEN, FFN_INIT, FFN_MAX = 24, 8, 40


def make_block(block: str, share: str = "none", seed: int = 0) -> CandidateBlock:
    torch.manual_seed(seed)
    mobile = block == "mobilebert"
    return CandidateBlock(
        block, HIDDEN, max_heads=2 if mobile else 4, head_dim=4, share=share, ffn_init=FFN_INIT,
        ffn_max=FFN_MAX, num_ffn=2 if mobile else 1, bottleneck_size=12 if mobile else None, dropout=0.0,
    )  # fmt: skip


def make_space(bert: dict | None = None, mobilebert: dict | None = None, **kw) -> SpaceConfig:
    """A small space; ``bert`` / ``mobilebert`` change those families' settings (``space.families``)."""
    families = {"bert": {"heads": 4, **(bert or {})},
                "mobilebert": {"heads": 3, "bottleneck_size": 12, "num_ffn": 2, **(mobilebert or {})}}  # fmt: skip
    base = dict(num_layers=2, hidden_size=HIDDEN, embedding_size=12, head_dim=4, families=families, ffn_init=FFN_INIT,
                ffn_unit=8, ffn_max=FFN_MAX, dropout=0.0)  # fmt: skip
    return SpaceConfig(**{**base, **kw})


def make_supernet(seed: int = 0, teacher_hidden: int = 32, teacher_layers: int = 4, **kw) -> Supernet:
    torch.manual_seed(seed)
    return Supernet(make_space(**kw), vocab_size=50, max_positions=16, teacher_hidden_size=teacher_hidden,
                    teacher_layers=teacher_layers)  # fmt: skip


def mse_step(module, optimizer, x, target, *args) -> None:
    optimizer.zero_grad()
    out = module(x, *args)
    F.mse_loss(out[0] if isinstance(out, tuple) else out, target).backward()
    optimizer.step()


def perturb_(module: torch.nn.Module, std: float = 0.05, seed: int = 1) -> None:
    """Move every parameter off its init (LayerNorms, biases, inactive slices included), so a
    copy that forgets a tensor or reads the wrong slice shows up."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


# ---- growth ---------------------------------------------------------------------------------


def test_ffn_growth_keeps_output_and_new_units_train() -> None:
    torch.manual_seed(0)
    ffn = ElasticFFN(HIDDEN, FFN_MAX, FFN_INIT, "bert", dropout=0.0, eps=1e-12)
    perturb_(ffn)  # leftovers in the inactive slice (as a shrink or a load would leave) must not leak in
    x, target = torch.randn(2, 5, HIDDEN), torch.randn(2, 5, HIDDEN)
    opt = torch.optim.AdamW(ffn.parameters(), lr=1e-2)
    mse_step(ffn, opt, x, target)  # the old units are trained, not at init
    before = ffn(x)
    ffn.grow(24, opt)
    assert ffn.active_dim == 24
    torch.testing.assert_close(ffn(x), before, atol=1e-6, rtol=0)

    new = slice(FFN_INIT, 24)
    opt.zero_grad()
    F.mse_loss(ffn(x), target).backward()
    assert ffn.down.weight.grad[:, new].abs().min() > 0  # live inputs: the output weights learn at once
    assert torch.all(ffn.up.weight.grad[new] == 0)  # zero output weights: no signal to the inputs yet
    assert torch.all(ffn.up.weight.grad[24:] == 0) and torch.all(ffn.down.weight.grad[:, 24:] == 0)
    opt.step()
    assert ffn.down.weight[:, new].abs().min() > 0
    opt.zero_grad()
    F.mse_loss(ffn(x), target).backward()
    assert ffn.up.weight.grad[new].abs().sum(dim=1).min() > 0  # every new unit now gets gradient


@pytest.mark.parametrize("block", BLOCKS)
def test_block_growth_keeps_output_and_new_units_train(block: str) -> None:
    cand = make_block(block).eval()
    perturb_(cand)  # inactive slices hold leftovers too
    x, target = torch.randn(2, 6, HIDDEN), torch.randn(2, 6, HIDDEN)
    opt = torch.optim.AdamW(cand.parameters(), lr=1e-2)
    mse_step(cand, opt, x, target)
    params = cand.num_parameters()
    before = cand(x)[0]
    cand.grow_ffn(FFN_INIT + 16, opt)
    assert cand.ffn_dim == FFN_INIT + 16 and all(f.active_dim == FFN_INIT + 16 for f in cand.ffns)
    assert cand.num_parameters() > params
    torch.testing.assert_close(cand(x)[0], before, atol=1e-6, rtol=0)

    new = slice(FFN_INIT, FFN_INIT + 16)
    for _ in range(2):
        mse_step(cand, opt, x, target)
    opt.zero_grad()
    F.mse_loss(cand(x)[0], target).backward()
    for ffn in cand.ffns:  # stacked MobileBERT FFNs all grew and all train
        assert ffn.down.weight[:, new].abs().sum(dim=0).min() > 0
        assert ffn.up.weight.grad[new].abs().sum(dim=1).min() > 0
        assert ffn.down.weight.grad[:, new].abs().sum(dim=0).min() > 0


def test_growth_resets_adam_state_of_new_slice_only_and_checks_bounds() -> None:
    torch.manual_seed(0)
    ffn = ElasticFFN(HIDDEN, FFN_MAX, FFN_INIT, "mobilebert", dropout=0.0, eps=1e-12)
    opt = torch.optim.AdamW(ffn.parameters(), lr=1e-2)
    mse_step(ffn, opt, torch.randn(2, 4, HIDDEN), torch.randn(2, 4, HIDDEN))
    stale = (ffn.up.weight, ffn.up.bias, ffn.down.weight)
    with torch.no_grad():  # stale statistics everywhere (as after an earlier, longer activation)
        for p in stale:
            for key in ("exp_avg", "exp_avg_sq"):
                opt.state[p][key].fill_(1.0)
        ffn.up.weight[FFN_INIT:].fill_(5.0)
        ffn.up.bias[FFN_INIT:].fill_(5.0)
    steps = [float(opt.state[p]["step"]) for p in stale]
    ffn.grow(24, opt)

    new = slice(FFN_INIT, 24)
    for key in ("exp_avg", "exp_avg_sq"):
        up, bias, down = (opt.state[p][key] for p in stale)
        assert torch.all(up[new] == 0) and torch.all(bias[new] == 0) and torch.all(down[:, new] == 0)
        assert torch.all(up[:FFN_INIT] == 1) and torch.all(up[24:] == 1)
        assert torch.all(bias[:FFN_INIT] == 1) and torch.all(bias[24:] == 1)
        assert torch.all(down[:, :FFN_INIT] == 1) and torch.all(down[:, 24:] == 1)
    assert [float(opt.state[p]["step"]) for p in stale] == steps
    fresh = ffn.up.weight[new].detach()
    assert fresh.abs().max() < 0.2 and 0.01 < float(fresh.std()) < 0.03  # N(0, 0.02), not the stale 5.0
    assert torch.all(ffn.up.bias[new] == 0) and torch.all(ffn.down.weight[:, new] == 0)
    assert torch.all(ffn.up.weight[24:] == 5.0)  # beyond the new width: untouched

    with pytest.raises(ValueError, match=f"{FFN_MAX + 1}.*max {FFN_MAX}"):
        ffn.grow(FFN_MAX + 1, opt)
    with pytest.raises(ValueError, match="from 24 to 16"):
        ffn.grow(16, opt)  # widths only grow
    cand = make_block("mobilebert")
    with pytest.raises(ValueError, match=str(FFN_MAX + 8)):
        cand.grow_ffn(FFN_MAX + 8)
    assert cand.ffn_dim == FFN_INIT and all(f.active_dim == FFN_INIT for f in cand.ffns)


# ---- heads ------------------------------------------------------------------------------------


def reference_attention(state: dict, x, heads, share, max_heads, head_dim, mask=None, eps=1e-12):
    """Multi-head attention written out head by head from the *original* stored weights."""
    dim = x.shape[-1]
    n = 3 if share == "none" else 2
    w = state["qkv.weight"].view(n, max_heads, head_dim, dim)
    b = state["qkv.bias"].view(n, max_heads, head_dim)
    out = state["out.bias"].expand(*x.shape[:-1], dim).clone()
    for h in heads:
        proj = [x @ w[p, h].T + b[p, h] for p in range(n)]
        q, k = proj[0], proj[1]
        v = {"none": proj[2] if n == 3 else None, "qv": proj[0], "kv": proj[1]}[share]
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, 0], float("-inf"))
        ctx = scores.softmax(-1) @ v
        out = out + ctx @ state["out.weight"][:, h * head_dim : (h + 1) * head_dim].T
    return F.layer_norm(x + out, (dim,), state["norm.weight"], state["norm.bias"], eps)


@pytest.mark.parametrize("share", SHARES)
def test_pruned_heads_stop_contributing(share: str) -> None:
    torch.manual_seed(0)
    attn = ElasticAttention(16, 4, 4, share, dropout=0.0, eps=1e-12).eval()
    perturb_(attn, std=0.3)
    state = {k: v.clone() for k, v in attn.state_dict().items() if torch.is_tensor(v)}  # not the active widths
    x = torch.randn(2, 7, 16)
    mask = attention_bias(torch.tensor([[1] * 7, [1] * 5 + [0] * 2]), False, 7)
    opt = torch.optim.AdamW(attn.parameters())

    attn.keep_heads([2, 0], opt)
    assert attn.active_heads == 2
    out = attn(x, mask, False)[0]
    torch.testing.assert_close(
        out, reference_attention(state, x, [2, 0], share, 4, 4, mask), atol=1e-5, rtol=1e-5
    )
    full = reference_attention(state, x, range(4), share, 4, 4, mask)
    assert (out - full).abs().max() > 1e-2  # the dropped heads did contribute before

    with torch.no_grad():  # what lies beyond the active prefix (the dropped heads) is dead weight
        n = 3 if share == "none" else 2
        attn.qkv.weight.view(n, 4, 4, 16)[:, 2:] += 10.0
        attn.qkv.bias.view(n, 4, 4)[:, 2:] -= 10.0
        attn.out.weight[:, 2 * 4 :] *= -7.0
    torch.testing.assert_close(attn(x, mask, False)[0], out, atol=0, rtol=0)

    attn.keep_heads([1], opt)  # a second round: stored slot 1 holds original head 0
    torch.testing.assert_close(
        attn(x, mask, False)[0], reference_attention(state, x, [0], share, 4, 4, mask), atol=1e-5, rtol=1e-5
    )
    with pytest.raises(ValueError, match=r"\[1\]"):
        attn.keep_heads([1])  # only head 0 is active now


def head_rows(perm: list[int], projections: int, max_heads: int, head_dim: int) -> torch.Tensor:
    """Rows of the fused QKV weight after moving old head perm[i] to slot i (independent of the lib)."""
    return torch.tensor(
        [
            (p * max_heads + old) * head_dim + j
            for p in range(projections)
            for old in perm
            for j in range(head_dim)
        ]
    )


@pytest.mark.parametrize("share", SHARES)
def test_permuting_all_heads_keeps_output_and_adam_state_follows(share: str) -> None:
    torch.manual_seed(0)
    a = ElasticAttention(16, 4, 4, share, dropout=0.0, eps=1e-12).eval()
    perturb_(a, std=0.2)
    b = copy.deepcopy(a)
    opt_a, opt_b = torch.optim.AdamW(a.parameters(), lr=1e-2), torch.optim.AdamW(b.parameters(), lr=1e-2)
    x, target = torch.randn(2, 6, 16), torch.randn(2, 6, 16)
    for _ in range(2):  # identical, non-trivial optimiser state on both copies
        for m, o in ((a, opt_a), (b, opt_b)):
            mse_step(m, o, x, target, None, False)

    perm = [2, 0, 3, 1]
    before = b(x, None, False)[0]
    b.keep_heads(perm, opt_b)
    torch.testing.assert_close(b(x, None, False)[0], before, atol=1e-6, rtol=1e-6)
    rows = head_rows(perm, 3 if share == "none" else 2, 4, 4)
    cols = head_rows(perm, 1, 4, 4)
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(opt_b.state[b.qkv.weight][key], opt_a.state[a.qkv.weight][key][rows])
        assert torch.equal(opt_b.state[b.qkv.bias][key], opt_a.state[a.qkv.bias][key][rows])
        assert torch.equal(opt_b.state[b.out.weight][key], opt_a.state[a.out.weight][key][:, cols])
        assert torch.equal(opt_b.state[b.out.bias][key], opt_a.state[a.out.bias][key])

    # a step after the permutation == the permuted result of the same step without it
    mse_step(a, opt_a, x, target, None, False)
    mse_step(b, opt_b, x, target, None, False)
    torch.testing.assert_close(b.qkv.weight, a.qkv.weight[rows], atol=1e-5, rtol=1e-4)
    # a key bias only shifts every score of a query by the same amount: softmax ignores it, its
    # gradient is round-off noise that Adam blows up to +-lr; compare the other bias rows
    live = torch.ones(len(rows), dtype=torch.bool)
    if share != "kv":
        live[16:32] = False
    torch.testing.assert_close(b.qkv.bias[live], a.qkv.bias[rows][live], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(b.out.weight, a.out.weight[:, cols], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(b.out.bias, a.out.bias, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(b(x, None, False)[0], a(x, None, False)[0], atol=1e-5, rtol=1e-4)


# ---- extraction -------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["masked", "causal"])
def test_extract_matches_active_path(causal: bool) -> None:
    net = make_supernet(causal=causal, blocks=list(BLOCKS), shares=list(SHARES)).eval()
    perturb_(net, std=0.05)
    opt = torch.optim.AdamW(p for n, p in net.named_parameters() if not n.startswith("embeddings."))
    for li, ci, _, cand in net.candidates():  # a search's worth of growth and pruning
        if (li + ci) % 2 == 0:
            cand.grow_ffn(FFN_INIT + 8 * (1 + ci % 3), opt)
        if ci % 3 != 2:
            heads = cand.attention.active_heads
            cand.attention.keep_heads(list(range(heads))[::-1][: heads - 1 - ci % 2], opt)
    perturb_(net, std=0.05, seed=2)  # grown units and permuted heads are trained further
    assert len({c.ffn_dim for *_, c in net.candidates()}) > 2
    assert len({c.attention.active_heads for *_, c in net.candidates()}) > 2

    ids = torch.randint(1, 50, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    ids[1, 6:] = 0
    lm_cls = ElmForCausalLM if causal else ElmForMaskedLM
    n_cand = len(BLOCKS) * len(SHARES)
    for ci in range(n_cand):
        choice = [ci, (ci + 1) % n_cand]
        net.set_active(choice)
        expected = net(ids, mask)
        arch = net.active_arch()
        assert arch.causal == causal
        model = extract(net).eval()
        assert isinstance(model, ElmModel)
        torch.testing.assert_close(model(ids, mask).last_hidden_state, expected, atol=1e-5, rtol=1e-5)
        assert sum(p.numel() for p in model.parameters()) == arch.num_parameters()

        lm = extract(net, lm_cls, choice=choice).eval()
        out = lm(ids, mask, output_hidden_states=True)
        torch.testing.assert_close(out.hidden_states[-1], expected, atol=1e-5, rtol=1e-5)
        assert sum(p.numel() for p in lm.parameters()) == arch.num_parameters("lm")
        names = [c.name for c in (net.layers[li][c] for li, c in enumerate(choice))]
        assert [f"{layer.block}.{layer.share}".replace(".none", "") for layer in arch.layers] == names


# ---- wiring and validation --------------------------------------------------------------------


def test_uniform_layer_map() -> None:
    assert uniform_layer_map(3, 6) == [0, 2, 4, 6]
    assert uniform_layer_map(6, 6) == list(range(7))
    assert uniform_layer_map(2, 12) == [0, 6, 12]
    m = uniform_layer_map(4, 6)
    assert m[0] == 0 and m[-1] == 6 and m == sorted(m) and len(m) == 5
    with pytest.raises(ValueError, match="student=0"):
        uniform_layer_map(0, 6)


def test_blockwise_shapes_and_layer_map_wiring() -> None:
    net = make_supernet(num_layers=3, teacher_hidden=20 + HIDDEN, teacher_layers=6).eval()
    assert net.layer_map == [0, 2, 4, 6]
    assert not net.identity_basis and not any(isinstance(m, torch.nn.Linear) and m.in_features == 20 + HIDDEN
                                              for m in net.modules())  # one fixed basis, no learned map  # fmt: skip
    g = torch.Generator().manual_seed(0)
    from elm.supernet.basis import Basis

    q, _ = torch.linalg.qr(torch.randn(20 + HIDDEN, HIDDEN, generator=g))
    basis = Basis(torch.randn(20 + HIDDEN, generator=g), q)
    net.set_basis(basis)
    hidden = [torch.randn(2, 5, 20 + HIDDEN, generator=g) for _ in range(7)]
    mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2])
    outs = net.blockwise(hidden, mask)
    assert len(outs) == 3 and all(len(layer) == 6 for layer in outs)  # 2 blocks x 3 shares (default)
    assert all(o.shape == (2, 5, HIDDEN) for layer in outs for o in layer)
    assert net.block_targets(hidden, 1) is hidden[4]
    # every layer reads the same basis: (h - mean) @ proj
    x = (hidden[2] - basis.mean) @ basis.proj
    torch.testing.assert_close(net.block_inputs(hidden, 1), x)
    torch.testing.assert_close(outs[1][3], net.layers[1][3](x, attention_bias(mask, False, 5), False)[0])

    # chained: layer 1 reads candidate 4 of layer 0 and layer 2 its candidate 0, not the teacher
    chained = net.blockwise(hidden, mask, chain=[None, 4, 0])
    torch.testing.assert_close(chained[0][4], outs[0][4])
    bias = attention_bias(mask, False, 5)
    torch.testing.assert_close(chained[1][2], net.layers[1][2](outs[0][4], bias, False)[0])
    torch.testing.assert_close(chained[2][5], net.layers[2][5](chained[1][0], bias, False)[0])

    # layer 1 reads teacher state 2 and nothing else
    changed = list(hidden)
    changed[3] = hidden[3] + 1.0
    changed[1] = hidden[1] + 1.0
    torch.testing.assert_close(net.blockwise(changed, mask, layers=[1])[0][0], outs[1][0], atol=0, rtol=0)
    changed[2] = hidden[2] + 1.0
    assert (net.blockwise(changed, mask, layers=[1])[0][0] - outs[1][0]).abs().max() > 1e-3

    same = make_supernet(num_layers=2, teacher_hidden=HIDDEN, teacher_layers=6, layer_map=[0, 3, 5])
    assert same.layer_map == [0, 3, 5] and same.identity_basis  # equal widths: the identity
    narrow = [h[..., :HIDDEN] for h in hidden]
    assert same.block_inputs(narrow, 1) is narrow[3]  # the teacher's state itself
    with pytest.raises(ArchError, match="wider than the teacher"):
        make_supernet(teacher_hidden=HIDDEN - 1)


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        (dict(layer_map=[0, 2, 4]), "[0, 2, 4]"),  # one boundary short for 3 layers
        (dict(layer_map=[0, 4, 2, 6]), "[0, 4, 2, 6]"),  # decreasing
        (dict(layer_map=[0, 2, 4, 9]), "[0, 2, 4, 9]"),  # beyond the teacher's 6 layers
        (dict(layer_map=[0, 2.5, 4, 6]), "2.5"),
        (dict(blocks=["bert", "foo"]), "foo"),
        (dict(blocks=[]), "[]"),
        (dict(blocks=["bert", "bert"]), "['bert', 'bert']"),
        (dict(shares=["none", "vq"]), "vq"),
        (dict(head_dim=0), "head_dim must be a positive integer, got 0"),
        (dict(num_layers=True), "True"),
        (dict(ffn_init=64, ffn_max=40), "ffn_init=64"),
        (dict(mobilebert={"bottleneck_size": 48}), "space.families.mobilebert.bottleneck_size=48 is larger"),
        (dict(mobilebert={"head_dim": -3}), "space.families.mobilebert.head_dim must be a positive integer, got -3"),
        (dict(mobilebert={"heads": 2, "hedas": 3}), "space.families.mobilebert has unknown key(s) ['hedas']"),
        (dict(families={"bert": {"heads": 2}, "gpt": {}}), "unknown block famil(ies) ['gpt']"),
        (dict(dropout=1.5), "1.5"),
        (dict(causal="yes"), "'yes'"),
    ],
)
def test_bad_space_values_raise_arch_error_naming_the_value(kw: dict, needle: str) -> None:
    with pytest.raises(ArchError) as err:
        make_supernet(**{"num_layers": 3, "teacher_layers": 6, **kw})
    assert needle in str(err.value)


def test_mobilebert_head_dim_and_set_active_checks() -> None:
    net = make_supernet(head_dim=6, bert={"heads": 4}, mobilebert={"head_dim": 4, "heads": 3})
    dims = {c.block: (c.attention.head_dim, c.attention.max_heads) for *_, c in net.candidates()}
    assert dims == {"bert": (6, 4), "mobilebert": (4, 3)}
    assert {b: (net.space.head_dim_of(b), net.space.heads_of(b)) for b in BLOCKS} == dims
    with pytest.raises(ValueError, match=r"\[0, 6\]"):
        net.set_active([0, 6])  # 6 candidates per layer: 0..5
    with pytest.raises(ValueError, match=r"\[0\]"):
        net.set_active([0])


def test_budget_range_matches_the_built_supernet_and_budgets_resolve() -> None:
    from elm.search.choose import check_budgets, layer_param_range, resolve_budgets

    net = make_supernet(mobilebert={"head_dim": 6})
    lo = sum(min(c.layer_config(num_heads=1).num_parameters(HIDDEN) for c in layer) for layer in net.layers)
    hi = sum(
        max(
            c.layer_config(num_heads=c.attention.max_heads, ffn_dim=FFN_MAX).num_parameters(HIDDEN)
            for c in layer
        )
        for layer in net.layers
    )
    assert layer_param_range(net.space, min_heads=1) == (lo, hi)
    check_budgets(net, {"a": lo, "b": hi}, min_heads=1)
    with pytest.raises(ValueError, match=f"x={lo - 1:,} .*below.*{lo:,}"):
        check_budgets(net.space, {"x": lo - 1}, min_heads=1)
    with pytest.raises(ValueError, match=f"y={hi + 1:,} .*above"):
        check_budgets(net.space, {"y": hi + 1}, min_heads=1)

    assert resolve_budgets({"f": 0.25, "n": 1234, "off": None}, reference_params=1000) == {
        "f": 250,
        "n": 1234,
    }
    for bad in ({"x": 0}, {"x": -2}, {"x": True}, {"x": "big"}):
        with pytest.raises(ValueError, match="search.budgets.x"):
            resolve_budgets(bad, 1000)
    with pytest.raises(ValueError, match="names no budget"):
        resolve_budgets({"small": None}, 1000)


# ---- analysis ---------------------------------------------------------------------------------


def analysed_supernet():
    net = make_supernet(num_layers=2, teacher_hidden=32, teacher_layers=4)
    perturb_(net, std=0.3)  # peaky attention: heads that are not trivially alike
    g = torch.Generator().manual_seed(3)
    hidden = [torch.randn(6, 10, 32, generator=g) for _ in range(5)]
    mask = torch.ones(6, 10, dtype=torch.long)
    mask[0, 7:] = 0
    mask[3, 4:] = 0
    return net, hidden, mask


def test_analyse_scores_matrices_and_diversity() -> None:
    net, hidden, mask = analysed_supernet()
    net.train()
    result = analyse(net, hidden, mask, PCAConfig())
    assert net.training and not any(c.attention.capture or c.ffns[0].capture for *_, c in net.candidates())
    keys = [key for *_, key, _ in net.candidates()]
    assert sorted(result.pca) == sorted(result.cka) == sorted(result.importance) == sorted(keys)
    assert sorted(result.pca_untrained) == sorted(result.cka_untrained) == sorted(keys)
    for key in keys:  # the untrained twins' levels: a proper PCA score and a CKA in [0, 1]
        assert 0 < result.pca_untrained[key] <= 1 and 0 <= result.cka_untrained[key] <= 1
    for *_, key, cand in net.candidates():
        assert math.isfinite(result.pca[key]) and 0 < result.pca[key] <= 1
        cka = torch.tensor(result.cka[key])
        h = cand.attention.active_heads
        assert cka.shape == (h, h) and len(result.importance[key]) == h
        torch.testing.assert_close(cka.diagonal(), torch.ones(h, dtype=cka.dtype), atol=1e-9, rtol=0)
        torch.testing.assert_close(cka, cka.T)
        assert bool(((cka >= 0) & (cka <= 1)).all())
        assert all(v > 0 for v in result.importance[key])
    assert len(result.diversity) == 2
    assert all(isinstance(d, float) and math.isfinite(d) and -1 <= d <= 1 for d in result.diversity)
    count = analyse(net, hidden, mask, PCAConfig(mode="count"))
    for *_, key, cand in net.candidates():  # count mode = the raw k of the same activations
        assert count.pca[key] == pytest.approx(result.pca[key] * cand.ffn_dim)


def test_grow_widths_grows_exactly_top_k_by_unit() -> None:
    from elm.search.analysis import EpochAnalysis

    net, *_ = analysed_supernet()
    keys = [key for *_, key, _ in net.candidates()]
    cands = {key: c for *_, key, c in net.candidates()}
    scores = {key: 0.1 + 0.01 * i for i, key in enumerate(keys)}
    scores[keys[1]] = 0.99  # highest, but already at its maximum width: it cannot grow
    cands[keys[1]].grow_ffn(FFN_MAX)
    scores[keys[4]] = 0.95
    widths = {key: c.ffn_dim for key, c in cands.items()}
    analysis = EpochAnalysis(pca=scores)
    events = grow_widths(net, analysis, PCAConfig(top_k=2, unit=8, scope="global", normalise=False))
    grown = [e["candidate"] for e in events]
    assert grown == [keys[4], keys[-1]]  # the two best that still have room, best first
    for key, cand in cands.items():
        assert cand.ffn_dim == widths[key] + (8 if key in grown else 0)
    assert all(e["to"] - e["from"] == 8 for e in events)

    # per layer: each layer's best (normalised by its untrained twin) grows
    untrained = {key: 0.5 if key == keys[7] else 1.0 for key in keys}
    events = grow_widths(net, EpochAnalysis(pca=scores, pca_untrained=untrained), PCAConfig(unit=8))
    assert [e["candidate"] for e in events] == [keys[4], keys[7]]  # L1: 0.17 / 0.5 beats 0.21 / 1
    assert events[1]["pca_normalised"] == pytest.approx(scores[keys[7]] / 0.5)


def test_grow_widths_breaks_ties_by_layer_and_index_not_by_name() -> None:
    from elm.search.analysis import EpochAnalysis

    net = make_supernet(num_layers=11, teacher_layers=11)
    keys = [key for *_, key, _ in net.candidates()]  # "L10.*" sorts before "L2.*" by name
    events = grow_widths(net, EpochAnalysis(pca={k: 0.5 for k in keys}), PCAConfig(top_k=3, unit=8, scope="global"))
    assert [e["candidate"] for e in events] == keys[:3]  # L0's first three candidates


def test_prune_heads_removes_one_of_two_identical_heads() -> None:
    net, hidden, mask = analysed_supernet()
    key, cand = next((k, c) for _, _, k, c in net.candidates() if c.block == "bert" and c.share == "none")
    attn = cand.attention
    with torch.no_grad():  # head 0 := head 1 in Q, K and V
        w = attn.qkv.weight.view(attn.projections, attn.max_heads, attn.head_dim, -1)
        b = attn.qkv.bias.view(attn.projections, attn.max_heads, attn.head_dim)
        w[:, 0] = w[:, 1]
        b[:, 0] = b[:, 1]
    result = analyse(net, hidden, mask, PCAConfig())
    cka = torch.tensor(result.cka[key])
    assert cka[0, 1] == pytest.approx(1.0, abs=1e-9)
    offdiag = cka[~torch.eye(4, dtype=torch.bool)]
    assert sorted(offdiag.tolist())[-3] < 0.99  # only the copied pair is alike
    bias = attn.out.bias.detach().clone()
    events = prune_heads(net, result, CKAConfig(threshold=0.99, calibrate=False))
    mine = [e for e in events if e["candidate"] == key]
    assert len(mine) == 1 and {mine[0]["head"], mine[0]["partner"]} == {0, 1}
    assert attn.active_heads == 3
    # mean compensation: the dropped head's mean output moves into the output bias
    torch.testing.assert_close(attn.out.bias, bias + torch.tensor(result.head_mean[key][mine[0]["head"]]))
    imp = result.importance[key]
    assert mine[0]["head"] == (0 if imp[0] < imp[1] else 1)  # the less important copy goes


def test_attention_dropout_is_its_own_setting() -> None:
    """space.attention_dropout (null = space.dropout) sets only the dropout on attention
    probabilities; on CPU SDPA with it falls back to its math path (3.4x slower, docs/benchmarks.md)."""
    torch.manual_seed(0)
    net = Supernet(make_space(dropout=0.1, attention_dropout=0.0), vocab_size=50, max_positions=16,
                   teacher_hidden_size=HIDDEN, teacher_layers=4)  # fmt: skip
    for *_, cand in net.candidates():
        assert cand.attention.attn_dropout == 0.0 and cand.attention.dropout.p == 0.1
    same = Supernet(make_space(dropout=0.1), vocab_size=50, max_positions=16, teacher_hidden_size=HIDDEN,
                    teacher_layers=4)  # fmt: skip
    assert all(c.attention.attn_dropout == 0.1 for *_, c in same.candidates())
    with pytest.raises(ArchError, match="space.attention_dropout must be a number in \\[0, 1\\) or null, got 1.5"):
        make_space(attention_dropout=1.5).validate()


def test_common_dropout_shares_the_kth_mask_of_a_shape_across_candidates() -> None:
    """A layer's candidates share masks (common random numbers); within one candidate every dropout
    still draws its own Bernoulli mask, and outside a layer nothing is shared."""
    from elm.modeling import modeling_elm
    from elm.modeling.modeling_elm import apply_dropout

    torch.manual_seed(0)
    x, p = torch.ones(8, 16, 32), 0.3
    common = CommonDropout()
    with common.candidate():
        a1, a2, narrow = apply_dropout(x, p), apply_dropout(x, p), apply_dropout(x[..., :5], p)
    with common.candidate():
        b1, b2, b3 = apply_dropout(x, p), apply_dropout(x, p), apply_dropout(x, p)
    assert modeling_elm.multiplier_source is None  # restored on leaving
    assert torch.equal(a1, b1) and torch.equal(a2, b2)  # k-th mask of a shape: common
    assert not torch.equal(a1, a2) and not torch.equal(b3, b1) and not torch.equal(b3, b2)  # within: distinct
    assert narrow.shape == (8, 16, 5) and len(common.drawn) == 2
    masks = torch.stack([a1, a2, b3])
    assert masks.unique().tolist() == [0.0, pytest.approx(1 / (1 - p))]
    assert abs(masks.ne(0).float().mean().item() - (1 - p)) < 0.02
    outside = apply_dropout(x, p)
    assert not any(torch.equal(outside, m) for m in masks)


def test_blockwise_common_dropout_draws_a_layers_masks_once(monkeypatch) -> None:
    from elm.modeling import modeling_elm

    net = make_supernet(dropout=0.1).train()
    hidden = [torch.randn(2, 5, 32) for _ in range(5)]
    draws, real = [], modeling_elm.dropout_multiplier
    monkeypatch.setattr(modeling_elm, "dropout_multiplier", lambda *a: draws.append(a[0]) or real(*a))
    counts = {}
    for common in (False, True):
        draws.clear()
        outs = net.blockwise(hidden, common_dropout=common)
        counts[common] = len(draws)
        assert all(torch.isfinite(o).all() for layer in outs for o in layer)
    # 6 candidates a layer: each drew its own masks; with common masks a layer draws each once
    assert 0 < 3 * counts[True] <= counts[False]
    draws.clear()
    net.eval().blockwise(hidden, common_dropout=True)
    assert not draws and modeling_elm.multiplier_source is None


def test_analyse_reuses_cached_twins_until_pruning_changes_the_heads(monkeypatch) -> None:
    import elm.search.analysis as analysis

    net, hidden, mask = analysed_supernet()
    plain = analyse(net, hidden, mask, PCAConfig())
    built = []
    real = analysis.untrained_twin
    monkeypatch.setattr(analysis, "untrained_twin", lambda *a: built.append(a[1]) or real(*a))
    twins: dict = {}
    first = analyse(net, hidden, mask, PCAConfig(), twins=twins)
    again = analyse(net, hidden, mask, PCAConfig(), twins=twins)
    n = len(list(net.candidates()))
    assert len(built) == n  # the second call ran no twin
    assert first.pca_untrained == again.pca_untrained == plain.pca_untrained
    assert first.cka_untrained == again.cka_untrained == plain.cka_untrained
    cand = next(c for *_, c in net.candidates())
    cand.attention.keep_heads([0, 1])  # another structure: its twin runs again, the others do not
    pruned = analyse(net, hidden, mask, PCAConfig(), twins=twins)
    assert built[n:] == [cand]
    assert pruned.cka_untrained == analyse(net, hidden, mask, PCAConfig()).cka_untrained
