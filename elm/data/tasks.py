"""Sentence(-pair) classification and regression tasks for fine-tuning and evaluation.

``load_task(name, tokenizer)`` returns a :class:`TaskData` whose splits have ``input_ids``,
``attention_mask``, ``token_type_ids`` and ``labels`` (truncated to ``max_length``, not padded;
batch them with :class:`elm.data.collate.PadCollator`). Names:

* ``"bbc"`` (offline default): BBC News topic classification (5 labels, sorted topic names),
  a deterministic ~20% held-out split by document (duplicate articles stay in one split).
* a local folder holding ``train.tsv``/``train.csv`` and ``dev``/``validation`` (and optional
  ``test``) files, or one ``.tsv``/``.csv`` file (split 80/20 by row). Text columns are
  recognised by name (``sentence``, ``sentence1``/``sentence2``, ``question``/``sentence``, ...).
  A folder named after a GLUE task (``sst2``, ``rte``, ...) uses that task's metrics.
* GLUE names (``"sst2"``, ``"glue/rte"``, ...; see :data:`GLUE_TASKS`) through
  ``datasets.load_dataset("glue", name)``, online only.

String labels are mapped to ids in sorted order (``entailment`` = 0, ``not_entailment`` = 1).
Metrics come from scikit-learn and scipy in :func:`compute_metrics`.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset

from elm.data.corpus import bbc_documents, bbc_group_key, split_documents
from elm.utils.hub import load_hub_dataset

_TSV_SUFFIXES = (".tsv", ".csv")


class TaskError(ValueError):
    """A task that cannot be found or read; the message names the bad value."""


@dataclass(frozen=True)
class TaskSpec:
    """Text fields, label count and official metrics of a GLUE task."""

    text_fields: tuple[str, ...]
    num_labels: int
    metrics: tuple[str, ...]
    validation_split: str = "validation"


GLUE_TASKS: dict[str, TaskSpec] = {
    "cola": TaskSpec(("sentence",), 2, ("matthews_correlation",)),
    "sst2": TaskSpec(("sentence",), 2, ("accuracy",)),
    "mrpc": TaskSpec(("sentence1", "sentence2"), 2, ("accuracy", "f1")),
    "qqp": TaskSpec(("question1", "question2"), 2, ("accuracy", "f1")),
    "stsb": TaskSpec(("sentence1", "sentence2"), 1, ("pearson", "spearmanr")),
    "mnli": TaskSpec(("premise", "hypothesis"), 3, ("accuracy",), "validation_matched"),
    "qnli": TaskSpec(("question", "sentence"), 2, ("accuracy",)),
    "rte": TaskSpec(("sentence1", "sentence2"), 2, ("accuracy",)),
    "wnli": TaskSpec(("sentence1", "sentence2"), 2, ("accuracy",)),
}
# Column names recognised in local files, most specific first.
_TEXT_COLUMN_SETS = (
    ("sentence1", "sentence2"),
    ("question1", "question2"),
    ("premise", "hypothesis"),
    ("question", "sentence"),
    ("sentence",),
    ("text",),
)


@dataclass
class TaskData:
    """A tokenised task: splits, label count (1 = regression), metric names and label names."""

    name: str
    train: Dataset
    validation: Dataset
    num_labels: int
    metric: list[str]
    label_names: list[str] | None = None
    test: Dataset | None = None
    text_fields: tuple[str, ...] = field(default_factory=tuple)

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def compute_metrics(
    metric_names: list[str] | tuple[str, ...], predictions: Any, labels: Any
) -> dict[str, float]:
    """Score predictions with scikit-learn / scipy.

    ``predictions`` may be class ids [N], logits [N, C] (arg-maxed) or regression scores [N] /
    [N, 1]. Names: ``accuracy``, ``f1`` (binary for 0/1 labels, else macro), ``f1_macro``,
    ``matthews_correlation``, ``pearson``, ``spearmanr``.
    """
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    preds, gold = np.asarray(predictions), np.asarray(labels)
    regression = any(m in ("pearson", "spearmanr") for m in metric_names)
    if preds.ndim == 2:
        preds = preds[:, 0] if regression and preds.shape[1] == 1 else preds.argmax(axis=-1)
    if preds.shape != gold.shape:
        raise ValueError(f"predictions shape {preds.shape} does not match labels shape {gold.shape}")
    binary = set(np.unique(gold).tolist()) <= {0, 1}
    scorers = {
        "accuracy": lambda: accuracy_score(gold, preds),
        "f1": lambda: f1_score(gold, preds, average="binary" if binary else "macro"),
        "f1_macro": lambda: f1_score(gold, preds, average="macro"),
        "matthews_correlation": lambda: matthews_corrcoef(gold, preds),
        "pearson": lambda: pearsonr(preds, gold)[0],
        "spearmanr": lambda: spearmanr(preds, gold)[0],
    }
    unknown = [m for m in metric_names if m not in scorers]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {sorted(scorers)}")
    return {m: float(scorers[m]()) for m in metric_names}


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _read_table(path: Path) -> list[dict[str, str]]:
    """Rows of a ``.tsv`` (GLUE style: no quoting) or ``.csv`` file with a header line."""
    tsv = path.suffix == ".tsv"
    try:
        with path.open(encoding="utf-8", newline="") as fh:
            quoting = csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL
            rows = list(csv.DictReader(fh, delimiter="\t" if tsv else ",", quoting=quoting))
    except UnicodeDecodeError as err:
        raise TaskError(f"task file {str(path)!r} is not UTF-8 text (byte {err.start}: {err.reason})") from None
    if not rows:
        raise TaskError(f"task file {str(path)!r} has no rows")
    bad = next((i for i, r in enumerate(rows, 2) if None in r or None in r.values()), None)
    if bad is not None:
        raise TaskError(f"task file {str(path)!r} line {bad} has a different number of fields than "
                        "its header")
    return rows


def _find_split(folder: Path, names: tuple[str, ...]) -> Path | None:
    candidates = (folder / f"{name}{suffix}" for name in names for suffix in _TSV_SUFFIXES)
    return next((path for path in candidates if path.is_file()), None)


def _is_int(value: Any) -> bool:
    return str(value).strip().lstrip("-").isdigit()


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def _label_ids(
    train: list[Any], others: list[list[Any]], regression: bool, where: str
) -> tuple[list, list[list], list[str] | None]:
    """Map raw labels to ids: integers stay as is, other numbers mean regression (floats), and
    strings are numbered in sorted order (returned as label names)."""
    every = [*train, *(v for o in others for v in o)]
    empty = sum(1 for v in every if not str(v).strip())
    if empty:
        raise TaskError(f"{where}: {empty} row(s) have an empty label; fill or drop them")
    if regression or (not all(_is_int(v) for v in every) and all(_is_number(v) for v in every)):
        return [float(v) for v in train], [[float(v) for v in o] for o in others], None
    if all(_is_int(v) for v in every):
        ids, present = sorted({int(v) for v in every}), {int(v) for v in train}
        # the first 6 absent ids: at most len(present) + 6 steps, whatever the max
        missing: list[Any] = list(islice((i for i in range(max(ids[-1] + 1, 0)) if i not in present), 6))
        if ids[0] < 0 or missing:
            shown = missing[:5] + (["..."] if len(missing) > 5 else [])
            raise TaskError(f"{where}: integer labels must be the class ids 0..K-1, each in the training split; got "
                            f"{ids[:5]}{' ...' if len(ids) > 5 else ''} (max {ids[-1]}"
                            + (f", training split lacks {shown})" if missing and ids[0] >= 0 else ")")
                            + "; renumber them or give the labels as names")  # fmt: skip
        return [int(v) for v in train], [[int(v) for v in o] for o in others], None
    values = sorted({str(v) for v in train})
    index = {v: i for i, v in enumerate(values)}
    for o in others:
        unseen = {str(v) for v in o} - set(index)
        if unseen:
            raise TaskError(f"{where}: labels {sorted(unseen)} are not in the training labels {values}")
    return [index[str(v)] for v in train], [[index[str(v)] for v in o] for o in others], values


def _local_task(path: Path, seed: int) -> tuple[dict[str, dict[str, list]], TaskSpec, list[str] | None]:
    """Columns ``text fields + label`` per split of a local folder or single file."""
    glue = GLUE_TASKS.get(path.stem.lower().replace("-", "").replace("_", ""))
    if path.is_dir():
        dev_names = ("dev", "validation", "valid", "dev_matched", "validation_matched")
        files = {"train": _find_split(path, ("train",)), "validation": _find_split(path, dev_names),
                 "test": _find_split(path, ("test",))}
        if files["train"] is None or files["validation"] is None:
            raise TaskError(f"task folder {str(path)!r} needs train.tsv/.csv and dev.tsv/.csv "
                            "(or validation.*)")
        tables = {k: _read_table(f) for k, f in files.items() if f is not None}
    else:
        rows = _read_table(path)
        train_idx, val_idx = split_documents([repr(sorted(r.items())) for r in rows], 0.2, seed)
        tables = {"train": [rows[i] for i in train_idx], "validation": [rows[i] for i in val_idx]}
    columns = list(tables["train"][0])
    known = ((glue.text_fields,) if glue else ()) + _TEXT_COLUMN_SETS  # a GLUE folder's own columns first
    fields = next((fs for fs in known if all(f in columns for f in fs)), None)
    if fields is None:
        raise TaskError(f"{path} has no known text columns (sentence, sentence1/sentence2, text, ...): "
                        f"{columns}")
    if "label" not in columns:
        raise TaskError(f"task {str(path)!r} has no 'label' column: {columns}")
    if "test" in tables and "label" not in tables["test"][0]:
        tables.pop("test")  # unlabelled test sets are left out
    splits = list(tables)
    raw = [[r["label"] for r in tables[s]] for s in splits]
    regression = glue is not None and glue.num_labels == 1
    train_labels, other_labels, names = _label_ids(raw[0], raw[1:], regression, str(path))
    regression = isinstance(train_labels[0], float)
    out = {
        s: {**{f: [r[f] for r in tables[s]] for f in fields}, "label": lab}
        for s, lab in zip(splits, [train_labels, *other_labels])
    }
    if len(set(train_labels)) < 2:
        raise TaskError(f"task {str(path)!r}: the training split has one label value ({train_labels[0]!r}); "
                        "a task needs at least two classes (or varying regression targets)")  # fmt: skip
    if regression:
        n_labels, metrics = 1, ("pearson", "spearmanr")
    else:
        n_labels = len(names) if names else max(max(v) for v in [train_labels, *other_labels]) + 1
        metrics = ("accuracy",)
    if glue is not None:
        n_labels, metrics = max(n_labels, glue.num_labels), glue.metrics
    return out, TaskSpec(fields, n_labels, metrics), names


def _bbc_task(seed: int) -> tuple[dict[str, dict[str, list]], TaskSpec, list[str]]:
    docs = bbc_documents()
    topics = sorted({topic for _, topic in docs})
    texts = [text for text, _ in docs]
    train_idx, val_idx = split_documents(texts, 0.2, seed, groups=[bbc_group_key(t) for t in texts])
    splits = {
        name: {"text": [docs[i][0] for i in idx], "label": [topics.index(docs[i][1]) for i in idx]}
        for name, idx in (("train", train_idx), ("validation", val_idx))
    }
    return splits, TaskSpec(("text",), len(topics), ("accuracy", "f1_macro")), topics


def _glue_task(name: str) -> tuple[dict[str, dict[str, list]], TaskSpec, list[str] | None]:
    spec = GLUE_TASKS[name]
    hint = "use a local folder with train.tsv and dev.tsv instead (e.g. task=/path/to/sst2)"
    ds = load_hub_dataset(TaskError, f"GLUE task {name!r}", hint, "glue", name)
    splits = {ours: ds[theirs].select_columns([*spec.text_fields, "label"]).to_dict()
              for ours, theirs in (("train", "train"), ("validation", spec.validation_split))}  # fmt: skip
    names = getattr(ds["train"].features["label"], "names", None)
    return splits, spec, names


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------


def _truncate_pair(a: list[int], b: list[int], budget: int) -> tuple[list[int], list[int]]:
    """Longest-first truncation of two token lists to ``len(a) + len(b) <= budget``."""
    while len(a) + len(b) > budget:
        if len(a) >= len(b):
            a = a[:-1]
        else:
            b = b[:-1]
    return a, b


def _tokenise(columns: dict[str, list], fields: tuple[str, ...], tokenizer: Any, max_length: int) -> Dataset:
    """Tokenise text columns into input_ids / attention_mask / token_type_ids (+ labels).

    Encoder tokenizers add their own specials (``[CLS] a [SEP] b [SEP]``, segment ids 0/1).
    Causal tokenizers have no pair template: pairs become ``a <eos> b`` (longest-first
    truncation, so the second text is never cut away entirely) with all segment ids 0.
    """
    causal_pair = len(fields) == 2 and tokenizer.sep_token is None and tokenizer.eos_token_id is not None

    def encode(batch: dict[str, list]) -> dict[str, list]:
        if causal_pair:
            first, second = (tokenizer(batch[f], add_special_tokens=False, verbose=False)["input_ids"]
                             for f in fields)
            pairs = [_truncate_pair(a, b, max_length - 1) for a, b in zip(first, second)]
            input_ids = [a + [tokenizer.eos_token_id] + b for a, b in pairs]
            enc = {"input_ids": input_ids, "attention_mask": [[1] * len(x) for x in input_ids]}
        else:
            enc = tokenizer(*(batch[f] for f in fields), truncation=True, max_length=max_length,
                            verbose=False)
        token_types = enc.get("token_type_ids") or [[0] * len(ids) for ids in enc["input_ids"]]
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "token_type_ids": token_types, "labels": batch["label"]}

    ds = Dataset.from_dict(columns)
    return ds.map(encode, batched=True, remove_columns=ds.column_names, desc="tokenising")


def load_task(name: str, tokenizer: Any, max_length: int = 128, max_train: int | None = None,
              seed: int = 0) -> TaskData:
    """Load and tokenise a classification / regression task (see the module docstring).

    Args:
        name: ``"bbc"``, a local folder / .tsv / .csv path, or a GLUE name (``"sst2"``, ``"glue/rte"``).
        tokenizer: the teacher's (fast) tokenizer.
        max_length: truncation length in tokens, special tokens included.
        max_train: keep a seeded random subset of this many training rows.
        seed: seeds the bbc / single-file split and the ``max_train`` subsample.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 4:
        raise TaskError(f"max_length must be an integer >= 4, got {max_length!r}")
    path = Path(str(name)).expanduser()
    lowered = str(name).strip().lower()
    glue_prefix = lowered.startswith(("glue/", "glue:"))
    key = (lowered[5:] if glue_prefix else lowered).replace("-", "").replace("_", "")
    if lowered == "bbc":
        splits, spec, label_names = _bbc_task(seed)
    elif path.exists():
        if path.is_file() and path.suffix not in _TSV_SUFFIXES:
            raise TaskError(f"task file {str(name)!r} must be a .tsv or .csv file")
        splits, spec, label_names = _local_task(path.resolve(), seed)
    elif glue_prefix or key in GLUE_TASKS:
        if key not in GLUE_TASKS:
            raise TaskError(f"unknown GLUE task {name!r}; known: {', '.join(sorted(GLUE_TASKS))}")
        splits, spec, label_names = _glue_task(key)
    elif str(name).startswith(("/", ".", "~")) or os.sep in str(name):
        raise TaskError(f"task path {str(name)!r} does not exist")
    else:
        raise TaskError(
            f"task {name!r} is not 'bbc', a GLUE name ({', '.join(sorted(GLUE_TASKS))}) or an existing folder/.tsv/.csv"
        )

    if max_train is not None and max_train < len(splits["train"]["label"]):
        keep = np.sort(np.random.default_rng(seed).permutation(len(splits["train"]["label"]))[:max_train])
        splits["train"] = {k: [v[i] for i in keep] for k, v in splits["train"].items()}
    data = {s: _tokenise(cols, spec.text_fields, tokenizer, max_length) for s, cols in splits.items()}
    return TaskData(name=str(name), train=data["train"], validation=data["validation"], test=data.get("test"),
                    num_labels=spec.num_labels, metric=list(spec.metrics), label_names=label_names,
                    text_fields=spec.text_fields)
