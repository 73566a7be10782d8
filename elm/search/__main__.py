"""``python -m elm.search [hydra overrides]``: run the ELM search (see ``configs/search.yaml``)."""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ..utils.cli import CONFIG_DIR, fail_cleanly, guard_run_dir, say
from ..utils.runtime import dist_info, init_distributed, shutdown_distributed
from .run import run_search


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="search")
def main(cfg: DictConfig) -> None:
    with fail_cleanly("search"):
        init_distributed()
        summary = run_search(cfg, HydraConfig.get().runtime.output_dir)
        shutdown_distributed()
        if dist_info()[0] != 0:
            return
        for name, point in summary["chosen"].items():
            say(f"[elm.search] {name}: {point['params'] / 1e6:.2f}M params "
                  f"(layers {point['layer_params'] / 1e6:.2f}M), score {point['score']:.4f}, "
                  f"blocks {point['candidates']}")  # fmt: skip
        say(f"[elm.search] outputs in {HydraConfig.get().runtime.output_dir}")


def cli() -> None:
    """``elm-search`` / ``python -m elm.search``."""
    guard_run_dir("search")  # before Hydra writes into the run dir
    sys.exit(main())


if __name__ == "__main__":
    cli()
