"""Run logging: ``metrics.jsonl`` in the run dir (always) and wandb (``offline`` by default)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class RunLogger:
    """Appends one JSON line per record to ``metrics.jsonl`` and mirrors scalars to wandb.

    ``mode``: wandb's ``online`` | ``offline`` | ``disabled``; the ``WANDB_MODE`` environment
    variable, when set, wins (as wandb's own documentation promises users: ``WANDB_MODE=disabled``
    turns every stage's wandb off). Only rank 0 should create one.
    """

    def __init__(self, run_dir: str | Path, mode: str = "offline", project: str = "elm",
                 name: str | None = None, config: dict | None = None) -> None:  # fmt: skip
        env = os.environ.get("WANDB_MODE", "").strip().lower()
        env = {"dryrun": "offline", "run": "online"}.get(env, env)
        if env and env not in ("online", "offline", "disabled"):
            raise ValueError(f"WANDB_MODE={env!r} is unknown; valid: online, offline, disabled")
        mode = env or mode
        if mode not in ("online", "offline", "disabled"):
            raise ValueError(f"logger.mode={mode!r} is unknown; valid: online, offline, disabled")
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.run = None
        if mode != "disabled":
            import wandb

            self.run = wandb.init(mode=mode, project=project, name=name, dir=str(run_dir), config=config,
                                  reinit="finish_previous")  # fmt: skip

    @classmethod
    def for_run(cls, run_dir: str | Path, logger: Any, config: dict | None) -> RunLogger:
        """The logger a stage's ``logger:`` config group (``mode``, ``project``, ``name``) asks for."""
        return cls(run_dir, mode=logger.mode, project=logger.project, name=logger.get("name"), config=config)

    def log(self, record: dict[str, Any], step: int | None = None) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.run is not None:
            self.run.log(_scalars(record), step=step)

    def rewrite(self, records: list[dict[str, Any]]) -> None:
        """Replace ``metrics.jsonl`` with ``records`` (on resume: drop lines past the checkpoint)."""
        from .io import atomic_write_text

        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in records))

    def keep_until(self, step: int) -> None:
        """Keep only the records of steps <= ``step`` (on resume from a checkpoint at ``step``)."""
        self.rewrite([r for r in read_metrics(self.path.parent) if r.get("step", 0) <= step])

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def _scalars(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = value
        elif isinstance(value, dict):
            out.update(_scalars(value, f"{prefix}{key}/"))
    return out


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    )
