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
