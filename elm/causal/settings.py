"""Every setting of the causal commands checked before a model or data loads (one line naming the
key, the value and what is valid): ``elm.causal.teacher_train``, ``elm.causal.minillm``,
``elm.causal.evaluate`` and ``elm.causal.pipeline``. The pipeline also composes the configs of the
sub-commands it will run (teacher, search, retrain, with their overrides) and checks them, so a
bad retrain override fails in a second, not after the teacher and the search have trained."""

from __future__ import annotations

import string
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig

from ..utils.runtime import resolve_device
from ..utils.settings import check_choice, check_flag, check_number, compose_config, to_dataclass

PRECISIONS = ("bf16", "fp32")
OBJECTIVES = ("minillm", "reverse_kl", "forward_kl")
MINILLM_DATA = ("prompts", "corpus")
RESPONSE_ENDS = ("eos", "newline", "none")
BBC_FIELDS = ("title", "body", "topic", "response")  # elm.causal.prompts.bbc_rows


def _plain(check):
    """A ``???`` left unset (e.g. ``prompts.source`` of ``prompts=jsonl``) is a one-line ValueError."""
    import functools

    from omegaconf.errors import MissingMandatoryValue

    @functools.wraps(check)
    def wrapped(cfg, *args):
        try:
            return check(cfg, *args)
        except MissingMandatoryValue as err:
            key = getattr(err, "full_key", None) or "a required setting"
            raise ValueError(f"{key} is not set (???); pass {key}=<value>") from None

    return wrapped


def check_common(cfg: DictConfig) -> None:
    """``seed``, ``threads``, ``precision``, ``progress`` and ``device``."""
    check_number("seed", cfg.seed, 0)
    check_number("threads", cfg.get("threads"), 1, none=True)
    if "precision" in cfg:
        check_choice("precision", cfg.precision, PRECISIONS)
    if "progress" in cfg:
        check_flag("progress", cfg.progress)
    resolve_device(cfg.get("device", "auto"))


def check_data(d: DictConfig) -> None:
    """The corpus (``configs/data``): numbers, and a local source that exists."""
    check_number("data.seq_len", d.seq_len, 2)
    check_number("data.val_fraction", d.val_fraction, 0, integer=False, strict=True, high=0.5)
    check_number("data.max_docs", d.get("max_docs"), 2, none=True)
    source = str(d.source)
    if source != "bbc" and not source.startswith("hf:") and not Path(source).expanduser().exists():
        raise ValueError(
            f"data.source={source!r} is not 'bbc', an hf:<name> spec, or an existing file/folder"
        )


def check_prompts(p: DictConfig) -> None:
    """The prompt/response data (``configs/prompts``)."""
    source = str(p.source)
    if source not in ("bbc",) and not source.startswith("hf:"):
        path = Path(source).expanduser()
        if not path.is_file() or path.suffix != ".jsonl":
            raise ValueError(
                f"prompts.source={source!r} is not 'bbc', 'hf:<name>' or an existing .jsonl file"
            )
    if not isinstance(p.template, str):
        raise ValueError(f"prompts.template={p.template!r} must be a string")
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(p.template) if name is not None}
    except ValueError as err:
        raise ValueError(f"prompts.template={p.template!r} is not a format string ({err})") from None
    if source == "bbc" and not fields <= set(BBC_FIELDS):
        raise ValueError(f"prompts.template={p.template!r} uses {sorted(fields - set(BBC_FIELDS))}; "
                         f"the BBC rows have: {', '.join(BBC_FIELDS)}")  # fmt: skip
    check_number("prompts.response_sentences", p.get("response_sentences", 1), 1)
    check_choice("prompts.response_end", p.get("response_end", "eos"), RESPONSE_ENDS)
    check_number("prompts.val_fraction", p.val_fraction, 0, integer=False, strict=True, high=0.5)
    check_number("prompts.max_train", p.get("max_train"), 1, none=True)
    check_number("prompts.max_val", p.get("max_val"), 1, none=True)


def check_minillm_section(m: DictConfig) -> None:
    """``minillm.*`` (``configs/causal_minillm.yaml``; the pipeline's ``minillm`` section too)."""
    check_choice("minillm.objective", m.objective, OBJECTIVES)
    check_choice("minillm.data", m.data, MINILLM_DATA)
    check_number("minillm.steps", m.steps, 0)
    for key in ("batch_size", "pt_batch_size", "max_prompt_tokens", "max_new_tokens", "max_response_tokens",
                "val_examples"):  # fmt: skip
        check_number(f"minillm.{key}", m[key], 1)
    check_number("minillm.lr", m.lr, 0, integer=False, strict=True)
    check_number("minillm.weight_decay", m.weight_decay, 0, integer=False)
    check_number("minillm.warmup_steps", m.warmup_steps, 0)
    check_number("minillm.grad_clip", m.grad_clip, 0, integer=False, strict=True)
    check_number("minillm.max_time_s", m.get("max_time_s"), 0, integer=False, strict=True, none=True)
    alpha = m.mix_alpha
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 <= alpha < 1:
        raise ValueError(f"minillm.mix_alpha={alpha!r} must be a number in [0, 1)")
    check_flag("minillm.single_step", m.single_step)
    check_flag("minillm.length_norm", m.length_norm)
    check_number("minillm.pt_coef", m.pt_coef, 0, integer=False)
    check_number("minillm.temperature", m.temperature, 0, integer=False, strict=True)
    check_number("minillm.log_every", m.get("log_every", 1), 1)


def check_eval_section(e: DictConfig) -> None:
    """``eval.*`` (``configs/causal_eval.yaml``; the pipeline's ``eval`` section too)."""
    for key in ("batch_size", "gen_batch_size", "max_prompt_tokens", "max_new_tokens"):
        check_number(f"eval.{key}", e[key], 1)
    check_number("eval.ppl_batches", e.get("ppl_batches"), 1, none=True)
    check_number("eval.rouge_examples", e.get("rouge_examples"), 1, none=True)
    check_number("eval.samples", e.samples, 0)
    check_flag("eval.stop_at_newline", e.stop_at_newline)
    check_number("eval.temperature", e.temperature, 0, integer=False, strict=True)
    check_number("eval.top_k", e.top_k, 0)
    check_number("eval.top_p", e.top_p, 0, integer=False, strict=True, high=1)


@_plain
def check_teacher_settings(cfg: DictConfig) -> None:
    """Every setting of ``configs/causal_teacher.yaml`` (tokenizer, model, train, data)."""
    check_common(cfg)
    check_data(cfg.data)
    check_flag("force", cfg.force)
    spec = str(cfg.tokenizer)
    if spec.startswith("bpe:"):
        size = spec[4:]
        if not size.isdigit() or int(size) < 300:
            raise ValueError(
                f"tokenizer={spec!r}: bpe:<size> needs a whole number >= 300 (256 bytes + merges)"
            )
    m = cfg.model
    for key in ("n_layer", "n_embd", "n_head", "n_positions"):
        check_number(f"model.{key}", m[key], 1)
    if m.n_embd % m.n_head:
        raise ValueError(f"model.n_embd={m.n_embd} must be divisible by model.n_head={m.n_head}")
    if cfg.data.seq_len > m.n_positions:
        raise ValueError(f"data.seq_len={cfg.data.seq_len} exceeds model.n_positions={m.n_positions}")
    check_number("model.dropout", m.dropout, 0, integer=False, high=0.9)
    t = cfg.train
    check_number("train.steps", t.steps, 1)
    check_number("train.batch_size", t.batch_size, 1)
    check_number("train.lr", t.lr, 0, integer=False, strict=True)
    check_number("train.warmup_steps", t.warmup_steps, 0)
    check_number("train.weight_decay", t.weight_decay, 0, integer=False)
    check_number("train.grad_clip", t.grad_clip, 0, integer=False, strict=True)
    check_number("train.max_time_s", t.get("max_time_s"), 0, integer=False, strict=True, none=True)
    check_number("train.eval_batches", t.get("eval_batches"), 1, none=True)
    check_number("train.log_every", t.get("log_every", 1), 1)


@_plain
def check_minillm_settings(cfg: DictConfig) -> None:
    """Every setting of ``configs/causal_minillm.yaml``."""
    from ..utils.hub import resolve_model_path

    if not cfg.get("student") or not cfg.teacher.get("name"):
        raise ValueError(
            "pass student=<exported causal student dir> and teacher.name=<causal teacher dir or name>"
        )
    if not Path(str(cfg.student)).expanduser().is_dir():
        raise ValueError(f"student={cfg.student!r} is not a directory; pass an exported causal student dir")
    resolve_model_path(str(cfg.teacher.name))  # a path that does not exist, or a hub name while offline
    check_common(cfg)
    check_minillm_section(cfg.minillm)
    check_prompts(cfg.prompts)
    m = cfg.minillm
    if m.pt_coef > 0 or (m.objective != "minillm" and m.data == "corpus"):
        check_data(cfg.data)


@_plain
def check_evaluate_settings(cfg: DictConfig) -> None:
    """Every setting of ``configs/causal_eval.yaml``."""
    if not cfg.get("model"):
        raise ValueError("nothing to evaluate: pass model=<exported model dir>")
    check_common(cfg)
    check_data(cfg.data)
    check_prompts(cfg.prompts)
    check_eval_section(cfg.eval)


def _teacher_width(name: str) -> int | None:
    """``hidden_size``/``n_embd`` of a local teacher dir (None for a hub name); a missing path is refused."""
    import json

    from ..utils.hub import resolve_model_path

    config = Path(resolve_model_path(name)) / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text())
    return data.get("hidden_size", data.get("n_embd"))


@contextmanager
def _composed(name: str, overrides: list[str], what: str) -> Iterator[DictConfig]:
    """A sub-command's config (``compose_config``); a refusal inside names the pipeline key ``what``
    its overrides came from."""
    cfg = compose_config(name, overrides, what=what)
    try:
        yield cfg
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from None


@_plain
def check_pipeline_settings(cfg: DictConfig, sub_overrides: dict[str, list[str]]) -> None:
    """Every setting of ``configs/causal_pipeline.yaml`` and of the sub-commands it runs.

    ``sub_overrides``: the overrides the pipeline passes to ``causal_teacher`` (only when
    ``teacher.name`` is null), ``search`` and ``retrain`` (``elm.causal.pipeline`` builds them),
    composed here with each command's config and checked by that command's own checks.
    """
    from ..retrain.settings import check_retrain_settings
    from ..search.settings import check_search_settings
    from ..space import SpaceConfig

    check_common(cfg)
    check_data(cfg.data)
    check_prompts(cfg.prompts)
    check_minillm_section(cfg.minillm)
    check_eval_section(cfg.eval)
    check_number("uniform.tolerance", cfg.uniform.tolerance, 0, integer=False, strict=True, high=1)
    check_number("uniform.ffn_step", cfg.uniform.ffn_step, 1)
    if cfg.teacher.get("name"):
        width = _teacher_width(str(cfg.teacher.name))
    else:
        with _composed("causal_teacher", sub_overrides["causal_teacher"], "teacher.train_overrides") as tcfg:
            check_teacher_settings(tcfg)
        width = tcfg.model.n_embd
    with _composed("search", sub_overrides["search"], "search.overrides") as scfg:
        space = to_dataclass(SpaceConfig, scfg.space, "space")
        check_number("space.num_layers", space.num_layers, 1)
        if width is not None or space.hidden_size is not None:
            space.resolve(width or space.hidden_size).validate()
        check_search_settings(scfg, space.num_layers)
    budgets = dict(scfg.search.budgets)
    if cfg.search.budget not in budgets:
        raise ValueError(f"search.budget={cfg.search.budget!r} is not a budget of the search; its budgets: "
                         f"{', '.join(budgets) or 'none'}")  # fmt: skip
    with _composed("retrain", sub_overrides["retrain"], "retrain.overrides") as rcfg:
        check_retrain_settings(rcfg)
