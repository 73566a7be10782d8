"""``python -m elm.compare search_dir=<search run dir> [hydra overrides]`` (see ``configs/compare.yaml``)."""

from __future__ import annotations

from ..utils.cli import hydra_command
from .run import run_compare


def _report(summary, run_dir: str):
    for row in summary["rows"]:
        scores = ", ".join(f"{t}: {r['mean']['score'] * 100:.1f} ± {r['std']['score'] * 100:.1f}"
                           for t, r in row["tasks"].items())  # fmt: skip
        val = f"val loss {row['val_loss']:.3f}, " if row.get("val_loss") is not None else ""
        yield f"[elm.compare] {row['model']:<16} {row['params'] / 1e6:6.2f}M params, {val}{scores}"
    yield f"[elm.compare] table in {run_dir}/comparison.md ({summary['time_s']:.0f} s)"


cli = hydra_command("compare", __name__, run_compare, _report)

if __name__ == "__main__":
    cli()
