"""``python -m elm.retrain arch=<arch.json> [search_dir=<search run dir>] [hydra overrides]`` (configs/retrain.yaml)."""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ..utils.cli import CONFIG_DIR, fail_cleanly, guard_run_dir, say
from ..utils.runtime import dist_info, init_distributed, shutdown_distributed
from .run import run_retrain


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="retrain")
def main(cfg: DictConfig) -> None:
    with fail_cleanly("retrain"):
        init_distributed()
        result = run_retrain(cfg, HydraConfig.get().runtime.output_dir)
        shutdown_distributed()
        if dist_info()[0] != 0:
            return
        say(f"[elm.retrain] {result['params'] / 1e6:.2f}M params, val loss {result['val_loss']:.4f} "
              f"(perplexity {result['val_ppl']:.2f}), {result['train_time_s']:.0f} s of training")  # fmt: skip
        say(f"[elm.retrain] model in {result['model_dir']}")


def cli() -> None:
    """``elm-retrain`` / ``python -m elm.retrain``."""
    guard_run_dir("retrain")  # before Hydra writes into the run dir
    sys.exit(main())


if __name__ == "__main__":
    cli()
