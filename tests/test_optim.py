"""The one optimiser every elm training loop uses (search, retrain, causal teacher, MiniLLM)."""

from __future__ import annotations

import torch
from torch import nn

from elm.utils.optim import configure_optimizer


def test_weight_decay_only_on_matrices() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.LayerNorm(4))
    model[0].weight.requires_grad_(False)  # frozen parameters are left out
    opt = configure_optimizer(model, lr=1e-3, weight_decay=0.1)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert [p.shape for p in decayed["params"]] == [torch.Size([4, 4])]
    assert sorted(p.numel() for p in plain["params"]) == [4, 4, 4]  # Linear bias, LayerNorm weight and bias

    before = model[2].weight.detach().clone()
    model(torch.tensor([[1, 2]])).sum().backward()
    model[2].weight.grad.zero_()
    opt.step()  # a zero gradient and no decay: the LayerNorm weight stays where it was
    torch.testing.assert_close(model[2].weight, before)
