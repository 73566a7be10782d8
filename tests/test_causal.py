"""Causal LM path: teacher training, causal masks and relations, KL / MiniLLM distillation,
ROUGE-L, generation of exported students, and the causal search end to end.

Everything runs at toy size on CPU; references are written out here (plain torch / numpy /
``rouge_score`` directly), nothing is mocked.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from datasets import Dataset, DatasetDict
from omegaconf import OmegaConf

import elm  # noqa: F401  (registers ElmForCausalLM with the Auto classes)
from elm.causal.common import StepBudget
from elm.causal.evaluate import clean_response, generate, perplexity, rouge_l
from elm.causal.minillm import distil, export_student
from elm.causal.prompts import encode_pair, encode_prompt, first_sentences, load_prompts
from elm.causal.rollout import Rollout, future_rewards, minillm_loss, sample_rollouts, teacher_forced_kl
from elm.causal.teacher_train import train_bpe_tokenizer, train_teacher
from elm.distill.losses import reverse_kl, rkd_loss
from elm.modeling import ElmForCausalLM, config_from_arch
from elm.modeling.modeling_elm import attention_bias
from elm.space import ArchConfig, LayerConfig
from elm.supernet import CandidateBlock
from elm.utils.settings import compose_config

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 384


# ---------------------------------------------------------------------------------------------
# Toy models and data
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    """A small byte-level BPE trained on a few BBC articles (deterministic)."""
    from elm.data.corpus import bbc_documents

    texts = [t for t, _ in bbc_documents()[:40]]
    return train_bpe_tokenizer(texts, VOCAB)


def tiny_teacher(tokenizer, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tokenizer), n_positions=96, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, eos_token_id=tokenizer.eos_token_id,
                     bos_token_id=tokenizer.eos_token_id)  # fmt: skip
    return GPT2LMHeadModel(cfg).eval().requires_grad_(False)


def tiny_arch(vocab: int, blocks=("bert", "mobilebert"), share="none", max_positions: int = 96) -> ArchConfig:
    layers = [
        LayerConfig(
            block=b,
            num_heads=2,
            head_dim=8,
            ffn_dim=24,
            num_ffn=2 if b == "mobilebert" else 1,
            bottleneck_size=16 if b == "mobilebert" else None,
            share=share,
        )  # fmt: skip
        for b in blocks
    ]
    return ArchConfig(hidden_size=32, embedding_size=16, vocab_size=vocab, max_positions=max_positions,
                      type_vocab_size=0, causal=True, layers=layers).validate()  # fmt: skip


def tiny_student(vocab: int, seed: int = 1, **kw) -> ElmForCausalLM:
    torch.manual_seed(seed)
    cfg = config_from_arch(tiny_arch(vocab, **kw), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return ElmForCausalLM(cfg)


@pytest.fixture(scope="module")
def prompt_data():
    """12 prompt/response pairs from BBC-like text (in memory)."""
    titles = [
        "Markets rally",
        "Team wins cup",
        "New phone out",
        "Film breaks record",
        "Rates held",
        "Strike ends",
    ]
    rows = [{"prompt": f"{t} {i}\n\n", "response": f"The {t.lower()} story number {i} is here."}
            for i, t in enumerate(titles * 2)]  # fmt: skip
    return DatasetDict(train=Dataset.from_list(rows[:8]), validation=Dataset.from_list(rows[8:]))


def minillm_cfg(**kw):
    base = dict(objective="minillm", data="prompts", steps=8, batch_size=4, lr=3e-3, weight_decay=0.0,
                warmup_steps=0, grad_clip=1.0, max_time_s=None, mix_alpha=0.2,
                single_step=True, length_norm=True, pt_coef=0.0, pt_batch_size=4, max_prompt_tokens=16,
                max_new_tokens=8, max_response_tokens=16, temperature=1.0, val_examples=4, log_every=2)  # fmt: skip
    return OmegaConf.create({**base, **kw})


# ---------------------------------------------------------------------------------------------
# Causal masks and relations
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", ["bert", "mobilebert"])
@pytest.mark.parametrize("share", ["none", "qv", "kv"])
def test_causal_mask_holds_in_every_block_type(block, share):
    """Changing tokens after position k changes no output at positions <= k: in the supernet's
    candidate block and in the exported ElmForCausalLM, with and without padding."""
    torch.manual_seed(0)
    mobile = block == "mobilebert"
    cand = CandidateBlock(block, 32, max_heads=2, head_dim=8, share=share, ffn_init=16, ffn_max=32,
                          num_ffn=2 if mobile else 1, bottleneck_size=16 if mobile else None, dropout=0.0).eval()  # fmt: skip
    x = torch.randn(2, 10, 32)
    y = x.clone()
    y[:, 6:] = torch.randn(2, 4, 32)
    for attn_mask in (None, torch.tensor([[1] * 10, [1] * 8 + [0] * 2])):
        bias = attention_bias(attn_mask, True, 10)
        a, _ = cand(x, bias, causal=True)
        b, _ = cand(y, bias, causal=True)
        torch.testing.assert_close(a[:, :6], b[:, :6])
        assert not torch.allclose(a[:, 6:], b[:, 6:])

    model = tiny_student(VOCAB, blocks=(block, block), share=share).eval()
    ids = torch.randint(0, VOCAB, (2, 10))
    ids2 = ids.clone()
    ids2[:, 6:] = (ids2[:, 6:] + 7) % VOCAB
    with torch.no_grad():
        la = model(input_ids=ids, output_hidden_states=True)
        lb = model(input_ids=ids2, output_hidden_states=True)
    torch.testing.assert_close(la.logits[:, :6], lb.logits[:, :6])
    for ha, hb in zip(la.hidden_states, lb.hidden_states):
        torch.testing.assert_close(ha[:, :6], hb[:, :6])


def _rkd_reference(s: np.ndarray, t: np.ndarray, valid: np.ndarray) -> float:
    """1 - Pearson over pairs (i, j) with j < i, both valid: each token related to earlier tokens only."""
    out = []
    for b in range(s.shape[0]):
        idx = np.flatnonzero(valid[b])
        zs = s[b] / np.linalg.norm(s[b], axis=-1, keepdims=True)
        zt = t[b] / np.linalg.norm(t[b], axis=-1, keepdims=True)
        rs, rt = zs @ zs.T, zt @ zt.T
        pairs = [(i, j) for i in idx for j in idx if j < i]
        a, c = np.array([rs[p] for p in pairs]), np.array([rt[p] for p in pairs])
        out.append(1 - np.corrcoef(a, c)[0, 1])
    return float(np.mean(out))


def test_causal_relational_loss_ignores_future_tokens(tokenizer):
    torch.manual_seed(0)
    s, t = torch.randn(2, 9, 16), torch.randn(2, 9, 24)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[:, 6:] = 0  # tokens 6.. are "the future" of a length-6 prefix
    loss = rkd_loss(s, t, mask, causal=True)
    ref = _rkd_reference(s.double().numpy(), t.double().numpy(), mask.numpy())
    assert float(loss) == pytest.approx(ref, abs=1e-5)
    # whatever the future tokens' states are, the loss of the prefix does not change
    s2, t2 = s.clone(), t.clone()
    s2[:, 6:], t2[:, 6:] = torch.randn(2, 3, 16) * 5, torch.randn(2, 3, 24) * 5
    assert float(rkd_loss(s2, t2, mask, causal=True)) == pytest.approx(float(loss), abs=1e-6)
    # a causal student block and a causal teacher on inputs sharing a 6-token prefix: the
    # block-wise loss over the prefix is identical (nothing of the future leaks into it)
    teacher = tiny_teacher(tokenizer)
    cand = CandidateBlock(
        "bert", 32, max_heads=2, head_dim=8, share="none", ffn_init=16, ffn_max=32, dropout=0.0
    ).eval()
    ids = torch.randint(0, VOCAB, (2, 9))
    ids2 = ids.clone()
    ids2[:, 6:] = (ids2[:, 6:] + 11) % VOCAB
    losses = []
    for x in (ids, ids2):
        with torch.no_grad():
            h = teacher(input_ids=x, output_hidden_states=True).hidden_states
            out, _ = cand(h[1], None, causal=True)
        losses.append(float(rkd_loss(out, h[2], mask, causal=True)))
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)


# ---------------------------------------------------------------------------------------------
# KL objectives and MiniLLM
# ---------------------------------------------------------------------------------------------


def test_teacher_forced_kl_matches_direct_computation(tokenizer, prompt_data):
    """Only response targets count: position t's distributions score token t+1."""
    teacher, student = tiny_teacher(tokenizer), tiny_student(len(tokenizer)).eval()
    rows = [encode_pair(tokenizer, r["prompt"], r["response"], 16, 16) for r in prompt_data["train"]][:3]
    from elm.causal.minillm import right_pad

    batch = right_pad([{"input_ids": r["input_ids"], "score_mask": r["response_mask"]} for r in rows],
                      tokenizer.pad_token_id, "cpu")  # fmt: skip
    with torch.no_grad():
        fwd = teacher_forced_kl(student, teacher, batch, "forward_kl")
        rev = teacher_forced_kl(student, teacher, batch, "reverse_kl")
        total_f = total_r = 0.0
        n = 0
        for r in rows:
            ids = torch.tensor([r["input_ids"]])
            q = F.softmax(student(input_ids=ids).logits[0].double(), -1)
            p = F.softmax(teacher(input_ids=ids).logits[0].double(), -1)
            for t in range(len(r["input_ids"]) - 1):
                if r["response_mask"][t + 1]:
                    total_f += float((p[t] * (p[t].log() - q[t].log())).sum())
                    total_r += float((q[t] * (q[t].log() - p[t].log())).sum())
                    n += 1
    assert float(fwd) == pytest.approx(total_f / n, rel=1e-4)
    assert float(rev) == pytest.approx(total_r / n, rel=1e-4)


@pytest.mark.parametrize("objective", ["forward_kl", "reverse_kl"])
def test_token_level_kl_training_reduces_the_loss(tokenizer, prompt_data, objective):
    torch.manual_seed(0)
    teacher, student = tiny_teacher(tokenizer), tiny_student(len(tokenizer))
    m = minillm_cfg(objective=objective, steps=12, lr=1e-2)
    out = distil(student, teacher, tokenizer, prompt_data, m, seed=0, progress=False)
    assert out["steps"] == 12 and all(math.isfinite(h["total"]) for h in out["history"])
    assert out["val_after"][objective] < 0.8 * out["val_before"][objective]
    assert out["history"][-1]["total"] < out["history"][0]["total"]


def test_future_rewards_against_loops():
    torch.manual_seed(0)
    r, m = torch.randn(3, 7), (torch.rand(3, 7) > 0.3).float()
    for include, norm in ((True, False), (False, False), (True, True), (False, True)):
        got = future_rewards(r, m, include_current=include, normalise=norm)
        for b in range(3):
            for t in range(7):
                idx = [u for u in range(7) if (u >= t if include else u > t) and m[b, u] > 0]
                total = sum(float(r[b, u]) for u in idx)
                want = (total / len(idx) if idx else 0.0) if norm else total
                assert float(got[b, t]) == pytest.approx(want, abs=1e-5)


def test_minillm_single_step_term_is_token_reverse_kl(tokenizer):
    """Without teacher mixing (w = 1) the single-step term is the exact token-level reverse KL
    on the sampled prefixes, and the long-term gradient acts only through log q(y_t)."""
    teacher, student = tiny_teacher(tokenizer), tiny_student(len(tokenizer)).eval()
    prompts = [encode_prompt(tokenizer, p) for p in ("Markets rally\n\n", "Rates held today\n\n")]
    g = torch.Generator().manual_seed(0)
    ro = sample_rollouts(student, teacher, prompts, max_new_tokens=6, mix_alpha=0.0, stop_ids=(),
                         pad_id=tokenizer.pad_token_id, generator=g)  # fmt: skip
    assert ro.gen_mask.sum(-1).tolist() == [6, 6]
    terms = minillm_loss(student, teacher, ro, mix_alpha=0.0)
    pos = (ro.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        s = student(input_ids=ro.input_ids, attention_mask=ro.attention_mask, position_ids=pos).logits[:, :-1]
        t = teacher(input_ids=ro.input_ids, attention_mask=ro.attention_mask, position_ids=pos).logits[:, :-1]
    ref = reverse_kl(s, t, ro.gen_mask[:, 1:])
    assert float(terms["single"].detach()) == pytest.approx(float(ref), rel=1e-5)
    assert float(terms["rkl_token"]) == pytest.approx(float(ref), rel=1e-5)


def test_minillm_with_teacher_mixed_sampling_reduces_reverse_kl(tokenizer, prompt_data):
    torch.manual_seed(0)
    teacher, student = tiny_teacher(tokenizer), tiny_student(len(tokenizer))
    prompts = [encode_prompt(tokenizer, r["prompt"]) for r in prompt_data["train"]]

    def sampled_rkl() -> float:  # exact per-step reverse KL on a fixed set of student samples
        g = torch.Generator().manual_seed(123)
        ro = sample_rollouts(student, teacher, prompts, max_new_tokens=8, mix_alpha=0.0, stop_ids=(),
                             pad_id=tokenizer.pad_token_id, generator=g)  # fmt: skip
        with torch.no_grad():
            return float(minillm_loss(student, teacher, ro, mix_alpha=0.0)["rkl_token"])

    before = sampled_rkl()
    m = minillm_cfg(steps=10, lr=1e-2, mix_alpha=0.2)
    out = distil(student, teacher, tokenizer, prompt_data, m, seed=0, progress=False)
    assert all(math.isfinite(h["total"]) and math.isfinite(h["rkl_token"]) for h in out["history"])
    assert out["history"][-1]["response_len"] == 8
    assert sampled_rkl() < 0.8 * before
    assert out["history"][-1]["rkl_token"] < out["history"][0]["rkl_token"]
    assert out["val_after"]["reverse_kl"] < out["val_before"]["reverse_kl"]


def test_cached_next_token_logits_match_full_recompute(tokenizer):
    """The KV-cached steps of the teacher (HF GPT-2) and of the ELM student (left-padded batch)
    give the logits of a full forward."""
    from elm.causal.rollout import LastLogits, left_pad, logits

    for model in (tiny_teacher(tokenizer), tiny_student(len(tokenizer)).eval()):
        ids, mask = left_pad([[5, 6, 7, 8], [9, 10]], tokenizer.pad_token_id, "cpu")
        step = LastLogits(model)
        for new in ([11, 12], [13, 14], [15, 16]):
            with torch.no_grad():
                got, want = step(ids, mask), logits(model, ids, mask)[:, -1]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
            ids = torch.cat([ids, torch.tensor(new)[:, None]], 1)
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        assert step.past is not None and step.past.get_seq_length() == ids.shape[1] - 1  # it did cache


def test_rollouts_stop_at_stop_tokens(tokenizer):
    teacher, student = tiny_teacher(tokenizer), tiny_student(len(tokenizer)).eval()
    prompts = [encode_prompt(tokenizer, "Markets rally\n\n")] * 3
    g = torch.Generator().manual_seed(0)
    everything = list(range(len(tokenizer)))  # every token stops: one generated token each
    ro = sample_rollouts(student, teacher, prompts, max_new_tokens=5, mix_alpha=0.5, stop_ids=everything,
                         pad_id=tokenizer.pad_token_id, generator=g)  # fmt: skip
    assert ro.input_ids.shape[1] == len(prompts[0]) + 1 and ro.lengths.tolist() == [1, 1, 1]


def test_importance_weights_bounded_with_mixing(tokenizer):
    teacher, student = tiny_teacher(tokenizer), tiny_student(len(tokenizer)).eval()
    ids = torch.randint(0, len(tokenizer), (2, 10))
    ro = Rollout(ids, torch.ones_like(ids), torch.tensor([[0] * 4 + [1] * 6] * 2))
    alpha = 0.3
    terms = minillm_loss(student, teacher, ro, mix_alpha=alpha, single_step=False, length_norm=False)
    assert math.isfinite(float(terms["total"].detach())) and "single" not in terms
    pos = torch.arange(10)[None].expand(2, -1)
    with torch.no_grad():
        lq = F.log_softmax(student(input_ids=ids, position_ids=pos).logits[:, :-1], -1)
        lp = F.log_softmax(teacher(input_ids=ids).logits[:, :-1], -1)
    q, p = lq.exp(), lp.exp()
    w = q / (alpha * p + (1 - alpha) * q)
    assert float(w.max()) <= 1 / (1 - alpha) + 1e-6


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def test_rouge_l_equals_rouge_score():
    from rouge_score import rouge_scorer

    preds = ["the cat sat on the mat", "profits rose sharply in the quarter", ""]
    refs = ["a cat sat on a mat today", "quarterly profits rose by 5%", "nothing here"]
    got = rouge_l(preds, refs)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    direct = [scorer.score(r, p)["rougeL"] for p, r in zip(preds, refs)]
    assert got["f"] == pytest.approx(np.mean([d.fmeasure for d in direct]))
    assert got["precision"] == pytest.approx(np.mean([d.precision for d in direct]))
    assert got["recall"] == pytest.approx(np.mean([d.recall for d in direct]))
    assert got["per_example"] == pytest.approx([d.fmeasure for d in direct])


def test_perplexity_is_exp_of_token_nll(tokenizer):
    teacher = tiny_teacher(tokenizer)
    blocks = Dataset.from_dict({"input_ids": torch.randint(0, len(tokenizer), (5, 12)).tolist(),
                                "attention_mask": [[1] * 12] * 5})  # fmt: skip
    got = perplexity(teacher, blocks, tokenizer, batch_size=2)
    ids = torch.tensor(blocks["input_ids"])
    with torch.no_grad():
        nll = F.cross_entropy(teacher(input_ids=ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert got["tokens"] == 5 * 11
    assert got["ppl"] == pytest.approx(math.exp(float(nll)), rel=1e-5)


def test_exported_student_generates_through_auto_model(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    student = tiny_student(len(tokenizer)).eval()
    info = {"objective": "reverse_kl", "teacher": str(tmp_path / "teacher"), "steps": 3,
            "val_before": {"reverse_kl": 2.0, "forward_kl": 2.5, "nll": 5.0}, "val_after": {"reverse_kl": 1.5,
            "forward_kl": 2.0, "nll": 4.5}}  # fmt: skip
    out = export_student(student, tokenizer, tmp_path / "student", info)
    assert (out / "DONE").is_file() and json.loads((out / "arch.json").read_text())["causal"] is True
    card = (out / "README.md").read_text()  # a model card, no local paths in it
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["pipeline_tag"] == "text-generation" and str(tmp_path) not in card and "local:teacher" in card
    assert meta["model-index"][0]["results"][0]["metrics"][0] == {"type": "reverse_kl", "value": 1.5,
                                                                  "name": "validation reverse_kl (after)"}  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "ElmForCausalLM"
    prompts = ["Markets rally\n\n", "A much longer headline about rates\n\n"]
    greedy = generate(model, tokenizer, prompts, max_new_tokens=6, stop_at_newline=False)
    alone = [generate(model, tokenizer, [p], max_new_tokens=6, stop_at_newline=False)[0] for p in prompts]
    assert greedy == alone  # left padding and positions are handled: batched == one by one
    sampled = generate(
        model, tokenizer, prompts, max_new_tokens=6, do_sample=True, top_k=20, temperature=0.9, seed=3
    )
    again = generate(
        model, tokenizer, prompts, max_new_tokens=6, do_sample=True, top_k=20, temperature=0.9, seed=3
    )
    assert sampled == again and len(sampled) == 2
    ids = torch.tensor([encode_prompt(tokenizer, prompts[0])])
    seq = model.generate(
        input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    assert seq.shape == (1, ids.shape[1] + 5) and torch.equal(seq[:, : ids.shape[1]], ids)


def test_prompt_helpers(tokenizer):
    assert first_sentences("Profits rose 5%. Shares fell. More later.", 2) == "Profits rose 5%. Shares fell."
    assert first_sentences("He paid $1.13bn. Then left.", 1) == "He paid $1.13bn."
    ids = encode_prompt(tokenizer, "Steel firm\n\n")
    joint = tokenizer("Steel firm\n\nMittal", add_special_tokens=False)["input_ids"]
    assert joint[: len(ids)] == ids  # the prompt tokenises as it does before a continuation
    pair = encode_pair(tokenizer, "Title\n\n", "Body text.", 8, 32, end=[tokenizer.eos_token_id])
    assert pair["input_ids"][-1] == tokenizer.eos_token_id and sum(pair["response_mask"]) >= 2
    assert clean_response("\nFirst line\nsecond<|endoftext|>x", "<|endoftext|>", True) == "First line"
    # the BPE keeps a paragraph break as one token wherever it stands
    assert [tokenizer.decode([i]) for i in tokenizer("a\n\nb", add_special_tokens=False)["input_ids"]] == [
        "a",
        "\n\n",
        "b",
    ]
    assert tokenizer.decode(encode_prompt(tokenizer, "Steel firm\n\n")[-1:]) == "\n\n"


def test_bbc_prompts_use_the_corpus_split():
    """Validation prompts come from exactly the held-out articles of load_corpus("bbc")."""
    from elm.data.corpus import bbc_documents, bbc_group_key, split_documents

    data = load_prompts({"source": "bbc", "val_fraction": 0.05, "seed": 0})
    texts = [t for t, _ in bbc_documents()]
    _, val = split_documents(texts, 0.05, 0, [bbc_group_key(t) for t in texts])
    assert {r["prompt"] for r in data["validation"]} == {
        texts[i].split("\n", 1)[0].strip() + "\n\n" for i in val
    }
    assert all(r["response"] and "\n" not in r["response"] for r in data["validation"])


def test_step_budget_schedule_by_steps_and_by_time():
    b = StepBudget(10, warmup_steps=0)
    assert b.lr_factor(0) == pytest.approx(1.0) and b.lr_factor(5) == pytest.approx(0.5)
    assert b.lr_factor(10) == pytest.approx(0.0) and b.finished(10) and not b.finished(9)
    b = StepBudget(10, warmup_steps=4)  # warm-up capped at a tenth of the run
    assert b.warmup == 1 and b.lr_factor(0) == pytest.approx(1.0)
    t = StepBudget(1000, max_time_s=1e-6)  # the time limit is already reached: progress 1
    assert t.lr_factor(3) == pytest.approx(0.0) and t.finished(3) and t.time_limited
    assert t.record(3)["steps"] == 3 and t.record(3)["requested_steps"] == 1000


# ---------------------------------------------------------------------------------------------
# Teacher training and the causal search (real entry points)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "gpt2-tiny"
    cfg = compose_config("causal_teacher", [
        "tokenizer=bpe:512", "model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.n_positions=64",
        "model.dropout=0.0", "data.max_docs=60", "data.seq_len=32", "train.steps=40", "train.batch_size=8",
        "train.lr=5e-3", "train.warmup_steps=4", "train.eval_batches=4", "train.max_time_s=null",
        "train.log_every=10", "progress=false", "device=cpu", f"out_dir={out}",
    ])  # fmt: skip
    info = train_teacher(cfg)
    return out, info


def test_tiny_teacher_trains_and_perplexity_falls(tiny_teacher_dir):
    from transformers import AutoModelForCausalLM

    out, info = tiny_teacher_dir
    assert info["training"]["steps"] == 40
    assert info["val_ppl"] < 0.5 * info["val_ppl_init"]
    saved = json.loads((out / "teacher_info.json").read_text())
    assert saved["val_ppl"] == pytest.approx(info["val_ppl"])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "GPT2LMHeadModel" and model.config.n_layer == 2


def test_causal_search_end_to_end(tiny_teacher_dir, tmp_path):
    teacher, _ = tiny_teacher_dir
    run = tmp_path / "search"
    cmd = [sys.executable, "-m", "elm.search", "space=tiny", "space.hidden_size=32", "space.causal=true", f"teacher.name={teacher}",
           "data.max_docs=60", "data.seq_len=32", "search.epochs=2", "search.steps_per_epoch=2",
           "search.batch_size=4", "search.eval_batches=1", "search.analysis_batch_size=4", "~search.budgets.tiny",
           "search.budgets.small=40000", "logger=none", "progress=false", "plots.enabled=false", "device=cpu",
           f"hydra.run.dir={run}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    arch = json.loads((run / "arch.json").read_text())
    assert arch["causal"] is True and arch["type_vocab_size"] == 0
    assert arch["vocab_size"] == 512 and (run / "DONE").is_file()
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    epochs = [r for r in records if "epoch" in r]
    assert len(epochs) == 2 and "pca" in epochs[0] and epochs[0]["growth"]  # PCA growth after epoch 1


def test_causal_search_with_llama_blocks_exports_a_model_that_generates(tiny_teacher_dir, tmp_path):
    """The llama family in a causal search beside BERT blocks: the chosen architecture (forced to
    llama layers here) is exported from the search state, loads through AutoModelForCausalLM and
    generates."""
    from transformers import AutoModelForCausalLM

    from elm.retrain.init import init_from_search
    from elm.teacher import load_teacher

    teacher_dir, _ = tiny_teacher_dir
    run = tmp_path / "search"
    cmd = [sys.executable, "-m", "elm.search", "space=tiny", "space.hidden_size=32", "space.causal=true",
           f"teacher.name={teacher_dir}", "space.blocks=[bert,llama]", "+space.families.llama={heads: 4, group: 2}",
           "data.max_docs=60", "data.seq_len=32", "search.epochs=2", "search.steps_per_epoch=2", "search.batch_size=4",
           "search.eval_batches=1", "search.analysis_batch_size=4", "~search.budgets.tiny", "search.budgets.small=40000",
           "logger=none", "progress=false", "plots.enabled=false", "device=cpu", f"hydra.run.dir={run}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    epochs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"epoch"' in x]
    assert {"L0.llama", "L0.llama.gqa2", "L1.llama.gqa2"} <= set(epochs[-1]["pca"])
    searched = ArchConfig.from_json(run / "arch.json")
    heads = epochs[-1]["heads"]
    arch = ArchConfig(**{**searched.to_dict(), "layers": [
        LayerConfig("llama", num_heads=heads["L0.llama.gqa2"], head_dim=16, ffn_dim=epochs[-1]["ffn"]["L0.llama.gqa2"], share="gqa2"),
        LayerConfig("llama", num_heads=heads["L1.llama"], head_dim=16, ffn_dim=epochs[-1]["ffn"]["L1.llama"])]})  # fmt: skip
    teacher = load_teacher(teacher_dir)
    model, info = init_from_search(run, arch, teacher, ElmForCausalLM)
    assert info["candidates"] == ["L0.llama.gqa2", "L1.llama"]
    # a GPT-2 teacher is not inherited from: the trained N(0, 1) embeddings come scaled to the init range
    assert not info["inherited_from_teacher"] and info["embeddings"].startswith("supernet, scaled by")
    assert model.elm.embeddings.word.weight.detach().std().item() == pytest.approx(model.config.initializer_range, rel=1e-3)
    model.save_pretrained(tmp_path / "student")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    assert loaded.config.block_layouts == {"llama": "llama"}
    ids = torch.tensor([[5, 9, 17, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits)
    out = loaded.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 10) and torch.equal(out[:, :4], ids)


@pytest.mark.slow
def test_causal_pipeline_end_to_end(tiny_teacher_dir, tmp_path):
    """The real ``python -m elm.causal.pipeline`` at toy size: every number of the table computed,
    and the final exports generate through AutoModelForCausalLM."""
    from transformers import AutoModelForCausalLM

    from elm.causal.common import load_causal_lm

    teacher, _ = tiny_teacher_dir
    run = tmp_path / "pipeline"
    search = ["space=tiny", "space.hidden_size=null", "search.epochs=2", "search.steps_per_epoch=2", "search.batch_size=4",
              "search.eval_batches=1", "search.analysis_batch_size=4", "~search.budgets.tiny",
              "search.budgets.small=40000", "plots.enabled=false"]  # fmt: skip
    retrain = [
        "retrain.epochs=1",
        "retrain.steps_per_epoch=2",
        "retrain.batch_size=4",
        "retrain.eval_batches=1",
    ]
    cmd = [sys.executable, "-m", "elm.causal.pipeline", f"teacher.name={teacher}", "data.max_docs=60",
           "data.seq_len=32", "search.overrides=[" + ",".join(f'"{o}"' for o in search) + "]",
           "retrain.overrides=[" + ",".join(f'"{o}"' for o in retrain) + "]", "minillm.steps=2",
           "minillm.batch_size=4", "minillm.max_new_tokens=6", "minillm.max_prompt_tokens=16",
           "minillm.val_examples=4", "eval.ppl_batches=1", "eval.rouge_examples=4", "eval.max_new_tokens=6",
           "eval.max_prompt_tokens=16", "eval.samples=1", "device=cpu", f"hydra.run.dir={run}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    summary = json.loads((run / "comparison.json").read_text())
    assert set(summary["eval"]) == {"teacher", "searched", "searched_retrain", "uniform", "uniform_retrain"}
    for result in summary["eval"].values():
        assert math.isfinite(result["perplexity"]["ppl"]) and 0 <= result["rouge_l"]["f"] <= 1
    assert json.loads((run / "searched_arch.json").read_text())["causal"] is True
    table = (run / "causal_comparison.md").read_text()
    assert "| teacher |" in table and "| uniform |" in table and (run / "DONE").is_file()
    model = AutoModelForCausalLM.from_pretrained(run / "minillm_searched" / "model")
    assert type(model).__name__ == "ElmForCausalLM"
    model, tok = load_causal_lm(run / "minillm_uniform" / "model")
    assert (
        len(generate(model, tok, ["Markets\n\n"], max_new_tokens=4, do_sample=True, stop_at_newline=False))
        == 1
    )


def test_default_causal_settings_pass_their_checks(tmp_path):
    from elm.causal.pipeline import check_settings
    from elm.causal.settings import check_evaluate_settings, check_minillm_settings, check_teacher_settings

    check_teacher_settings(compose_config("causal_teacher", []))
    check_evaluate_settings(compose_config("causal_eval", [f"model={tmp_path}"]))
    check_minillm_settings(compose_config("causal_minillm", [f"student={tmp_path}", f"teacher.name={tmp_path}"]))
    check_settings(compose_config("causal_pipeline", []))
    for prompts in ("dolly", "jsonl"):  # the other prompt sources' defaults (jsonl needs a file)
        jsonl = tmp_path / "p.jsonl"
        jsonl.write_text('{"prompt": "a", "response": "b"}\n')
        over = [f"prompts={prompts}", f"student={tmp_path}", f"teacher.name={tmp_path}", f"prompts.source={jsonl}"]
        check_minillm_settings(compose_config("causal_minillm", over if prompts == "jsonl" else over[:3]))
    with pytest.raises(ValueError, match="minillm.single_step=1 must be true or false"):
        check_minillm_settings(compose_config("causal_minillm", [f"student={tmp_path}", f"teacher.name={tmp_path}",
                                                                 "minillm.single_step=1"]))  # fmt: skip
