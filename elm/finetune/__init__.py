"""Fine-tune and evaluate a model on a classification / regression task over several seeds.

``python -m elm.finetune model=<dir> task=<task>`` (``configs/finetune.yaml``) or
:func:`run_finetune` from Python; see ``docs/evaluate.md``.
"""

from .run import RESULTS_FILE, count_parameters, finetune_seed, run_finetune, summarise, trainer_metrics

__all__ = [
    "RESULTS_FILE",
    "count_parameters",
    "finetune_seed",
    "run_finetune",
    "summarise",
    "trainer_metrics",
]
