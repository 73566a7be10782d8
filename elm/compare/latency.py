"""Inference latency on this device: median wall time of one forward pass, in milliseconds.

Inputs are random token ids (full attention mask) of shape ``[batch, seq_len]``; the model runs in
``eval()`` mode under ``torch.inference_mode()``; CUDA is synchronised around every timed call.
:func:`measure_side_by_side` interleaves the models (round r times every model once) so that a
slow-down of a shared machine hits all of them alike, instead of whichever ran last.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping

import torch
from torch import nn


def _inputs(model: nn.Module, batch: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    if batch < 1 or seq_len < 1:
        raise ValueError(f"batch and seq_len must be >= 1, got {batch} and {seq_len}")
    config = getattr(model, "config", None)
    vocab = int(getattr(config, "vocab_size", 1000) or 1000)
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=g).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _timed_call(model: nn.Module, inputs: dict[str, torch.Tensor]) -> float:
    cuda = inputs["input_ids"].is_cuda
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    model(**inputs)
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1000.0


def measure_latency(
    model: nn.Module, batch: int = 1, seq_len: int = 128, repeats: int = 10, warmup: int = 2
) -> float:
    """Median milliseconds of ``repeats`` forward passes after ``warmup`` untimed ones."""
    return measure_side_by_side({"model": model}, batch, seq_len, repeats, warmup)["model"]


def measure_side_by_side(models: Mapping[str, nn.Module], batch: int = 1, seq_len: int = 128, repeats: int = 10,
                         warmup: int = 2) -> dict[str, float]:  # fmt: skip
    """``{name: median ms}`` for each model, timed in interleaved rounds on the same inputs shape."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    inputs = {name: _inputs(model.eval(), batch, seq_len) for name, model in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for _ in range(max(0, warmup)):
            for name, model in models.items():
                _timed_call(model, inputs[name])
        for _ in range(repeats):
            for name, model in models.items():
                times[name].append(_timed_call(model, inputs[name]))
    return {name: statistics.median(t) for name, t in times.items()}
