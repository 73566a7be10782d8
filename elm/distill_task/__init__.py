"""Task distillation (TinyBERT's second stage): ``python -m elm.distill_task student=<dir> task=<task>``.

:mod:`~elm.distill_task.teacher` fine-tunes (and caches) the teacher on the task,
:mod:`~elm.distill_task.augment` makes masked-word variants of small training sets,
:mod:`~elm.distill_task.trainer` holds the loss, :mod:`~elm.distill_task.run` the procedure.
"""

from .run import run_distill_task
from .trainer import KDWeights, layer_map

__all__ = ["KDWeights", "layer_map", "run_distill_task"]
