"""``python -m elm.search [hydra overrides]``: run the ELM search (see ``configs/search.yaml``)."""

from __future__ import annotations

from ..utils.cli import hydra_command
from .run import run_search


def _report(summary, run_dir: str):
    for name, point in summary["chosen"].items():
        yield (f"[elm.search] {name}: {point['params'] / 1e6:.2f}M params (layers {point['layer_params'] / 1e6:.2f}M), "
               f"score {point['score']:.4f}, blocks {point['candidates']}")  # fmt: skip
    yield f"[elm.search] outputs in {run_dir}"


cli = hydra_command("search", __name__, run_search, _report, join_group=True)

if __name__ == "__main__":
    cli()
