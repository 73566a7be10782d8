"""Corpora, collators and classification tasks on real data (offline)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from elm.data import (
    CLMCollator,
    CorpusError,
    MLMCollator,
    PadCollator,
    TaskError,
    bbc_documents,
    compute_metrics,
    load_corpus,
    load_task,
    make_loader,
    read_documents,
    split_documents,
)
from elm.data.corpus import bbc_group_key, split_text_documents
from elm.teacher import load_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def bert_tok() -> Any:
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def gpt2_tok(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ELM_CACHE", str(tmp_path_factory.mktemp("elm-cache")))
        return load_tokenizer("gpt2-bpe")


@pytest.fixture()
def cache(tmp_path: Path) -> str:
    return str(tmp_path / "corpus-cache")


# 40 words that are single tokens for both the BERT and the GPT-2 tokenizer (after a space).
TAGS = (
    "apple river stone cloud music paper glass horse table green light sugar metal ocean tree bird fish "
    "rock wind rain snow fire gold iron house chair bread water phone money school train night plant "
    "world king queen lion tiger milk"
).split()


def _tagged_corpus(path: Path, n_docs: int = 40, words: int = 60) -> Path:
    """A jsonl corpus whose document i repeats one word of its own, ``TAGS[i]``."""
    path.write_text("".join(json.dumps({"text": " ".join([t] * words)}) + "\n" for t in TAGS[:n_docs]))
    return path


# ---------------------------------------------------------------------------------------------
# Corpora
# ---------------------------------------------------------------------------------------------


def test_bbc_documents() -> None:
    docs = bbc_documents()
    assert len(docs) == 2225
    assert sorted({topic for _, topic in docs}) == ["business", "entertainment", "politics", "sports", "tech"]
    assert all(text.strip() for text, _ in docs)


def test_split_documents_is_deterministic_and_disjoint() -> None:
    texts = [text for text, _ in bbc_documents()]
    train, val = split_documents(texts, 0.05, seed=0)
    assert sorted(train + val) == list(range(len(texts)))
    assert not {texts[i] for i in train} & {texts[i] for i in val}  # exact duplicates stay together
    assert 0.04 < len(val) / len(texts) < 0.07
    assert split_documents(texts, 0.05, seed=0) == (train, val)
    assert split_documents(texts, 0.05, seed=1)[1] != val
    # BBC articles are grouped by title: re-edited near duplicates stay together too.
    titles = [bbc_group_key(t) for t in texts]
    train, val = split_documents(texts, 0.2, seed=0, groups=titles)
    assert not {titles[i] for i in train} & {titles[i] for i in val}


def test_bbc_corpus_blocks(bert_tok: Any, cache: str) -> None:
    ds = load_corpus("bbc", bert_tok, seq_len=64, max_docs=300, cache_dir=cache)
    assert set(ds) == {"train", "validation"}
    assert len(ds["train"]) > 10 * len(ds["validation"]) > 0
    for split in ds.values():
        ids = np.array(split["input_ids"])
        assert ids.shape[1] == 64
        assert (ids[:, 0] == bert_tok.cls_token_id).all() and (ids[:, -1] == bert_tok.sep_token_id).all()
        assert (np.array(split["attention_mask"]) == 1).all()
    # Cached: the second call loads the saved result; a fresh cache rebuilds the same blocks.
    again = load_corpus("bbc", bert_tok, seq_len=64, max_docs=300, cache_dir=cache)
    assert again["validation"]["input_ids"] == ds["validation"]["input_ids"]
    fresh = load_corpus("bbc", bert_tok, seq_len=64, max_docs=300, cache_dir=cache + "-2")
    assert fresh["train"]["input_ids"] == ds["train"]["input_ids"]
    other_seed = load_corpus("bbc", bert_tok, seq_len=64, max_docs=300, seed=1, cache_dir=cache)
    assert other_seed["validation"]["input_ids"] != ds["validation"]["input_ids"]


def test_no_document_shared_across_splits(bert_tok: Any, tmp_path: Path, cache: str) -> None:
    source = _tagged_corpus(tmp_path / "tagged.jsonl")
    ds = load_corpus(str(source), bert_tok, seq_len=32, val_fraction=0.2, cache_dir=cache)
    special = set(bert_tok.all_special_ids)
    tokens = {name: {t for row in split["input_ids"] for t in row} - special for name, split in ds.items()}
    assert tokens["train"] and tokens["validation"]
    assert not tokens["train"] & tokens["validation"]  # no word (= document) in both splits


def test_local_txt_corpus(bert_tok: Any, tmp_path: Path, cache: str) -> None:
    text = "\n\n".join(f"Document number {i}. " + "Some words about the topic. " * 20 for i in range(20))
    (tmp_path / "a.txt").write_text(text)
    assert len(read_documents(str(tmp_path / "a.txt"))) == 20
    ds = load_corpus(str(tmp_path / "a.txt"), bert_tok, seq_len=32, val_fraction=0.1, cache_dir=cache)
    assert len(ds["train"]) > 0 and len(ds["validation"]) > 0
    # A folder of .txt and .jsonl files is read recursively.
    (tmp_path / "sub").mkdir()
    _tagged_corpus(tmp_path / "sub" / "b.jsonl", n_docs=5)
    assert len(read_documents(str(tmp_path))) == 25


def test_wikitext_style_documents() -> None:
    text = " = First = \n \n Intro text . \n \n = = Section = = \n \n More . \n = Second = \n \n Body . \n"
    docs = split_text_documents(text)
    assert len(docs) == 2
    assert (
        docs[0].startswith("= First =") and "= = Section = =" in docs[0] and docs[1].startswith("= Second =")
    )
    wiki = SHARED_DATA / "wikitext-2" / "valid.txt"
    if wiki.is_file():
        articles = read_documents(str(wiki))
        assert 50 < len(articles) < 70 and all(a.startswith("= ") for a in articles)


def test_causal_corpus_uses_eos_separators(gpt2_tok: Any, tmp_path: Path, cache: str) -> None:
    source = _tagged_corpus(tmp_path / "tagged.jsonl", n_docs=30, words=20)
    ds = load_corpus(str(source), gpt2_tok, seq_len=48, val_fraction=0.2, cache_dir=cache)
    ids = np.array(ds["train"]["input_ids"])
    assert ids.shape[1] == 48
    assert (ids == gpt2_tok.eos_token_id).sum() >= len(ids) // 2  # documents are ~21 tokens long


def test_corpus_errors(bert_tok: Any, tmp_path: Path, cache: str, monkeypatch: pytest.MonkeyPatch) -> None:
    short = tmp_path / "short.txt"
    short.write_text("One tiny document.\n\nAnother tiny one.\n\nA third.\n")
    with pytest.raises(CorpusError, match=r"too short: the \w+ split .* seq_len=128"):
        load_corpus(str(short), bert_tok, seq_len=128, val_fraction=0.3, cache_dir=cache)
    with pytest.raises(CorpusError, match="missing.txt"):
        load_corpus(str(tmp_path / "missing.txt"), bert_tok, cache_dir=cache)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no .txt or .jsonl files"):
        load_corpus(str(tmp_path / "empty"), bert_tok, cache_dir=cache)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "no text field"}\n')
    with pytest.raises(CorpusError, match=r"bad.jsonl:1 has no string field 'text'"):
        load_corpus(str(bad), bert_tok, cache_dir=cache)
    with pytest.raises(CorpusError, match="val_fraction"):
        load_corpus("bbc", bert_tok, val_fraction=0.0, cache_dir=cache)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(CorpusError, match=r"'hf:wikitext/wikitext-103-raw-v1' .*offline.*local"):
        load_corpus("hf:wikitext/wikitext-103-raw-v1", bert_tok, cache_dir=cache)


# ---------------------------------------------------------------------------------------------
# Collators
# ---------------------------------------------------------------------------------------------


def test_mlm_collator(bert_tok: Any, cache: str) -> None:
    ds = load_corpus("bbc", bert_tok, seq_len=128, max_docs=300, cache_dir=cache)
    rows = [ds["train"][i] for i in range(64)]
    batch = MLMCollator(bert_tok, seed=0)(rows)
    original = torch.tensor([r["input_ids"] for r in rows])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(v.dtype == torch.long and v.shape == original.shape for v in batch.values())

    masked = batch["labels"] != -100
    special = torch.isin(original, torch.tensor(bert_tok.all_special_ids))
    assert not (masked & special).any()
    assert 0.13 < masked[~special].float().mean().item() < 0.17
    assert torch.equal(batch["labels"][masked], original[masked])
    assert torch.equal(batch["input_ids"][~masked], original[~masked])
    as_mask = (batch["input_ids"][masked] == bert_tok.mask_token_id).float().mean().item()
    assert 0.7 < as_mask < 0.9  # 80% of the chosen tokens become [MASK]

    again = MLMCollator(bert_tok, seed=0)(rows)  # same seed -> same masks
    assert torch.equal(again["input_ids"], batch["input_ids"]) and torch.equal(
        again["labels"], batch["labels"]
    )
    assert not torch.equal(MLMCollator(bert_tok, seed=1)(rows)["labels"], batch["labels"])


def test_mlm_collator_pads_variable_rows(bert_tok: Any) -> None:
    rows = [{"input_ids": bert_tok("a short one")["input_ids"]}, {"input_ids": bert_tok("hi")["input_ids"]}]
    batch = MLMCollator(bert_tok, seed=0)(rows)
    assert batch["attention_mask"].tolist()[1] == [1, 1, 1, 0, 0]
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


def test_clm_and_pad_collators(gpt2_tok: Any, bert_tok: Any) -> None:
    batch = CLMCollator(gpt2_tok)([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, gpt2_tok.pad_token_id]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[1, 2, 3], [4, 5, -100]]

    rows = [
        {"input_ids": [101, 7, 102], "attention_mask": [1, 1, 1], "token_type_ids": [0, 0, 0], "labels": 2},
        {"input_ids": [101, 102], "attention_mask": [1, 1], "token_type_ids": [0, 0], "labels": 0},
    ]
    batch = PadCollator(bert_tok)(rows)
    assert batch["input_ids"].tolist() == [[101, 7, 102], [101, 102, bert_tok.pad_token_id]]
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [2, 0]
    rows[0]["labels"], rows[1]["labels"] = 0.5, 3.0
    assert PadCollator(bert_tok)(rows)["labels"].dtype == torch.float


def test_make_loader_is_seeded(bert_tok: Any, cache: str) -> None:
    ds = load_corpus("bbc", bert_tok, seq_len=64, max_docs=300, cache_dir=cache)["validation"]

    def first_batch(seed: int) -> torch.Tensor:
        loader = make_loader(ds, CLMCollator(bert_tok), batch_size=4, shuffle=True, seed=seed, drop_last=True)
        return next(iter(loader))["input_ids"]

    assert torch.equal(first_batch(0), first_batch(0))
    assert not torch.equal(first_batch(0), first_batch(1))
    loader = make_loader(ds, CLMCollator(bert_tok), batch_size=4, drop_last=True)
    assert len(loader) == len(ds) // 4


# ---------------------------------------------------------------------------------------------
# Tasks and metrics
# ---------------------------------------------------------------------------------------------


def test_bbc_task(bert_tok: Any) -> None:
    task = load_task("bbc", bert_tok, max_length=64)
    assert task.num_labels == 5 and task.label_names[0] == "business"
    assert set(task.train.column_names) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert 0.18 < len(task.validation) / (len(task.train) + len(task.validation)) < 0.22
    assert max(len(x) for x in task.train["input_ids"]) == 64
    train = {tuple(x) for x in task.train["input_ids"]}
    assert not train & {tuple(x) for x in task.validation["input_ids"]}
    assert set(task.validation["labels"]) == set(range(5))
    small = load_task("bbc", bert_tok, max_length=64, max_train=100)
    assert len(small.train) == 100 and small.validation["input_ids"] == task.validation["input_ids"]
    assert train >= {tuple(x) for x in small.train["input_ids"]}


def test_sst2_local(bert_tok: Any) -> None:
    folder = SHARED_DATA / "sst2"
    if not folder.is_dir():
        pytest.skip(f"{folder} not present")
    task = load_task(str(folder), bert_tok, max_train=500)
    assert task.num_labels == 2 and task.metric == ["accuracy"]
    assert len(task.train) == 500 and len(task.validation) == 872
    assert set(task.validation["labels"]) == {0, 1}
    assert task.train[0]["input_ids"][0] == bert_tok.cls_token_id


def test_rte_local(bert_tok: Any, gpt2_tok: Any) -> None:
    folder = SHARED_DATA / "rte"
    if not folder.is_dir():
        pytest.skip(f"{folder} not present")
    task = load_task(str(folder), bert_tok)
    assert task.label_names == ["entailment", "not_entailment"]
    assert (len(task.train), len(task.validation), len(task.test)) == (1244, 139, 1384)
    row = task.train[0]
    assert row["input_ids"].count(bert_tok.sep_token_id) == 2 and 1 in row["token_type_ids"]
    causal = load_task(str(folder), gpt2_tok, max_train=50)
    for ids in causal.train["input_ids"]:  # pairs are joined by eos and fit in max_length
        assert gpt2_tok.eos_token_id in ids[:-1] and len(ids) <= 128
    assert set(causal.train[0]["token_type_ids"]) == {0}


def test_local_csv_task(bert_tok: Any, tmp_path: Path) -> None:
    lines = ["text,label"] + [f"sample number {i},{'pos' if i % 3 else 'neg'}" for i in range(50)]
    (tmp_path / "reviews.csv").write_text("\n".join(lines) + "\n")
    task = load_task(str(tmp_path / "reviews.csv"), bert_tok)
    assert task.label_names == ["neg", "pos"] and task.num_labels == 2
    assert len(task.train) + len(task.validation) == 50 and len(task.validation) == 10


def test_task_errors(bert_tok: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(TaskError, match=r"'sst2' .*offline.*local folder with train.tsv"):
        load_task("sst2", bert_tok)
    with pytest.raises(TaskError, match="unknown GLUE task 'glue/nope'"):
        load_task("glue/nope", bert_tok)
    with pytest.raises(TaskError, match="does not exist"):
        load_task(str(tmp_path / "missing"), bert_tok)
    (tmp_path / "train.tsv").write_text("sentence\tlabel\nfine\t1\n")
    with pytest.raises(TaskError, match="dev.tsv"):
        load_task(str(tmp_path), bert_tok)


def test_compute_metrics_matches_sklearn_scipy() -> None:
    labels = np.array([0, 1, 1, 0, 1, 1, 0, 0, 1, 1])
    preds = np.array([0, 1, 0, 0, 1, 1, 1, 0, 1, 0])
    got = compute_metrics(["accuracy", "f1", "matthews_correlation"], preds, labels)
    assert got == pytest.approx(
        {
            "accuracy": accuracy_score(labels, preds),
            "f1": f1_score(labels, preds),
            "matthews_correlation": matthews_corrcoef(labels, preds),
        }
    )
    logits = np.eye(2)[preds] * 3.0 - 1.0  # argmax of [N, 2] logits == preds
    assert compute_metrics(["accuracy"], logits, labels)["accuracy"] == accuracy_score(labels, preds)

    gold = np.array([0.1, 2.5, 3.0, 4.2, 1.0, 5.0])
    scores = np.array([[0.3], [2.0], [3.5], [4.0], [1.5], [4.4]])
    got = compute_metrics(["pearson", "spearmanr"], scores, gold)
    assert got["pearson"] == pytest.approx(pearsonr(scores[:, 0], gold)[0])
    assert got["spearmanr"] == pytest.approx(spearmanr(scores[:, 0], gold)[0])

    multi = np.array([0, 1, 2, 2, 1, 0])
    multi_pred = np.array([0, 2, 2, 2, 1, 1])
    assert compute_metrics(["f1_macro"], multi_pred, multi)["f1_macro"] == pytest.approx(
        f1_score(multi, multi_pred, average="macro")
    )
    with pytest.raises(ValueError, match="unknown metric"):
        compute_metrics(["bleu"], preds, labels)
