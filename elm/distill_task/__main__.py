"""``python -m elm.distill_task student=<export dir> task=<task> [teacher=<dir>] [overrides]``
(``configs/distill_task.yaml``; ``torchrun --nproc_per_node N -m elm.distill_task ...`` too: only
rank 0 prints and writes files)."""

from __future__ import annotations

from ..utils.cli import hydra_command, teacher_shorthand
from .run import run_distill_task


def _report(results, run_dir: str):
    d = results["distillation"]
    scores = ", ".join(f"{m} {results['mean'][m]:.4f} ± {results['std'][m]:.4f}" for m in results["metrics"])
    told = ", ".join(f"{m} {v:.4f}" for m, v in (d["teacher"].get("metrics") or {}).items() if m in results["metrics"])
    yield (f"[elm.distill_task] {results['task']}: student {scores} ({len(results['seeds'])} seed(s), "
           f"{results['params'] / 1e6:.2f}M params, {d['train_rows']} training rows, "
           f"{results['time_s']:.0f} s); teacher {told or d['teacher']['path']}")  # fmt: skip
    yield f"[elm.distill_task] results in {run_dir}/results.json"


# teacher=<dir> as well as teacher=minilm / teacher.name=<dir>
cli = hydra_command("distill_task", __name__, run_distill_task, _report, prepare=teacher_shorthand)

if __name__ == "__main__":
    cli()
