"""Retrain a searched architecture by whole-model distillation and export it for Hugging Face.

Public API (the comparison stage calls it with a composed ``configs/retrain.yaml``)::

    from elm.retrain import retrain
    result = retrain(cfg, arch, run_dir, search_dir=None)
    # {"model_dir": str, "val_loss": float, "val_ppl": float, "params": int, "train_time_s": float}

* ``cfg``: ``omegaconf.DictConfig`` composed from ``configs/retrain.yaml`` (e.g. with
  ``hydra.compose("retrain", overrides=[...])``); its ``arch``/``search_dir`` keys are only read
  by the CLI.
* ``arch``: an :class:`elm.space.ArchConfig`; ``ElmForMaskedLM`` is trained, or
  ``ElmForCausalLM`` when ``arch.causal``.
* ``run_dir``: gets ``retrain_state.pt`` (each epoch), ``metrics.jsonl``, the export
  ``<export.dir>/`` (default ``model/``) and ``DONE``. ``cfg.resume=true`` continues a checkpoint.
* ``search_dir``: a finished ``elm.search`` run dir (with ``DONE``) whose supernet initialises
  the student; the arch must be one of its candidates' configurations. None = random init.
* Returns the export dir, final validation LM loss and perplexity, backbone parameters
  (embeddings + layers) and the seconds of training + validation.

Modules: ``run.py`` (orchestration), ``trainer.py`` (the distillation loop), ``init.py``
(supernet -> student), ``teacher_head.py`` (MLM head for a head-less teacher), ``export.py``
(``save_pretrained`` + model card). CLI: ``python -m elm.retrain arch=<arch.json>``.
"""

from .export import export_model, model_card
from .init import init_from_search
from .run import retrain

__all__ = ["retrain", "export_model", "model_card", "init_from_search"]
