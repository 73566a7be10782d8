"""Precision resolution (bf16 where native, else fp32 with one line) and bf16 compute with fp32
master weights (elm.utils.precision, elm.utils.master)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from elm.utils.master import Bf16Master
from elm.utils.precision import cpu_bf16_native, resolve_precision


def test_precision_resolves_per_device_and_cpu_feature(monkeypatch, caplog):
    assert resolve_precision("fp32", "cpu").mode == "fp32"
    assert resolve_precision("bf16", torch.device("cuda", 0)).mode == "autocast"
    monkeypatch.setenv("ELM_CPU_BF16", "1")
    assert cpu_bf16_native()
    assert resolve_precision("bf16", "cpu", master=True).mode == "master"
    assert resolve_precision("bf16", "cpu").mode == "autocast"  # a loop that cannot hold bf16 weights
    monkeypatch.setenv("ELM_CPU_BF16", "0")
    with caplog.at_level(logging.INFO, logger="elm"):
        p = resolve_precision("bf16", "cpu", master=True, stage="precision-test")
    assert p.mode == "fp32" and not p.bf16
    assert [r.getMessage() for r in caplog.records if "runs as fp32" in r.getMessage()][0].startswith("[precision-test]")
    with pytest.raises(ValueError, match="precision='fp16' is unknown; valid: bf16, fp32"):
        resolve_precision("fp16", "cpu")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 1))


def test_master_weights_keep_updates_that_bf16_weights_lose():
    """1.0 - 1e-4 rounds back to 1.0 in bf16 (8-bit mantissa: spacing 2^-7 near 1); the fp32 master
    keeps every such update and the replica follows it once the sum is large enough to show."""
    assert torch.tensor(1.0 - 1e-4).to(torch.bfloat16).item() == 1.0
    layer = nn.Linear(1, 1, bias=False)
    nn.init.ones_(layer.weight)
    master = Bf16Master(layer)
    opt = torch.optim.SGD(layer.parameters(), lr=1e-4)
    for _ in range(100):
        master.compute(torch.ones(1, 1, dtype=torch.bfloat16)).float().sum().backward()  # d/dw = 1
        master.gradients_to_master()
        opt.step()
        opt.zero_grad()
        master.refresh()
    assert layer.weight.dtype == torch.float32 and layer.weight.item() == pytest.approx(0.99, abs=1e-5)
    assert master.compute.weight.dtype == torch.bfloat16
    assert master.compute.weight.item() == torch.tensor(0.99).to(torch.bfloat16).item()


def test_master_gradients_accumulate_and_track_fp32():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 8, generator=g), torch.randn(32, 1, generator=g)
    ref, model = _mlp(), _mlp()
    master = Bf16Master(model)
    for rows in (slice(0, 16), slice(16, 32)):  # two micro-batches accumulate into one fp32 .grad
        ((master.compute(x[rows].bfloat16()).float() - y[rows]) ** 2).mean().backward()
        master.gradients_to_master()
    ((ref(x[:16]) - y[:16]) ** 2).mean().backward()
    ((ref(x[16:]) - y[16:]) ** 2).mean().backward()
    for p, q, low in zip(ref.parameters(), model.parameters(), master.compute.parameters(), strict=True):
        assert q.grad.dtype == torch.float32 and low.grad is None
        assert ((q.grad - p.grad).norm() / p.grad.norm()).item() < 0.1  # bf16 keeps ~3 digits per op
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt.step()
    master.refresh()
    for q, low in zip(model.parameters(), master.compute.parameters(), strict=True):
        assert torch.equal(low, q.to(torch.bfloat16))


def test_keep_freed_memory_applies_on_glibc_unless_the_user_set_malloc(monkeypatch):
    import platform
    import sys

    from elm.utils.runtime import keep_freed_memory

    monkeypatch.setenv("ELM_KEEP_FREED_MEMORY", "0")
    assert keep_freed_memory() is False
    monkeypatch.delenv("ELM_KEEP_FREED_MEMORY")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")  # the user's own glibc tuning wins
    assert keep_freed_memory() is False
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    assert keep_freed_memory() is (sys.platform == "linux" and platform.libc_ver()[0] == "glibc")


def test_compact_replica_computes_and_hands_over_exactly_what_a_full_size_one_does(monkeypatch):
    """The search's bf16 replica keeps only the active heads and FFN units of every elastic module
    (``compact_``). After growth and an out-of-order pruning, its candidates' outputs and the fp32
    gradients it hands over (two micro-batches, a second step) are bit-identical to a full-size replica's, zero
    outside the active part; the refresh after an update copies exactly the active part."""
    from elm.space import SpaceConfig
    from elm.supernet import ElasticAttention, ElasticFFN, Supernet

    space = SpaceConfig(num_layers=2, hidden_size=24, embedding_size=12, head_dim=4, blocks=["bert", "mobilebert", "llama"],
                        families={"bert": {"heads": 4}, "mobilebert": {"heads": 3, "bottleneck_size": 12, "num_ffn": 2},
                                  "llama": {"heads": 4, "group": 2}},
                        ffn_init=8, ffn_unit=8, ffn_max=40, dropout=0.0)  # fmt: skip
    torch.manual_seed(0)
    net = Supernet(space, vocab_size=50, max_positions=16, teacher_hidden_size=24, teacher_layers=4)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # no zero blocks: every slice matters
    for _, ci, _, cand in net.candidates():
        cand.grow_ffn(16 + 8 * (ci % 2))
        heads = cand.attention.active_heads
        cand.attention.keep_heads([heads - 1, 0] if heads > 2 else [1])  # out of order: qkv rows are gathered
    g = torch.Generator().manual_seed(1)
    hidden = [torch.randn(2, 6, 24, generator=g).bfloat16() for _ in range(5)]
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])

    def step(master):
        net.zero_grad(set_to_none=True)
        for rows in (slice(0, 1), slice(1, 2)):  # two micro-batches accumulate
            outs = master.compute.blockwise([h[rows] for h in hidden], mask[rows])
            sum(o.float().pow(2).mean() for layer in outs for o in layer).backward()
            master.gradients_to_master()
        return [o.detach() for layer in outs for o in layer], {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    compact = Bf16Master(net)
    attn = compact.compute.layers[0][0].attention  # bert: 2 of 4 heads kept, 3 projections
    assert tuple(attn.qkv.weight.shape) == (3 * 2 * 4, 24) and tuple(attn.out.weight.shape) == (24, 2 * 4)
    assert tuple(compact.compute.layers[0][1].ffns[0].up.weight.shape) == (24, 24)  # 24 of 40 units
    step(compact)
    outs, grads = step(compact)  # the second step reuses the gradient buffers of the first
    monkeypatch.delattr(ElasticAttention, "compact_")
    monkeypatch.delattr(ElasticFFN, "compact_")
    full_outs, full_grads = step(Bf16Master(net))
    assert all(torch.equal(a, b) for a, b in zip(outs, full_outs, strict=True))
    assert len(grads) > 100 and grads.keys() == full_grads.keys() and all(torch.equal(grads[n], full_grads[n]) for n in grads)
    ffn = net.layers[0][1].ffns[0]
    assert not grads["layers.0.1.ffns.0.up.weight"][ffn.active_dim :].any()  # inactive units: zero
    assert grads["layers.0.1.ffns.0.up.weight"][: ffn.active_dim].any()

    torch.optim.SGD(net.parameters(), lr=0.1).step()
    compact.refresh()
    w, b = net.layers[1][6].attention.qkv_weight()  # llama: grouped rows
    low = compact.compute.layers[1][6].attention.qkv
    assert torch.equal(low.weight, w.bfloat16()) and torch.equal(low.bias, b.bfloat16())
    down = net.layers[1][3].ffns[1].down.weight[:, : net.layers[1][3].ffn_dim]
    assert torch.equal(compact.compute.layers[1][3].ffns[1].down.weight, down.bfloat16())
