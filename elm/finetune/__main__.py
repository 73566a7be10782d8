"""``python -m elm.finetune model=<dir> task=<task> [hydra overrides]`` (see ``configs/finetune.yaml``)."""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ..utils.cli import CONFIG_DIR, fail_cleanly
from .run import run_finetune


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="finetune")
def main(cfg: DictConfig) -> None:
    with fail_cleanly("finetune"):
        run_dir = HydraConfig.get().runtime.output_dir
        results = run_finetune(cfg, run_dir)
        scores = ", ".join(
            f"{m} {results['mean'][m]:.4f} ± {results['std'][m]:.4f}" for m in results["metrics"]
        )
        print(f"[elm.finetune] {results['task']}: {scores} ({len(results['seeds'])} seed(s), "
              f"{results['params'] / 1e6:.2f}M params, {results['time_s']:.0f} s)")  # fmt: skip
        print(f"[elm.finetune] results in {run_dir}/results.json")


if __name__ == "__main__":
    sys.exit(main())
