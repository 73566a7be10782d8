"""Every fine-tuning setting checked before any model or data loads: ``seeds``, ``train.*`` (the
global batch over ranks, checkpoint frequency, the learning-rate sweep), ``data.*`` and ``hub.*``."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from ..utils.hub import check_hub_settings
from ..utils.settings import check_choice, check_number


def batch_sizes(t: DictConfig, world: int) -> tuple[int, int]:
    """(per-device train batch, per-device eval batch): ``train.batch_size`` is the global batch,
    split over ``world`` ranks and ``grad_accum`` micro-steps; ``eval_batch_size`` over the ranks."""
    batch, accum = int(t.batch_size), int(t.grad_accum)
    if batch < 1 or accum < 1 or batch % (world * accum):
        raise ValueError(f"train.batch_size={batch} is the global batch: it must be divisible by world size x "
                         f"train.grad_accum ({world} x {accum})")  # fmt: skip
    if int(t.eval_batch_size) < 1:
        raise ValueError(f"train.eval_batch_size={t.eval_batch_size} must be >= 1")
    return batch // (world * accum), -(-int(t.eval_batch_size) // world)


def save_steps(t: DictConfig) -> int:
    """``train.save_steps`` (null / 0 = checkpoints only on SIGTERM)."""
    steps = t.get("save_steps") or 0
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"train.save_steps={steps!r} must be a positive integer, 0 or null")
    return steps


def _seeds(cfg: DictConfig) -> list[int]:
    seeds = OmegaConf.to_container(cfg.seeds) if OmegaConf.is_config(cfg.seeds) else cfg.seeds
    seeds = [seeds] if isinstance(seeds, int) else list(seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise ValueError(f"seeds must be a non-empty list of integers, got {cfg.seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds has duplicates: {seeds}")
    return seeds


def check_finetune_settings(cfg: DictConfig) -> list[int]:
    """The ``seeds``, ``train`` and ``data`` settings, before any model or data loads (``elm.compare``
    calls it too, before its retraining); returns the seeds."""
    seeds = _seeds(cfg)
    t, d = cfg.train, cfg.data
    check_number("train.epochs", t.epochs, 0, integer=False)
    check_number("train.max_steps", t.max_steps, -1)
    if t.epochs <= 0 and t.max_steps <= 0:
        raise ValueError("train.epochs or train.max_steps must be positive")
    batch_sizes(t, 1)
    save_steps(t)
    lr_sweep(cfg)
    check_number("train.lr", t.lr, 0, integer=False, strict=True)
    check_number("train.weight_decay", t.weight_decay, 0, integer=False)
    check_number("train.warmup", t.warmup, 0, integer=False)
    check_number("train.logging_steps", t.logging_steps, 1)
    check_number("train.lr_sweep_holdout", t.get("lr_sweep_holdout", 0.2), 0, integer=False, strict=True, high=0.5)
    check_number("data.max_length", d.max_length, 4)
    check_number("data.max_train", d.max_train, 1, none=True)
    check_number("data.max_eval", d.get("max_eval"), 1, none=True)
    check_number("data.split_seed", d.split_seed, 0)
    check_number("data.holdout", d.get("holdout"), 0, integer=False, strict=True, high=0.99, none=True)
    check_choice("precision", cfg.precision, ("bf16", "fp32"))
    hub_seed(cfg, seeds)
    return seeds


def hub_seed(cfg: DictConfig, seeds: list[int]) -> int | None:
    """The seed whose saved model ``hub.repo_id`` gets (None: no push), after the ``hub`` checks.

    [decision] ``hub.seed`` null means the first seed, not the best on the validation split: a card
    reporting the best of N seeds on the split that picked it would overstate the model.
    """
    hub = cfg.get("hub")
    check_hub_settings(hub)
    if hub is None or hub.get("repo_id") is None:
        return None
    if not cfg.train.save_model:
        raise ValueError(f"hub.repo_id={hub.repo_id} pushes a saved model: set train.save_model=true")
    seed = hub.get("seed")
    if seed is None:
        return seeds[0]
    if seed not in seeds:
        raise ValueError(f"hub.seed={seed!r} is not one of seeds={seeds}")
    return int(seed)


def lr_sweep(cfg: DictConfig) -> list[float]:
    """``train.lr_sweep``: learning rates to try (empty/null = use ``train.lr``)."""
    sweep = cfg.train.get("lr_sweep") or []
    values = list(OmegaConf.to_container(sweep) if OmegaConf.is_config(sweep) else sweep)
    if any(isinstance(v, bool) or not isinstance(v, int | float) or not v > 0 for v in values):
        raise ValueError(f"train.lr_sweep={values} must list positive learning rates (or be null)")
    return [float(v) for v in values]
