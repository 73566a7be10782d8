"""ElmModel and heads: sharing, masked-only MLM loss, causality, padding, attentions, Trainer, generate."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from elm import ArchConfig, LayerConfig, config_from_arch
from elm.modeling import (
    ElmForCausalLM,
    ElmForMaskedLM,
    ElmForSequenceClassification,
    ElmModel,
)
from elm.modeling.modeling_elm import split_qkv

VOCAB = 40
BLOCK_SHARE = [(b, s) for b in ("bert", "mobilebert") for s in ("none", "qv", "kv")]


def layer(block: str, share: str = "none", heads: int = 2) -> LayerConfig:
    if block == "bert":
        return LayerConfig("bert", num_heads=heads, head_dim=6, ffn_dim=20, share=share)
    return LayerConfig(
        "mobilebert", num_heads=heads, head_dim=4, ffn_dim=10, num_ffn=2, bottleneck_size=16, share=share
    )


def make_arch(layers=None, causal: bool = False, **kw) -> ArchConfig:
    layers = layers or [layer("bert", "qv"), layer("mobilebert", "kv"), layer("bert", "none", heads=3)]
    base = dict(hidden_size=24, embedding_size=12, vocab_size=VOCAB, max_positions=16, type_vocab_size=2)
    return ArchConfig(causal=causal, layers=layers, **{**base, **kw}).validate()


def build(cls, arch: ArchConfig, seed: int = 0, **config_kw):
    torch.manual_seed(seed)
    model = cls(config_from_arch(arch, **config_kw))
    with torch.no_grad():  # move LayerNorms/biases off their init so wiring mistakes show
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def tokens(batch: int = 2, length: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def right_padded(length: int = 8, valid: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    ids = tokens(2, length)
    mask = torch.ones_like(ids)
    mask[1, valid:] = 0
    ids[1, valid:] = 0
    return ids, mask


# ---- attention with shared projections -------------------------------------------------
def reference_attention(attn, x: torch.Tensor) -> torch.Tensor:
    """Plain multi-head attention from the fused weights, with the shared role reusing rows."""
    a = attn.num_heads * attn.head_dim
    roles = {"none": (0, 1, 2), "qv": (0, 1, 0), "kv": (0, 1, 1)}[attn.share]
    w, b = attn.qkv.weight, attn.qkv.bias
    q, k, v = (
        (x @ w[r * a : (r + 1) * a].T + b[r * a : (r + 1) * a])
        .view(*x.shape[:2], attn.num_heads, attn.head_dim)
        .transpose(1, 2)
        for r in roles
    )
    probs = (q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)).softmax(-1)
    ctx = (probs @ v).transpose(1, 2).reshape(*x.shape[:2], a)
    return attn.norm(x + attn.out(ctx))


@pytest.mark.parametrize("block, share", BLOCK_SHARE)
def test_shared_projection_is_one_parameter(block, share):
    model = build(ElmModel, make_arch([layer(block, share)]))
    attn = model.layers[0].attention
    a = attn.num_heads * attn.head_dim
    assert attn.qkv.weight.shape[0] == (3 if share == "none" else 2) * a
    q, k, v = split_qkv(
        attn.qkv(torch.randn(2, 5, attn.qkv.in_features)), share, attn.num_heads, attn.head_dim
    )

    def same(s, t):  # one view of the same memory, not an equal copy
        return s.data_ptr() == t.data_ptr() and s.stride() == t.stride() and s.shape == t.shape

    assert same(q, v) == (share == "qv") and same(k, v) == (share == "kv") and not same(q, k)
    x = torch.randn(2, 5, attn.qkv.in_features)
    out, _ = attn(x, None, False)
    torch.testing.assert_close(out, reference_attention(attn, x), atol=1e-5, rtol=1e-5)
    out_probs, probs = attn(x, None, False, output_attentions=True)
    torch.testing.assert_close(out_probs, out, atol=1e-6, rtol=1e-6)
    assert probs.shape == (2, attn.num_heads, 5, 5)


@pytest.mark.parametrize("block", ["bert", "mobilebert"])
def test_block_composition(block):
    model = build(ElmModel, make_arch([layer(block, "qv")]))
    lay, x = model.layers[0], torch.randn(2, 5, 24)
    if block == "bert":
        ffn = lay.ffns[0]
        h = reference_attention(lay.attention, x)
        expected = ffn.norm(h + ffn.down(F.gelu(ffn.up(h))))
    else:
        h = reference_attention(lay.attention, lay.norm_in(lay.bottleneck_in(x)))
        assert len(lay.ffns) == 2
        for ffn in lay.ffns:
            h = ffn.norm(h + ffn.down(F.relu(ffn.up(h))))
        expected = lay.norm_out(x + lay.bottleneck_out(h))
    torch.testing.assert_close(lay(x, None, False)[0], expected, atol=1e-5, rtol=1e-5)


# ---- masked-only MLM loss ----------------------------------------------------------------
def test_masked_only_mlm_matches_full_logits_and_gradients():
    model = build(ElmForMaskedLM, make_arch(), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ids, mask = right_padded()
    labels = torch.full_like(ids, -100)
    for b, t in [(0, 0), (0, 3), (0, 7), (1, 2), (1, 4)]:
        labels[b, t] = int(tokens(1, 1, seed=10 + t)[0, 0])

    def run(**kw):
        model.zero_grad()
        out = model(ids, attention_mask=mask, labels=labels, **kw)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters()}

    masked, g_masked = run()
    full, g_full = run(return_full_logits=True)
    assert masked.logits.shape == (5, VOCAB) and full.logits.shape == (2, 8, VOCAB)
    torch.testing.assert_close(masked.logits, full.logits[labels != -100], atol=1e-6, rtol=1e-6)
    hf_loss = torch.nn.CrossEntropyLoss()(full.logits.view(-1, VOCAB), labels.view(-1))
    torch.testing.assert_close(masked.loss, full.loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(masked.loss, hf_loss, atol=1e-6, rtol=1e-6)
    assert g_masked.keys() == g_full.keys()
    for name in g_full:
        torch.testing.assert_close(g_masked[name], g_full[name], atol=1e-6, rtol=1e-5, msg=name)
    assert g_full["elm.embeddings.word.weight"].abs().sum() > 0

    model.config.mlm_masked_only = False
    torch.testing.assert_close(model(ids, attention_mask=mask, labels=labels).logits, full.logits)
    assert model(ids, attention_mask=mask).logits.shape == (2, 8, VOCAB)


# ---- causality ---------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["sdpa", "explicit"])
@pytest.mark.parametrize("padded", [False, True], ids=["nomask", "padded"])
@pytest.mark.parametrize("block, share", BLOCK_SHARE)
def test_causal_output_ignores_future(block, share, padded, path):
    model = build(ElmModel, make_arch([layer(block, share), layer(block, share)], causal=True))
    ids, mask = right_padded() if padded else (tokens(), None)
    kw = {"attention_mask": mask, "output_attentions": path == "explicit"}
    base = model(ids, **kw)
    for t in (0, 3, 6):
        changed = ids.clone()
        changed[:, t + 1 :] = tokens(2, ids.shape[1] - t - 1, seed=t + 5)
        out = model(changed, **kw)
        torch.testing.assert_close(
            out.last_hidden_state[:, : t + 1], base.last_hidden_state[:, : t + 1], atol=1e-6, rtol=1e-6
        )
        assert not torch.allclose(out.last_hidden_state[0, t + 1 :], base.last_hidden_state[0, t + 1 :])
    if path == "explicit":
        for probs in base.attentions:
            assert torch.all(probs.triu(diagonal=1) == 0)


@pytest.mark.parametrize("block, share", BLOCK_SHARE)
def test_non_causal_output_depends_on_future(block, share):
    model = build(ElmModel, make_arch([layer(block, share)], causal=False))
    ids = tokens()
    changed = ids.clone()
    changed[:, -1] = (ids[:, -1] + 1 - 2) % (VOCAB - 2) + 2
    first, second = model(ids).last_hidden_state, model(changed).last_hidden_state
    assert not torch.allclose(first[:, 0], second[:, 0], atol=1e-6)


# ---- hidden states, attentions, padding --------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True], ids=["nomask", "padded"])
def test_hidden_states_and_attentions(causal, padded):
    arch = make_arch(causal=causal)
    model = build(ElmModel, arch)
    ids, mask = right_padded() if padded else (tokens(), None)
    sdpa = model(ids, attention_mask=mask)
    assert sdpa.hidden_states is None and sdpa.attentions is None
    out = model(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == arch.num_layers + 1
    assert all(h.shape == (2, 8, arch.hidden_size) for h in out.hidden_states)
    assert out.hidden_states[-1] is out.last_hidden_state
    torch.testing.assert_close(out.hidden_states[0], model.embeddings(ids))
    assert len(out.attentions) == arch.num_layers
    for lay, probs in zip(arch.layers, out.attentions, strict=True):
        assert probs.shape == (2, lay.num_heads, 8, 8)
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
        assert probs.min() >= 0
        if padded:  # valid queries put no weight on padded keys
            assert torch.all(probs[1, :, :5, 5:] == 0)
    torch.testing.assert_close(out.last_hidden_state, sdpa.last_hidden_state, atol=1e-6, rtol=1e-6)
    tup = model(ids, attention_mask=mask, output_hidden_states=True, return_dict=False)
    assert isinstance(tup, tuple) and torch.equal(tup[0], sdpa.last_hidden_state) and len(tup[1]) == 4


@pytest.mark.parametrize("causal", [False, True])
def test_right_padding_matches_unpadded(causal):
    arch = make_arch(causal=causal)
    ids, mask = right_padded()
    ids[1, 5:] = tokens(1, 3, seed=9)  # content under the mask must not matter either
    model = build(ElmModel, arch)
    padded = model(ids, attention_mask=mask).last_hidden_state
    alone = model(ids[1:, :5]).last_hidden_state
    torch.testing.assert_close(padded[1, :5], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded[0], model(ids[:1]).last_hidden_state[0], atol=1e-5, rtol=1e-5)

    mlm = build(ElmForMaskedLM, arch)
    torch.testing.assert_close(
        mlm(ids, attention_mask=mask).logits[1, :5], mlm(ids[1:, :5]).logits[0], atol=1e-5, rtol=1e-5
    )
    cls = build(ElmForSequenceClassification, arch, num_labels=3)
    torch.testing.assert_close(
        cls(ids, attention_mask=mask).logits[1], cls(ids[1:, :5]).logits[0], atol=1e-5, rtol=1e-5
    )


def test_causal_classifier_pools_last_real_token_with_left_padding():
    model = build(ElmForSequenceClassification, make_arch(causal=True), num_labels=3)
    ids = tokens(1, 5)
    left = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 5, dtype=torch.long)], 1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(left, attention_mask=mask, position_ids=positions).logits
    torch.testing.assert_close(out, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_classification_losses():
    arch = make_arch()
    ids = tokens(3, 6)
    cls = build(ElmForSequenceClassification, arch, num_labels=3)
    out = cls(ids, labels=torch.tensor([0, 2, 1]))
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, torch.tensor([0, 2, 1])))
    reg = build(ElmForSequenceClassification, arch, num_labels=1)
    out = reg(ids, labels=torch.tensor([0.5, -1.0, 2.0]))
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits.squeeze(-1), torch.tensor([0.5, -1.0, 2.0])))


def test_causal_lm_requires_causal_arch_and_shifts_labels():
    with pytest.raises(ValueError, match="causal=true"):
        ElmForCausalLM(config_from_arch(make_arch(causal=False)))
    model = build(ElmForCausalLM, make_arch(causal=True))
    ids = tokens()
    out = model(ids, labels=ids)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)


def test_token_types_and_sequence_length_check():
    arch = make_arch()
    model = build(ElmModel, arch)
    ids = tokens()
    zeros = model(ids, token_type_ids=torch.zeros_like(ids)).last_hidden_state
    torch.testing.assert_close(model(ids).last_hidden_state, zeros)
    assert not torch.allclose(model(ids, token_type_ids=torch.ones_like(ids)).last_hidden_state, zeros)
    no_types = build(ElmModel, make_arch(type_vocab_size=0))
    assert no_types.embeddings.token_type is None
    with pytest.raises(ValueError, match="exceeds max_position_embeddings=16"):
        model(tokens(1, 17))


# ---- dtype -------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
def test_bf16_autocast_cpu(causal):
    arch = make_arch(causal=causal)
    ids, mask = right_padded()
    labels = ids.masked_fill(mask == 0, -100)
    model = build(ElmForCausalLM if causal else ElmForMaskedLM, arch)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, attention_mask=mask, labels=labels)
        probs = model(ids, attention_mask=mask, output_attentions=True).attentions
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert all(torch.isfinite(p).all() for p in probs)


# ---- Hugging Face Trainer and generate ----------------------------------------------------
class RepeatedTokens(torch.utils.data.Dataset):
    """Each sequence repeats one random token: a masked token is learnable from its neighbours."""

    def __init__(self, n: int = 512, length: int = 12) -> None:
        self.ids = torch.randint(4, 24, (n, 1), generator=torch.Generator().manual_seed(0)).repeat(1, length)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i]}


def mask_tokens(features: list[dict]) -> dict:
    ids = torch.stack([f["input_ids"] for f in features])
    masked = torch.rand(ids.shape) < 0.2
    masked[:, 5] = True  # at least one target per row
    return {
        "input_ids": ids.masked_fill(masked, 1),  # 1 = [MASK]
        "attention_mask": torch.ones_like(ids),
        "labels": ids.masked_fill(~masked, -100),
    }


def test_hf_trainer_trains_masked_lm(tmp_path):
    from transformers import Trainer, TrainingArguments

    arch = make_arch(vocab_size=24, hidden_size=32, embedding_size=32)
    torch.manual_seed(0)
    model = ElmForMaskedLM(config_from_arch(arch, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=30,
        per_device_train_batch_size=16,
        gradient_accumulation_steps=2,
        learning_rate=2e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=RepeatedTokens(), data_collator=mask_tokens)
    # the losses are batch means: the Trainer must divide them by the accumulation steps itself
    assert trainer.model_accepts_loss_kwargs is False
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    # near-uniform start: ~ln(V), not ln(V) * accumulation steps
    assert abs(losses[0] - math.log(24)) < 0.5, losses[:3]
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:5]) / 5, losses


def greedy(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    return ids


def test_generate_greedy_matches_manual_loop_and_left_padding():
    model = build(ElmForCausalLM, make_arch(causal=True))
    kw = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    a, b = tokens(1, 5, seed=3), tokens(1, 3, seed=4)
    out_a = model.generate(a, attention_mask=torch.ones_like(a), **kw)
    assert torch.equal(out_a.sequences, greedy(model, a, 4))
    out_b = model.generate(b, attention_mask=torch.ones_like(b), **kw)
    # a left-padded batch gives the same continuations (and logits) as each prompt alone
    batch = torch.cat([a, torch.cat([torch.zeros(1, 2, dtype=torch.long), b], 1)])
    out = model.generate(batch, attention_mask=(batch != 0).long(), pad_token_id=0, **kw)
    assert torch.equal(out.sequences[0], out_a.sequences[0]) and torch.equal(
        out.sequences[1, 2:], out_b.sequences[0]
    )
    for step, (both, alone_a, alone_b) in enumerate(zip(out.logits, out_a.logits, out_b.logits, strict=True)):
        torch.testing.assert_close(both[0], alone_a[0], atol=1e-5, rtol=1e-5, msg=f"step {step}")
        torch.testing.assert_close(both[1], alone_b[0], atol=1e-5, rtol=1e-5, msg=f"step {step}")


def test_a_traced_model_keeps_the_attention_mask():
    """torch.jit.trace on an all-ones mask (the legacy ONNX exporter traces the same way) must not
    record the no-mask shortcut: the traced model then handles padded batches like eager."""
    from elm.modeling import ElmModel

    arch = ArchConfig(hidden_size=32, embedding_size=16, vocab_size=100, max_positions=32,
                      layers=[LayerConfig("bert", num_heads=2, head_dim=16, ffn_dim=48)]).validate()  # fmt: skip
    torch.manual_seed(0)
    model = ElmModel(config_from_arch(arch)).eval()
    ids = torch.randint(1, 100, (2, 12))
    ones = torch.ones_like(ids)

    class Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    forward = Hidden()
    with torch.no_grad():
        traced = torch.jit.trace(forward, (ids, ones), check_trace=False)
        padded = ones.clone()
        padded[1, 6:] = 0
        want, got = forward(ids, padded), traced(ids, padded)
        assert torch.allclose(got[1, :6], want[1, :6], atol=1e-5)
        assert not torch.allclose(got[1, :6], forward(ids, ones)[1, :6], atol=1e-3)  # the mask mattered


def test_gradient_checkpointing_and_resize_token_embeddings(tmp_path):
    """The usual transformers methods: gradient_checkpointing_enable() gives the same loss and
    gradients; resize_token_embeddings() resizes the tied decoder's bias too and survives a save."""
    from transformers import AutoModelForMaskedLM

    arch = ArchConfig(hidden_size=32, embedding_size=16, vocab_size=100, max_positions=32,
                      layers=[LayerConfig("bert", num_heads=2, head_dim=16, ffn_dim=48)] * 2).validate()  # fmt: skip
    torch.manual_seed(0)
    model = ElmForMaskedLM(config_from_arch(arch, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).train()
    ids = torch.randint(0, 100, (2, 10))

    def loss_and_grads():
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    plain = loss_and_grads()
    model.gradient_checkpointing_enable()
    assert model.elm.gradient_checkpointing
    checkpointed = loss_and_grads()
    assert torch.equal(plain[0], checkpointed[0])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain[1], checkpointed[1]))

    model.eval().resize_token_embeddings(110, mean_resizing=False)
    assert model.config.vocab_size == 110 and model.lm_head.bias.shape == (110,)
    assert model(input_ids=torch.randint(0, 110, (2, 10)), return_full_logits=True).logits.shape == (2, 10, 110)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.elm.embeddings.word.weight, model.elm.embeddings.word.weight)


def test_kv_cache_generation_matches_uncached():
    """ElmForCausalLM with a KV cache: greedy generations equal the uncached ones on a left-padded
    batch (shared attention, MobileBERT block), each step after the prompt encodes one token, and
    incremental logits equal the full forward's."""
    from elm.modeling import ElmForCausalLM

    arch = ArchConfig(hidden_size=64, embedding_size=32, vocab_size=200, max_positions=128, causal=True, type_vocab_size=0,
                      layers=[LayerConfig("bert", num_heads=2, head_dim=32, ffn_dim=96, share="qv"),
                              LayerConfig("mobilebert", num_heads=2, head_dim=16, ffn_dim=48, num_ffn=2,
                                          bottleneck_size=32, share="kv")]).validate()  # fmt: skip
    torch.manual_seed(0)
    model = ElmForCausalLM(config_from_arch(arch, pad_token_id=0, eos_token_id=1, bos_token_id=1)).eval()
    ids = torch.randint(2, 200, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, :4], mask[2, :7] = 0, 0  # left padding
    lengths = []
    hook = model.register_forward_pre_hook(lambda m, args, kw: lengths.append(kw["input_ids"].shape[1]), with_kwargs=True)
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    cached = model.generate(input_ids=ids, attention_mask=mask, use_cache=True, **kw)
    hook.remove()
    assert lengths == [12] + [1] * 9  # the prompt once, then one new token per step
    assert torch.equal(cached, model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kw))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        first = model(input_ids=ids[:, :8], attention_mask=mask[:, :8], position_ids=positions[:, :8], use_cache=True)
        rest = model(input_ids=ids[:, 8:], attention_mask=mask, position_ids=positions[:, 8:], cache=first.cache,
                     logits_to_keep=0)  # fmt: skip
    assert torch.allclose(rest.logits, full[:, 8:], atol=1e-5)
    with pytest.raises(ValueError, match=r"sequence length 129 \(128 cached \+ 1 new tokens\) exceeds max_position"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=120, min_new_tokens=120, do_sample=False,
                       pad_token_id=0)  # fmt: skip
    with pytest.raises(ValueError, match="take a DynamicCache"):
        model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=0, cache_implementation="static")


def test_eager_and_sdpa_attention_agree(tmp_path):
    """attn_implementation="eager" (explicit softmax, e.g. for attention maps or custom kernels)
    and the default SDPA give the same outputs, set at load time or switched afterwards."""
    from transformers import AutoModel

    from elm.modeling import ElmModel

    arch = ArchConfig(hidden_size=32, embedding_size=16, vocab_size=100, max_positions=32,
                      layers=[LayerConfig("bert", num_heads=2, head_dim=16, ffn_dim=48, share="kv")]).validate()  # fmt: skip
    torch.manual_seed(0)
    ElmModel(config_from_arch(arch)).save_pretrained(tmp_path)
    ids, mask = torch.randint(1, 100, (2, 9)), torch.ones(2, 9, dtype=torch.long)
    mask[1, 5:] = 0
    sdpa = AutoModel.from_pretrained(tmp_path).eval()
    eager = AutoModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert eager.config._attn_implementation == "eager"
    with torch.no_grad():
        want = sdpa(input_ids=ids, attention_mask=mask).last_hidden_state
        assert torch.allclose(eager(input_ids=ids, attention_mask=mask).last_hidden_state, want, atol=1e-5)
        sdpa.set_attn_implementation("eager")
        assert torch.allclose(sdpa(input_ids=ids, attention_mask=mask).last_hidden_state, want, atol=1e-5)


# ---- CPU dropout from 64-bit random words (issue #15) ------------------------------------
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_mask_is_bernoulli_and_seeded(p):
    from elm.modeling.modeling_elm import keep_mask

    torch.manual_seed(3)
    a = keep_mask(torch.Size([64, 257, 33]), p, torch.device("cpu"))  # numel not a multiple of 4
    torch.manual_seed(3)
    assert torch.equal(a, keep_mask(torch.Size([64, 257, 33]), p, torch.device("cpu")))
    n = a.numel()
    assert a.dtype == torch.bool and a.shape == (64, 257, 33)
    # kept fraction within 5 standard deviations of 1 - p; neighbours (same 64-bit word) independent
    assert abs(a.float().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    pairs = a.flatten()[: n // 2 * 2].view(-1, 2).float()
    both = (pairs[:, 0] * pairs[:, 1]).mean().item()
    assert abs(both - (1 - p) ** 2) < 5 * math.sqrt((1 - p) ** 2 * (1 - (1 - p) ** 2) / (n // 2))


def test_cpu_dropout_matches_f_dropout_in_law_and_gradient():
    from elm.modeling.modeling_elm import Dropout, apply_dropout

    x = torch.randn(200, 300, requires_grad=True)
    y = apply_dropout(x, 0.25)
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / 0.75)
    y.sum().backward()  # the gradient is the mask times 1 / (1 - p), as for F.dropout
    assert torch.allclose(x.grad, kept.float() / 0.75)
    assert apply_dropout(x, 0.25, training=False) is x and apply_dropout(x, 0.0) is x
    module = Dropout(0.25)
    assert isinstance(module, torch.nn.Dropout) and not module.state_dict()
    assert module.eval()(x) is x
    assert torch.equal(apply_dropout(x, 1.0), F.dropout(x, 1.0))  # the edge goes to F.dropout


def test_attention_dropout_on_cpu_runs_explicitly():
    from elm.modeling.modeling_elm import attend

    q, k, v = (torch.randn(2, 3, 5, 4, dtype=torch.bfloat16) for _ in range(3))
    torch.manual_seed(0)
    out, probs = attend(q, k, v, None, False, 0.3, need_probs=False)
    assert probs is None and out.dtype == torch.bfloat16
    ref = (q.float() @ k.float().transpose(-1, -2) / 2).softmax(-1)
    _, probs = attend(q, k, v, None, False, 0.0, need_probs=True)
    assert probs.dtype == torch.bfloat16 and torch.allclose(probs.float(), ref, atol=1e-2)
    torch.manual_seed(0)  # the same seed draws the same masks
    assert torch.equal(out, attend(q, k, v, None, False, 0.3, need_probs=False)[0])


def test_old_transformers_is_refused_by_name() -> None:
    """An output class without the ``cache`` field (transformers < 5.24) is refused at import with
    the installed version and the fix, not with a TypeError in the first forward."""
    import dataclasses

    import transformers

    from elm.modeling.configuration_elm import check_transformers

    check_transformers()  # the installed transformers passes

    @dataclasses.dataclass
    class OldOutput:  # transformers 5.17's fields
        last_hidden_state: object = None
        past_key_values: object = None

    with pytest.raises(ImportError, match=f"installed: {transformers.__version__}.*transformers>=5.24"):
        check_transformers(OldOutput)
