"""The settings that shape a run, stored in its state file and compared on ``resume=true``: a
resumed run with another seed, corpus, batch size or schedule would silently finish as a mix of
two runs. Settings that do not change the result are left out (device, precision, progress,
logging, checkpoint frequency, torchrun ranks and ``grad_accum``, which split the same global
batch), as are the ones read only after training (budgets, strategy, plots)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from omegaconf import DictConfig, OmegaConf

SHAPING = {
    "search": ("seed", "teacher.name", "data", "space", "distill", "inherit", "pca", "cka", "search.epochs",
               "search.steps_per_epoch", "search.batch_size", "search.lr", "search.weight_decay",
               "search.warmup_steps", "search.grad_clip", "search.eval_batches", "search.analysis_batch_size",
               "search.chain_prob", "search.train_embeddings"),
    "retrain": ("seed", "teacher.name", "data", "distill", "teacher_head.fit", "teacher_head.steps",
                "teacher_head.lr", "teacher_head.batch_size", "retrain.epochs", "retrain.steps_per_epoch",
                "retrain.batch_size", "retrain.lr", "retrain.weight_decay", "retrain.schedule",
                "retrain.warmup_steps", "retrain.grad_clip", "retrain.dropout", "retrain.mlm_probability",
                "retrain.eval_batches", "retrain.layer_map", "search_dir", "init_from"),
}  # fmt: skip


def fingerprint(cfg: DictConfig, stage: str) -> dict[str, Any]:
    """``{dotted key: plain value}`` of the settings that shape a ``stage`` run (sections flattened)."""
    out: dict[str, Any] = {}

    def add(key: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                add(f"{key}.{k}", v)
        else:
            out[key] = value

    for key in SHAPING[stage]:
        node = OmegaConf.select(cfg, key, default=None)
        add(key, OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node)
    return out


def check_fingerprint(saved: dict[str, Any] | None, now: dict[str, Any], what: str) -> None:
    """Refuse to resume ``what`` (a state file) with settings other than the saved ones, naming
    the keys (saved → now). States written before fingerprints existed (None) are not checked."""
    if saved is None:
        return
    changed = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if changed:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed[:4])
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        raise ValueError(f"resume=true but {what} was written with other settings ({shown}{more}); resume with the "
                         "same settings or choose another hydra.run.dir")  # fmt: skip


def digest(value: Any) -> str:
    """A stable hex digest of plain settings (dicts, lists, numbers, strings): cache keys."""
    return hashlib.sha1(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
