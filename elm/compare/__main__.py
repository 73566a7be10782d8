"""``python -m elm.compare search_dir=<search run dir> [hydra overrides]`` (see ``configs/compare.yaml``)."""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ..utils.cli import CONFIG_DIR, fail_cleanly, guard_run_dir, say
from .run import run_compare


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="compare")
def main(cfg: DictConfig) -> None:
    with fail_cleanly("compare"):
        run_dir = HydraConfig.get().runtime.output_dir
        summary = run_compare(cfg, run_dir)
        for row in summary["rows"]:
            scores = ", ".join(f"{t}: {r['mean']['score'] * 100:.1f} ± {r['std']['score'] * 100:.1f}"
                               for t, r in row["tasks"].items())  # fmt: skip
            val = f"val loss {row['val_loss']:.3f}, " if row.get("val_loss") is not None else ""
            say(f"[elm.compare] {row['model']:<16} {row['params'] / 1e6:6.2f}M params, {val}{scores}")
        say(f"[elm.compare] table in {run_dir}/comparison.md ({summary['time_s']:.0f} s)")


def cli() -> None:
    """``elm-compare`` / ``python -m elm.compare``."""
    guard_run_dir("compare")  # before Hydra writes into the run dir
    sys.exit(main())


if __name__ == "__main__":
    cli()
