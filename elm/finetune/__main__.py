"""``python -m elm.finetune model=<dir> task=<task> [hydra overrides]`` (see ``configs/finetune.yaml``).

Also under ``torchrun --nproc_per_node N -m elm.finetune ...`` (DDP through the HF Trainer; only
rank 0 prints and writes files).
"""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ..utils.cli import CONFIG_DIR, fail_cleanly, guard_run_dir, say
from ..utils.runtime import dist_info, shutdown_distributed
from .run import run_finetune


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="finetune")
def main(cfg: DictConfig) -> None:
    if dist_info()[0] != 0:  # torchrun: rank 0 reports
        logging.getLogger("elm").setLevel(logging.WARNING)
    with fail_cleanly("finetune"):
        run_dir = HydraConfig.get().runtime.output_dir
        results = run_finetune(cfg, run_dir)
        if dist_info()[0] == 0:
            scores = ", ".join(
                f"{m} {results['mean'][m]:.4f} ± {results['std'][m]:.4f}" for m in results["metrics"]
            )
            say(f"[elm.finetune] {results['task']}: {scores} ({len(results['seeds'])} seed(s), "
                  f"{results['params'] / 1e6:.2f}M params, {results['time_s']:.0f} s)")  # fmt: skip
            say(f"[elm.finetune] results in {run_dir}/results.json")
        shutdown_distributed()


def cli() -> None:
    """``elm-finetune`` / ``python -m elm.finetune``."""
    guard_run_dir("finetune")  # before Hydra writes into the run dir
    sys.exit(main())


if __name__ == "__main__":
    cli()
