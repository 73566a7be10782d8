"""Distillation losses for block-wise supervision and whole-model retraining."""
