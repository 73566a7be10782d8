"""Data: pre-training corpora, batch collators and classification tasks."""

from elm.data.collate import CLMCollator, MLMCollator, PadCollator, make_loader
from elm.data.corpus import (
    CorpusError,
    bbc_documents,
    bbc_group_key,
    is_encoder_tokenizer,
    load_corpus,
    read_documents,
    split_documents,
)
from elm.data.tasks import GLUE_TASKS, TaskData, TaskError, compute_metrics, load_task

__all__ = [
    "CLMCollator",
    "CorpusError",
    "GLUE_TASKS",
    "MLMCollator",
    "PadCollator",
    "TaskData",
    "TaskError",
    "bbc_documents",
    "bbc_group_key",
    "compute_metrics",
    "is_encoder_tokenizer",
    "load_corpus",
    "load_task",
    "make_loader",
    "read_documents",
    "split_documents",
]
