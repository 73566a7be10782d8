"""Retrain a searched architecture by whole-model distillation and export it for Hugging Face.

Public API (the comparison stage calls it with a composed ``configs/retrain.yaml``)::

    from elm.retrain import retrain
    result = retrain(cfg, arch, run_dir, search_dir=None)
    # {"model_dir": str, "val_loss": float, "val_ppl": float, "params": int, "train_time_s": float}

``cfg`` is composed from ``configs/retrain.yaml`` (e.g. ``hydra.compose("retrain", overrides=[...])``);
``run_dir`` gets ``retrain_state.pt`` (each epoch), ``metrics.jsonl``, the export ``<export.dir>/``
(default ``model/``) and ``DONE``; ``search_dir`` is a finished ``elm.search`` run dir whose
supernet initialises the student (the arch must be one of its candidates' configurations). The
arguments and results in full: :func:`elm.retrain.run.retrain`.

Modules: ``run.py`` (orchestration), ``trainer.py`` (the distillation loop), ``init.py``
(supernet -> student), ``teacher_head.py`` (MLM head for a head-less teacher), ``export.py``
(``save_pretrained`` + model card). CLI: ``python -m elm.retrain arch=<arch.json>``.
"""

from .export import export_model, model_card
from .init import init_from_search
from .run import retrain

__all__ = ["retrain", "export_model", "model_card", "init_from_search"]
