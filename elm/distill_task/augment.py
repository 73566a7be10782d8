"""Data augmentation for small tasks: masked-word replacement proposed by a masked LM (TinyBERT's
augmentation, method as in Jiao et al. 2020, without the GloVe path).

For every training example, ``n`` variants: each whole word (one WordPiece token that is
alphabetic and not followed by a ``##`` piece) is chosen with probability ``prob``; the chosen
words are masked together, the masked LM scores every masked position and each is replaced by a
word drawn uniformly from its ``top_k`` whole-word candidates (the original word excluded).
[project decision] Replacements are single tokens, so a variant keeps the example's length and
segment ids (sentence pairs stay aligned) and no text round trip is needed; words split into
several pieces are kept (TinyBERT replaces those from GloVe neighbours, which we do not ship).
All positions of a variant are masked at once (one forward per variant, not one per word): at
``prob`` 0.4 the LM still sees most of the sentence. An example with no word gets no variant.

Which masked LM proposes (``augment.mlm``): ``auto`` = the teacher's own MLM head when its
checkpoint has one, else the student's (an elm export is a masked LM distilled from the teacher's
fitted head); or any masked-LM dir. Variants carry no gold label: they are learnt from the
teacher's soft labels only.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from ..utils.hub import quiet_transformers

log = logging.getLogger("elm.distill_task")


def word_vocabulary(tokenizer: Any) -> torch.Tensor:
    """``[V]`` bool: the tokens that are whole alphabetic words (candidates and replaceable words)."""
    vocab = tokenizer.get_vocab()
    if tokenizer.mask_token_id is None or not any(t.startswith("##") for t in vocab):
        raise ValueError(
            f"augment.enabled=true needs a WordPiece tokenizer with a mask token; {tokenizer.name_or_path!r} is "
            "not one (set augment.enabled=false)"
        )
    special = set(tokenizer.all_special_ids)
    words = torch.zeros(max(vocab.values()) + 1, dtype=torch.bool)
    words[[i for token, i in vocab.items() if token.isalpha() and i not in special]] = True
    return words


def word_positions(ids: list[int], words: torch.Tensor, continuation: torch.Tensor) -> list[int]:
    """Positions of replaceable whole words in one token list."""
    return [i for i, (t, nxt) in enumerate(zip(ids, [*ids[1:], None])) if t < len(words) and words[t]
            and not (nxt is not None and nxt < len(continuation) and continuation[nxt])]


def continuation_vocabulary(tokenizer: Any) -> torch.Tensor:
    """``[V]`` bool: ``##`` pieces (a word followed by one is part of a longer word)."""
    vocab = tokenizer.get_vocab()
    cont = torch.zeros(max(vocab.values()) + 1, dtype=torch.bool)
    cont[[i for token, i in vocab.items() if token.startswith("##")]] = True
    return cont


@torch.no_grad()
def augment(rows: list[dict[str, list[int]]], mlm: Any, tokenizer: Any, *, n: int, prob: float, top_k: int,
            seed: int, batch_size: int = 64, device: Any = "cpu") -> list[tuple[int, dict[str, list[int]]]]:  # fmt: skip
    """``n`` variants of each row (``input_ids``, ``attention_mask``, ``token_type_ids``) as
    ``(index of the source row, variant)`` pairs, drawn with ``seed`` (same seed, same variants)."""
    if n < 0 or not 0 < prob <= 1 or top_k < 1:
        raise ValueError(f"augment needs n >= 0, 0 < prob <= 1 and top_k >= 1, got n={n}, prob={prob}, top_k={top_k}")
    words, cont = word_vocabulary(tokenizer), continuation_vocabulary(tokenizer)
    vocab_size = int(mlm.config.vocab_size)
    allowed = torch.zeros(vocab_size, dtype=torch.bool)
    allowed[: min(vocab_size, len(words))] = words[:vocab_size]
    rng = np.random.default_rng(seed)
    jobs: list[tuple[int, list[int], dict[str, list[int]]]] = []  # (source, masked positions, row)
    for index, row in enumerate(rows):
        spots = word_positions(list(row["input_ids"]), words, cont)
        for _ in range(n if spots else 0):
            chosen = [p for p in spots if rng.random() < prob] or [spots[int(rng.integers(len(spots)))]]
            jobs.append((index, chosen, row))
    draws = rng.integers(top_k, size=sum(len(c) for _, c, _ in jobs)).tolist()  # uniform over the top k
    mlm.eval().to(device)
    out: list[tuple[int, dict[str, list[int]]]] = []
    order = sorted(range(len(jobs)), key=lambda j: len(jobs[j][2]["input_ids"]))  # similar lengths per batch
    starts = np.cumsum([0] + [len(c) for _, c, _ in jobs])
    for b in range(0, len(order), batch_size):
        chunk = order[b : b + batch_size]
        length = max(len(jobs[j][2]["input_ids"]) for j in chunk)
        ids = torch.full((len(chunk), length), tokenizer.pad_token_id or 0, dtype=torch.long)
        mask, types = torch.zeros_like(ids), torch.zeros_like(ids)
        for r, j in enumerate(chunk):
            _, chosen, row = jobs[j]
            k = len(row["input_ids"])
            ids[r, :k] = torch.tensor(row["input_ids"])
            mask[r, :k] = 1
            types[r, :k] = torch.tensor(row.get("token_type_ids") or [0] * k)
            ids[r, chosen] = tokenizer.mask_token_id
        kwargs = {"token_type_ids": types.to(device)} if "token_type_ids" in rows[0] else {}
        logits = mlm(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs).logits.float().cpu()
        for r, j in enumerate(chunk):
            source, chosen, row = jobs[j]
            new = list(row["input_ids"])
            for q, p in enumerate(chosen):
                scores = logits[r, p].masked_fill(~allowed, float("-inf"))
                scores[row["input_ids"][p]] = float("-inf")  # a replacement, not the word itself
                top = scores.topk(top_k).indices
                new[p] = int(top[draws[starts[j] + q] % len(top)])
            out.append((source, {**{k: list(v) for k, v in row.items() if isinstance(v, list)}, "input_ids": new}))
    out.sort(key=lambda item: item[0])
    return out


def load_proposer(spec: str, teacher_source: str, student: str) -> tuple[Any, str]:
    """The masked LM that proposes replacements and where it came from (see the module docstring)."""
    from transformers import AutoModelForMaskedLM

    def masked_lm(path: str) -> Any:  # None: the checkpoint lacks the head weights
        try:
            with quiet_transformers():
                model, info = AutoModelForMaskedLM.from_pretrained(path, output_loading_info=True)
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"augment.mlm: cannot load a masked LM from {path!r}: {err}".splitlines()[0]) from None
        missing = [k for k in info.get("missing_keys", []) if "embeddings" not in k]
        return None if missing else model

    if spec != "auto":
        model = masked_lm(str(spec))
        if model is None:
            raise ValueError(f"augment.mlm={spec!r} has no masked-LM head (its checkpoint lacks the head weights)")
        return model, str(spec)
    for path, what in ((teacher_source, "teacher"), (student, "student")):
        model = masked_lm(path)
        if model is not None:
            return model, f"{what} ({path})"
    raise ValueError(f"augment.mlm=auto: neither the teacher {teacher_source!r} nor the student {student!r} has a "
                     "masked-LM head; give augment.mlm=<masked-LM dir>")  # fmt: skip
