"""Batch collators (rows -> dicts of LongTensors) and a seeded DataLoader factory.

* :class:`MLMCollator`: BERT masking through ``transformers.DataCollatorForLanguageModeling``
  (15% of non-special tokens chosen; of those 80% -> [MASK], 10% -> random, 10% kept);
  ``labels`` hold the original ids at chosen positions and -100 elsewhere.
* :class:`CLMCollator`: ``labels = input_ids`` with -100 on padding (the model shifts them).
* :class:`PadCollator`: classification rows (``input_ids``, ``attention_mask``,
  ``token_type_ids``, ``labels``) padded to the longest row; float labels stay float.

Reproducibility: with ``seed=`` a collator draws its masks from its own ``torch.Generator``
(seeded once at construction), so the same sequence of batches gets the same masks in every
run, independent of the global RNG. :func:`make_loader` seeds shuffling with another generator
and uses ``num_workers=0`` (worker processes would copy, and so repeat, the collator's generator).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

Row = Mapping[str, Any]


def _pad(rows: Sequence[Row], key: str, value: int, multiple: int | None = None) -> torch.Tensor:
    """Right-pad ``rows[i][key]`` (lists or tensors of ints) to a [B, T] LongTensor."""
    seqs = [torch.as_tensor(r[key], dtype=torch.long) for r in rows]
    length = max(len(s) for s in seqs)
    if multiple:
        length = -(-length // multiple) * multiple
    out = torch.full((len(seqs), length), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out


def _pad_batch(rows: Sequence[Row], pad_id: int, multiple: int | None = None) -> dict[str, torch.Tensor]:
    """Pad ``input_ids`` (with ``pad_id``), ``attention_mask`` (derived if absent) and ``token_type_ids``."""
    if not rows:
        raise ValueError("cannot collate an empty batch")
    batch = {"input_ids": _pad(rows, "input_ids", pad_id, multiple)}
    if "attention_mask" in rows[0]:
        batch["attention_mask"] = _pad(rows, "attention_mask", 0, multiple)
    else:
        lengths = torch.tensor([len(r["input_ids"]) for r in rows])
        batch["attention_mask"] = (torch.arange(batch["input_ids"].shape[1]) < lengths[:, None]).long()
    if "token_type_ids" in rows[0]:
        batch["token_type_ids"] = _pad(rows, "token_type_ids", 0, multiple)
    return batch


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has neither a pad nor an eos token")
    return int(pad)


class MLMCollator:
    """Masked-LM batches: ``input_ids`` (masked), ``attention_mask``, ``labels`` (-100 = not masked).

    Special tokens (CLS, SEP, PAD, ...) and padding are never chosen. The 80/10/10 replacement
    is Hugging Face's ``DataCollatorForLanguageModeling.torch_mask_tokens``; this class only pads
    fast, marks special tokens with a tensor lookup and owns the random generator.
    """

    def __init__(
        self,
        tokenizer: Any,
        mlm_probability: float = 0.15,
        seed: int | None = None,
        pad_to_multiple_of: int | None = None,
    ) -> None:
        from transformers import DataCollatorForLanguageModeling

        if tokenizer.mask_token_id is None:
            raise ValueError(
                f"tokenizer {tokenizer.name_or_path!r} has no mask token; use CLMCollator for causal models"
            )
        if not 0.0 < mlm_probability < 1.0:
            raise ValueError(f"mlm_probability must be in (0, 1), got {mlm_probability!r}")
        self.tokenizer = tokenizer
        self.mlm_probability = mlm_probability
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_id = _pad_id(tokenizer)
        specials = sorted(set(tokenizer.all_special_ids) | {self.pad_id})
        self.special_ids = torch.tensor(specials, dtype=torch.long)
        self._hf = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=mlm_probability)
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def __call__(self, rows: Sequence[Row]) -> dict[str, torch.Tensor]:
        batch = _pad_batch(rows, self.pad_id, self.pad_to_multiple_of)
        ids = batch["input_ids"]
        special = torch.isin(ids, self.special_ids) | (batch["attention_mask"] == 0)
        self._hf.generator = self.generator  # None -> the global torch RNG
        masked = self._hf.torch_mask_tokens(ids.clone(), special_tokens_mask=special)
        batch["input_ids"], batch["labels"] = masked
        return batch


class PadCollator:
    """Classification batches: padded inputs plus ``labels`` (long, or float for regression)."""

    def __init__(self, tokenizer: Any, pad_to_multiple_of: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.pad_id = _pad_id(tokenizer)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: Sequence[Row]) -> dict[str, torch.Tensor]:
        batch = _pad_batch(rows, self.pad_id, self.pad_to_multiple_of)
        if "labels" in rows[0]:
            labels = [r["labels"] for r in rows]
            dtype = torch.float if any(isinstance(v, float) for v in labels) else torch.long
            batch["labels"] = torch.tensor(labels, dtype=dtype)
        return batch


class CLMCollator(PadCollator):
    """Causal-LM batches: ``input_ids``, ``attention_mask``, ``labels`` (= ids, -100 on padding).

    Labels are not shifted: Hugging Face causal models (and elm's) shift inside the loss.
    """

    def __call__(self, rows: Sequence[Row]) -> dict[str, torch.Tensor]:
        batch = _pad_batch(rows, self.pad_id, self.pad_to_multiple_of)
        batch.pop("token_type_ids", None)
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return batch


def make_loader(
    dataset: Any,
    collator: Any,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    sampler: Sampler | None = None,
) -> DataLoader:
    """A single-process ``DataLoader`` whose shuffling is seeded by ``seed``.

    ``sampler`` (e.g. a ``DistributedSampler``) replaces ``shuffle``. ``datasets.Dataset``
    inputs are read in the torch-free python format; collators build the tensors.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    if len(dataset) == 0:
        raise ValueError("cannot make a loader over an empty dataset")
    generator = torch.Generator().manual_seed(seed) if shuffle and sampler is None else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle if sampler is None else False,
                      sampler=sampler, collate_fn=collator, drop_last=drop_last, generator=generator,
                      num_workers=0)


def sample_batches(dataset: Any, seed: int, count: int, batch_size: int, device: Any = "cpu") -> list[dict[str, torch.Tensor]]:
    """``count`` batches of ``batch_size`` packed rows (``input_ids``, ``attention_mask``) drawn
    without replacement in a ``seed``-ed order: the few batches statistics are taken on (teacher
    importance, the shared basis), the same ones for the same seed."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=g)[: max(1, count) * batch_size].tolist()
    batches = (dataset[order[i : i + batch_size]] for i in range(0, len(order), batch_size))
    keys = ("input_ids", "attention_mask")
    return [{k: torch.as_tensor(rows[k], device=device) for k in keys} for rows in batches]
