"""Shared bits of the command-line entry points: where the configs are, one-line errors."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


# the stages with a data-parallel implementation; the others refuse torchrun before any work
DISTRIBUTED_STAGES = ("search", "retrain", "finetune")


@contextlib.contextmanager
def fail_cleanly(stage: str):
    """Turn expected user errors (bad values, missing files) into one line on stderr and exit 2."""
    from .preempt import Preempted
    from .runtime import dist_info

    try:
        if stage not in DISTRIBUTED_STAGES and dist_info()[1] > 1:
            raise ValueError(f"elm.{stage} runs in one process: launch it with python, not torchrun "
                             f"(torchrun works for {', '.join('elm.' + s for s in DISTRIBUTED_STAGES)})")  # fmt: skip
        yield
    except Preempted as stop:
        print(f"[elm.{stage}] {stop.message}", file=sys.stderr)
        sys.exit(143)
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        print(f"[elm.{stage}] error: {err}", file=sys.stderr)
        sys.exit(2)
