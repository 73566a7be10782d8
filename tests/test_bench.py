"""Benchmark machinery at toy sizes: every case runs and reports positive timings; FLOP formula."""

from __future__ import annotations

import contextlib

import torch

from elm.bench import cases

CPU = torch.device("cpu")
CTX = contextlib.nullcontext


def test_cases_run_at_toy_size() -> None:
    mlm = cases.mlm_step_vs_hf(CPU, CTX, layers=1, hidden=64, heads=2, batch=2, seq=16, repeats=1, warmup=0)
    inf = cases.inference_vs_hf(CPU, CTX, 2, layers=1, hidden=64, heads=2, seq=16, repeats=1, warmup=0)
    ft = cases.finetune_dropout(CPU, CTX, True, layers=1, hidden=64, heads=2, batch=4, seq=16, repeats=1, warmup=0)
    for result in (mlm, inf, ft):
        assert result.a_ms > 0 and result.b_ms > 0 and result.ratio > 0
        assert "ratio" in result.line()


def test_mlm_step_flops_by_hand() -> None:
    arch = cases.bert_arch(layers=1, hidden=8, heads=2, vocab=10, seq=4)
    layer = arch.layers[0].num_parameters(8)
    tokens = 2 * 4
    by_hand = 3 * (2 * tokens * layer + 4 * 2 * 4 * 4 * 8 + 0.5 * tokens * 2 * (8 * 8 + 8 * 10))
    assert cases.mlm_step_flops(arch, batch=2, seq=4, mask_p=0.5) == by_hand


def test_matmul_peak_is_positive() -> None:
    assert cases.matmul_peak(CPU, n=64, repeats=1) > 0


def test_search_step_case_counts_real_flops(monkeypatch) -> None:
    """The search-step case counts FLOPs on one real SearchTrainer step and reports a fraction of
    the same-precision matmul peak; the bf16 case says when bf16 is not native."""
    import re

    from elm.bench import search_step
    from elm.utils.precision import resolve_precision

    monkeypatch.setenv("ELM_CPU_BF16", "0")
    prec = resolve_precision("bf16", CPU, master=True)
    line = search_step.search_step_utilisation(CPU, prec, steps=1, repeats=1)
    gflop = float(re.search(r"\(([\d.]+) GFLOP/step", line).group(1))
    fraction = float(re.search(r"fraction\s+([\d.]+)", line).group(1))
    # teacher forward (6 x 384-wide layers) + 36 candidates' forward and backward at 8 x 128 tokens
    assert 20 < gflop < 500 and 0 < fraction < 1.5, line
    from elm.bench import bf16

    for kind in bf16.STEPS:
        assert "skipped: no native bf16" in bf16.step_bf16_vs_fp32(kind, CPU)
    assert "skipped: no native bf16" in bf16.mlm_bf16_vs_hf_fp32(CPU)


def test_bf16_mlm_case_times_the_master_step_against_hf_fp32(monkeypatch) -> None:
    """Forced on (ELM_CPU_BF16=1, emulated where bf16 is not native): the bf16 column is the
    replica + fp32 master step search and retrain run, and it trains the fp32 weights."""
    from elm.bench import bf16

    monkeypatch.setenv("ELM_CPU_BF16", "1")
    result = bf16.mlm_bf16_vs_hf_fp32(CPU, layers=1, hidden=32, heads=2, batch=2, seq=16, repeats=1, warmup=0)
    assert result.a == "BertForMaskedLM fp32" and result.b == "ElmForMaskedLM bf16"
    assert result.a_ms > 0 and result.b_ms > 0 and "4.5x" in result.target

    model = bf16.ElmForMaskedLM(bf16.config_from_arch(bf16.bert_arch(1, 32, 2, seq=16)))
    before = [p.detach().clone() for p in model.parameters()]
    bf16.master_step_fn(model, bf16.mlm_batch(model.config.vocab_size, 2, 16, CPU), CPU)()
    assert all(p.dtype == bf16.torch.float32 for p in model.parameters())
    assert any(not bf16.torch.equal(a, p) for a, p in zip(before, model.parameters()))
