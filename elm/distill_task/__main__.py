"""``python -m elm.distill_task student=<export dir> task=<task> [teacher=<dir>] [overrides]``
(``configs/distill_task.yaml``; ``torchrun --nproc_per_node N -m elm.distill_task ...`` too: only
rank 0 prints and writes files)."""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ..utils.cli import CONFIG_DIR, fail_cleanly, guard_run_dir, say, teacher_shorthand
from ..utils.runtime import dist_info, shutdown_distributed
from .run import run_distill_task


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="distill_task")
def main(cfg: DictConfig) -> None:
    if dist_info()[0] != 0:
        logging.getLogger("elm").setLevel(logging.WARNING)
    with fail_cleanly("distill_task"):
        run_dir = HydraConfig.get().runtime.output_dir
        results = run_distill_task(cfg, run_dir)
        if dist_info()[0] == 0:
            d = results["distillation"]
            scores = ", ".join(f"{m} {results['mean'][m]:.4f} ± {results['std'][m]:.4f}" for m in results["metrics"])
            teacher = d["teacher"].get("metrics") or {}
            told = ", ".join(f"{m} {v:.4f}" for m, v in teacher.items() if m in results["metrics"])
            say(f"[elm.distill_task] {results['task']}: student {scores} ({len(results['seeds'])} seed(s), "
                  f"{results['params'] / 1e6:.2f}M params, {d['train_rows']} training rows, "
                  f"{results['time_s']:.0f} s); teacher {told or d['teacher']['path']}")  # fmt: skip
            say(f"[elm.distill_task] results in {run_dir}/results.json")
        shutdown_distributed()


def cli() -> None:
    """``elm-distill-task`` / ``python -m elm.distill_task``."""
    teacher_shorthand()  # teacher=<dir> as well as teacher=minilm / teacher.name=<dir>
    guard_run_dir("distill_task")
    sys.exit(main())


if __name__ == "__main__":
    cli()
