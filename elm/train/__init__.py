"""The training scaffold the search and the retraining share (:mod:`elm.train.loop`)."""

from .loop import SCHEDULES, LoopConfig, TrainLoop, clip_and_step

__all__ = ["LoopConfig", "SCHEDULES", "TrainLoop", "clip_and_step"]
