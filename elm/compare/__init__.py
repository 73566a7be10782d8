"""Compare the searched model with baselines at equal parameters and equal training budget.

``python -m elm.compare search_dir=<search run dir>`` (``configs/compare.yaml``) or
:func:`run_compare`; the pieces are importable on their own: :func:`uniform_arch` /
:func:`random_arch` (baseline architectures), :func:`measure_latency` /
:func:`measure_side_by_side` (latency) and :func:`write_comparison` (table + figure).
See ``docs/evaluate.md``.
"""

from .baselines import layer_params, random_arch, uniform_arch
from .latency import measure_latency, measure_side_by_side
from .report import plot_comparison, table_csv, table_markdown, write_comparison
from .run import run_compare

__all__ = ["layer_params", "measure_latency", "measure_side_by_side", "plot_comparison", "random_arch",
           "run_compare", "table_csv", "table_markdown", "uniform_arch", "write_comparison"]
