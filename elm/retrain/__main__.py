"""``python -m elm.retrain arch=<arch.json> [search_dir=<search run dir>] [hydra overrides]`` (configs/retrain.yaml)."""

from __future__ import annotations

from ..utils.cli import hydra_command
from .run import run_retrain


def _report(result, run_dir: str):
    yield (f"[elm.retrain] {result['params'] / 1e6:.2f}M params, val loss {result['val_loss']:.4f} "
           f"(perplexity {result['val_ppl']:.2f}), {result['train_time_s']:.0f} s of training")  # fmt: skip
    yield f"[elm.retrain] model in {result['model_dir']}"


cli = hydra_command("retrain", __name__, run_retrain, _report, join_group=True)

if __name__ == "__main__":
    cli()
