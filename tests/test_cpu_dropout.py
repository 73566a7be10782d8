"""elm's CPU dropout on stock Hugging Face models (elm.utils.cpu_dropout): same eval outputs, the
training path equal to the stock model's once the masks are all ones, Bernoulli(1 - p) keeps, and
a saved model that stock transformers loads as before."""

import copy
import json

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
)

from elm.modeling import modeling_elm
from elm.utils.cpu_dropout import ATTENTION, use_cpu_dropout


def _bert():
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, num_labels=3, attn_implementation="sdpa")  # fmt: skip
    return BertForSequenceClassification(cfg)


def _gpt2():
    cfg = GPT2Config(vocab_size=120, n_embd=32, n_layer=2, n_head=4, n_positions=64, attn_implementation="sdpa")
    return GPT2LMHeadModel(cfg)


def _inputs(padded: bool):
    ids = torch.randint(5, 120, (3, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, 10:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _pair(make):
    torch.manual_seed(0)
    stock = make().eval()
    fast = use_cpu_dropout(copy.deepcopy(stock))
    return stock, fast


@pytest.mark.parametrize("make", [_bert, _gpt2], ids=["bert", "gpt2"])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_training_path_equals_stock_with_masks_of_ones(make, padded, monkeypatch):
    """With every mask 1 (dropout drawn but keeping all), the explicit attention path and the
    swapped dropout modules compute what the stock model computes without dropout: the padding mask
    (BERT), the causal mask without a padding mask (GPT-2, SDPA's is_causal shortcut) and the
    additive/boolean mask handling are all checked against transformers' own SDPA path."""
    stock, fast = _pair(make)
    x = _inputs(padded)
    assert fast.config._attn_implementation == ATTENTION
    assert stock.config._attn_implementation == "sdpa"
    drawn = []

    def ones(shape, p, device, dtype):
        drawn.append(tuple(shape))
        return torch.ones(shape, dtype=dtype, device=device)

    monkeypatch.setattr(modeling_elm, "multiplier_source", ones)
    with torch.no_grad():
        want = stock(**x).logits
        fast.train()
        got = fast(**x).logits
    assert any(len(s) == 4 for s in drawn), "attention-probability dropout did not go through elm's masks"
    assert any(len(s) == 3 for s in drawn), "hidden dropout modules were not swapped"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    real = [m for m in fast.modules() if type(m) is torch.nn.Dropout]
    assert not real, f"stock nn.Dropout left: {real}"


@pytest.mark.parametrize("make", [_bert, _gpt2], ids=["bert", "gpt2"])
def test_eval_outputs_unchanged(make):
    stock, fast = _pair(make)
    x = _inputs(padded=True)
    with torch.no_grad():
        torch.testing.assert_close(fast(**x).logits, stock(**x).logits, rtol=0, atol=0)


def test_training_drops_at_rate_p_and_is_seeded():
    """Training outputs differ from eval (dropout is on), follow torch.manual_seed, and the
    attention path keeps a 1 - p share of the probabilities."""
    _, fast = _pair(_bert)
    fast.train()
    x = _inputs(padded=True)
    outs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        with torch.no_grad():
            outs.append(fast(**x).logits)
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    probs = torch.full((64, 4, 32, 32), 1 / 32)
    kept = modeling_elm.apply_dropout(probs, 0.1) != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.005


def test_saved_model_loads_in_stock_transformers(tmp_path):
    _, fast = _pair(_bert)
    fast.save_pretrained(tmp_path)
    assert ATTENTION not in (tmp_path / "config.json").read_text()
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "bert"
    with torch.no_grad():
        x = _inputs(padded=True)
        torch.testing.assert_close(loaded(**x).logits, fast.eval()(**x).logits)


def test_elm_models_keep_their_own_attention():
    """elm's models already draw elm's masks: nothing to swap, no attention setting to change."""
    from elm.modeling import ElmForSequenceClassification, config_from_arch
    from elm.space import ArchConfig, LayerConfig

    arch = ArchConfig(hidden_size=32, embedding_size=32, vocab_size=120, max_positions=64,
                      layers=[LayerConfig("bert", 4, 8, 64)])  # fmt: skip
    model = ElmForSequenceClassification(config_from_arch(arch, num_labels=2))
    before = {n: type(m) for n, m in model.named_modules()}
    use_cpu_dropout(model)
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert model.config._attn_implementation != ATTENTION
