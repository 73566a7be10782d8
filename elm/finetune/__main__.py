"""``python -m elm.finetune model=<dir> task=<task> [hydra overrides]`` (see ``configs/finetune.yaml``).

Also under ``torchrun --nproc_per_node N -m elm.finetune ...`` (DDP through the HF Trainer; only
rank 0 prints and writes files).
"""

from __future__ import annotations

from ..utils.cli import hydra_command
from .run import run_finetune


def _report(results, run_dir: str):
    scores = ", ".join(f"{m} {results['mean'][m]:.4f} ± {results['std'][m]:.4f}" for m in results["metrics"])
    yield (f"[elm.finetune] {results['task']}: {scores} ({len(results['seeds'])} seed(s), "
           f"{results['params'] / 1e6:.2f}M params, {results['time_s']:.0f} s)")  # fmt: skip
    yield f"[elm.finetune] results in {run_dir}/results.json"


cli = hydra_command("finetune", __name__, run_finetune, _report)

if __name__ == "__main__":
    cli()
