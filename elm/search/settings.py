"""Every search setting checked before the teacher and the data load (one line naming the key,
the value and what is valid), so that no bad value fails after minutes of training or, worse,
after the whole search (plots) with no ``DONE`` written."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from ..utils.settings import check_choice, check_flag
from ..utils.settings import check_number as _number
from .choose import STRATEGIES

EVAL_WHEN = ("final", "every_epoch")  # search.eval_when (SearchSettings)


def check_search_settings(cfg: DictConfig, num_layers: int) -> None:
    """The ``search``, ``inherit``, ``data`` and ``plots`` settings of ``configs/search.yaml``."""
    s = cfg.search
    check_choice("search.strategy", s.strategy, STRATEGIES)
    _number("search.epochs", s.epochs, 1)
    _number("search.steps_per_epoch", s.steps_per_epoch, 1, none=True)
    _number("search.batch_size", s.batch_size, 1)
    _number("search.grad_accum", s.get("grad_accum", 1), 1)
    _number("search.eval_batches", s.eval_batches, 1)
    check_choice("search.eval_when", s.get("eval_when", "final"), EVAL_WHEN)
    _number("search.analysis_batch_size", s.analysis_batch_size, 2)
    _number("search.checkpoint_every", s.get("checkpoint_every"), 1, none=True)
    _number("search.warmup_steps", s.warmup_steps, 0)
    _number("search.lr", s.lr, 0, integer=False, strict=True)
    _number("search.weight_decay", s.weight_decay, 0, integer=False)
    _number("search.grad_clip", s.grad_clip, 0, integer=False, strict=True)
    _number("search.chain_prob", s.chain_prob, 0, integer=False, high=1)
    check_flag("search.common_dropout", s.get("common_dropout", True))
    _number("inherit.batches", cfg.inherit.batches, 1)
    _number("data.seq_len", cfg.data.seq_len, 2)
    _number("data.val_fraction", cfg.data.val_fraction, 0, integer=False, strict=True, high=0.5)
    _number("seed", cfg.seed, 0)
    plots = cfg.plots
    _number("plots.cka_layer", plots.get("cka_layer"), 0, none=True, high=num_layers - 1)
    for other in plots.compare_with or []:
        if not (Path(str(other)) / "metrics.jsonl").is_file():
            raise ValueError(f"plots.compare_with entry {str(other)!r} is not a search run dir (no metrics.jsonl)")
