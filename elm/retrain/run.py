"""``retrain(cfg, arch, run_dir, search_dir)``: the whole retrain stage; ``python -m elm.retrain`` calls it.

Order: check inputs (cheap, before any training: arch, search dir, teacher vocabulary/causality,
sequence length) -> teacher -> data -> student (supernet weights or random init) -> teacher MLM
head (optional) -> distil with checkpoints -> final validation -> export -> DONE.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..data.corpus import load_corpus_of
from ..distill.losses import hidden_loss
from ..modeling import ElmForCausalLM, ElmForMaskedLM, config_from_arch
from ..space import ArchConfig, ArchError
from ..supernet import uniform_layer_map
from ..teacher import check_seq_len, check_vocab, load_teacher
from ..train import LoopConfig
from ..utils.fingerprint import check_fingerprint, fingerprint
from ..utils.hub import DEFAULT_ALIASES, check_hub_settings, push_model, reach_hub
from ..utils.io import DONE_FILE, atomic_write_json, load_checkpoint
from ..utils.logging import RunLogger
from ..utils.runtime import dist_info, resolve_device, seed_everything
from .export import MINILM_HUB_ID, export_model, parameter_counts
from .init import (
    basis_from_state,
    check_search_dir,
    fit_point_target,
    init_from_model,
    init_from_search,
    load_search_state,
)
from .settings import check_retrain_settings
from .teacher_head import share_head, teacher_head
from .trainer import STATE_FILE, RetrainSettings, RetrainTrainer

log = logging.getLogger("elm.retrain")


def run_retrain(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """:func:`retrain` of the CLI's ``arch=`` (default ``<search_dir>/arch.json``) and ``search_dir=``."""
    search_dir = cfg.get("search_dir")
    arch_path = cfg.get("arch")
    if arch_path is None and search_dir is None:
        raise ArchError(
            "nothing to retrain: pass arch=<path to arch.json> (and/or search_dir=<search run dir>)"
        )
    if search_dir is not None:
        search_dir = check_search_dir(search_dir)
    if arch_path is None:
        arch_path = search_dir / "arch.json"
    arch = ArchConfig.from_json(Path(str(arch_path)).expanduser())
    return retrain(cfg, arch, run_dir, search_dir, init_from=cfg.get("init_from"))


def check_inputs(cfg: DictConfig, arch: ArchConfig, teacher) -> None:
    """Everything that would fail later, as one clear line now."""
    check_vocab(arch.vocab_size, teacher.tokenizer, where="arch")
    if arch.causal != teacher.causal:
        raise ArchError(f"arch.causal={arch.causal} but teacher {teacher.name!r} is "
                        f"{'causal' if teacher.causal else 'bidirectional'}; retrain needs the same kind")  # fmt: skip
    check_seq_len(cfg.data.seq_len, min(arch.max_positions, teacher.max_positions))
    if not arch.causal and teacher.tokenizer.mask_token_id is None:
        raise ArchError(f"teacher tokenizer of {teacher.name!r} has no mask token; "
                        "a masked LM cannot be trained")


def retrain(
    cfg: DictConfig, arch: ArchConfig, run_dir: str | Path, search_dir: str | Path | None = None,
    init_from: str | Path | None = None, teacher_cache=None,
) -> dict:
    """Distil ``teacher`` into ``arch``, export it to ``<run_dir>/<export.dir>`` and return the results.

    Args:
        cfg: the composed ``configs/retrain.yaml`` (``arch``/``search_dir`` keys there are ignored here).
        arch: the architecture to train (``ElmForMaskedLM``, or ``ElmForCausalLM`` when ``arch.causal``).
        run_dir: where the checkpoint, metrics and export go; with ``cfg.resume`` a checkpoint there
            is continued.
        search_dir: a finished ``elm.search`` run dir to initialise from (None = random init).
        init_from: a saved model dir (``save_pretrained`` of an elm model of this ``arch``, e.g. a
            teacher slice) to start from instead; ignored when ``search_dir`` is given.
        teacher_cache: an ``elm.teacher.TeacherCache`` shared by retrainings on the same batches.

    Returns:
        ``{"model_dir", "val_loss", "val_ppl", "params", "train_time_s"}``: the export path,
        the final validation LM loss and perplexity, the backbone parameter count (embeddings +
        layers, what the search's budgets count) and the seconds spent in training + validation
        (summed over resumed runs; excludes loading, the teacher-head fit and the export).
    """
    rank = dist_info()[0]
    run_dir = Path(run_dir)
    state_path = run_dir / STATE_FILE
    if state_path.exists() and not cfg.resume:  # before any loading
        raise ValueError(f"{run_dir} already holds a retrain state; pass resume=true to continue it "
                         "or choose another hydra.run.dir")  # fmt: skip
    check_retrain_settings(cfg)
    check_hub_settings(cfg.get("hub"))
    if rank == 0:
        reach_hub(cfg.get("hub"))  # no network or a bad token: seconds, not after the training
    run_dir.mkdir(parents=True, exist_ok=True)
    r = cfg.retrain
    arch = arch.validate()
    search_dir = check_search_dir(search_dir) if search_dir is not None else None
    if search_dir is not None and init_from is not None:
        raise ArchError("pass either search_dir= or init_from=, not both: both say where the weights start")
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    settings, state = fingerprint(cfg, "retrain"), None
    if cfg.resume and state_path.exists():  # checked before the teacher and the data load
        state = load_checkpoint(state_path, device, "retrain state", "model")
        check_fingerprint(state.get("meta", {}).get("settings"), settings, str(state_path))

    teacher = load_teacher(cfg.teacher.name, causal=cfg.teacher.get("causal"), device=device)
    check_inputs(cfg, arch, teacher)
    data = load_corpus_of(cfg, teacher.tokenizer)
    model_cls = ElmForCausalLM if arch.causal else ElmForMaskedLM
    tok = teacher.tokenizer
    config_kwargs = dict(hidden_dropout_prob=r.dropout, attention_probs_dropout_prob=r.dropout,
                         pad_token_id=tok.pad_token_id or 0)  # fmt: skip
    if arch.causal:  # generate() and pipeline("text-generation") stop at eos without being told
        config_kwargs.update(eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    search_state = load_search_state(search_dir) if search_dir is not None else None
    # the point-wise target: the coordinates the searched blocks work in
    target = basis_from_state(search_state) if search_state is not None else None
    if search_dir is not None and state is None:
        model, init = init_from_search(search_dir, arch, teacher, model_cls, state=search_state, **config_kwargs)
    elif init_from is not None and state is None:
        model, init = init_from_model(init_from, arch, model_cls, **config_kwargs)
    else:  # a resumed run gets its weights (and init facts) from the checkpoint
        model = model_cls(config_from_arch(arch, **config_kwargs))
        init = state["meta"].get("init") if state is not None else None
    model.to(device)
    layer_map = list(r.layer_map) if r.get("layer_map") else (
        init["layer_map"] if init and init.get("layer_map") else uniform_layer_map(arch.num_layers, teacher.num_layers))  # fmt: skip
    if target is not None:  # the variances of the boundaries the model's states stand for
        boundaries = (init or {}).get("boundaries") or list(range(len(search_state["layer_map"])))
        searched_map = [search_state["layer_map"][b] for b in boundaries]
        target = (target[0], target[1][boundaries])
        if layer_map != searched_map and float(cfg.distill.get("point", 0)) > 0:
            raise ArchError(f"retrain.layer_map={layer_map} differs from the search's {searched_map}: the point-wise "
                            f"term follows the search's map; drop retrain.layer_map or set distill.point=0")  # fmt: skip
    loss = cfg.distill.get("loss") or (str(search_state.get("loss", "rkd")) if search_dir is not None else "rkd")
    hidden = hidden_loss(loss)
    needs_basis = float(cfg.distill.get("point", 0)) > 0 or (
        hidden.main is not None and hidden.basis and float(cfg.distill.hidden) > 0)
    if target is None and needs_basis:  # no search: a basis fitted on the teacher's states
        target = fit_point_target(teacher, data["train"], layer_map, arch.hidden_size, seed=cfg.seed)

    logger = None  # rank 0 writes metrics.jsonl / wandb; the config less Hydra's node (may not resolve)
    if rank == 0:
        plain = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        logger = RunLogger.for_run(run_dir, cfg.logger, OmegaConf.to_container(plain, resolve=True))
    try:
        h = cfg.teacher_head
        head = None
        if rank == 0:  # fitted (or read from its cache) once, then sent to the other ranks
            head = teacher_head(teacher, data["train"], run_dir, fit=h.fit, steps=h.steps, lr=h.lr,
                                batch_size=h.batch_size, mlm_probability=r.mlm_probability, seed=cfg.seed,
                                path=h.get("path"), precision=cfg.precision, progress=cfg.progress, logger=logger)  # fmt: skip
        head = share_head(head, teacher)
        d = cfg.distill
        loop = LoopConfig.from_config(r, seed=cfg.seed, device=device, precision=cfg.precision, run_dir=run_dir,
                                      progress=cfg.progress)  # fmt: skip
        kd = RetrainSettings(layer_map=layer_map, weights={k: d[k] for k in ("lm", "hidden", "point", "kd")},
                             temperature=d.temperature, loss=loss, eval_batches=r.eval_batches,
                             mlm_probability=r.mlm_probability)
        trainer = RetrainTrainer(model, teacher, data["train"], data["validation"], loop, kd, teacher_head=head,
                                 point_target=target, logger=logger, compile=bool(cfg.get("compile", False)),
                                 teacher_cache=teacher_cache)  # fmt: skip
        trainer.meta = {"init": init, "settings": settings}
        if state is not None:
            trainer.load_state_dict(state)
            log.info("resumed from %s at epoch %d (step %d)", state_path, trainer.epoch, trainer.step)
            if logger is not None:  # drop records written after the checkpoint (they are redone)
                logger.keep_until(trainer.step)
        history = trainer.fit()
        last = history[-1] if history else trainer.validate()
        scores = {k: last[k] for k in ("val_loss", "val_ppl", "val_tokens")}
        teacher_name = MINILM_HUB_ID if teacher.name.lower() in DEFAULT_ALIASES else teacher.name
        info = {
            "teacher": {"name": teacher_name, "num_layers": teacher.num_layers,
                        "hidden_size": teacher.hidden_size, "layer_map": trainer.layer_map},
            "init": init,
            "data": {"source": cfg.data.source, "seq_len": cfg.data.seq_len, "train_blocks": len(data["train"]),
                     "val_blocks": len(data["validation"])},
            "training": {**trainer.plan, "steps": trainer.step, "weights": trainer.weights, "loss": trainer.hidden.name,
                         "temperature": trainer.temperature,
                         "logit_kd": trainer.has_logits and trainer.weights["kd"] > 0, "tokens_seen": trainer.step * r.batch_size * cfg.data.seq_len,
                         "train_time_s": trainer.train_time_s, "teacher_head": head.meta if head else None},
            "eval": scores,
            "history": history,
        }  # fmt: skip
        model_dir = run_dir / cfg.export.dir
        if rank == 0:
            export_model(model.cpu().eval(), teacher.tokenizer, model_dir, info)
        result = {"model_dir": str(model_dir), "val_loss": float(scores["val_loss"]),
                  "val_ppl": float(scores["val_ppl"]), "params": parameter_counts(model)["backbone"],
                  "train_time_s": float(trainer.train_time_s)}
        if logger is not None:
            logger.log({"final": result})
    finally:
        if logger is not None:
            logger.finish()
    if rank == 0:
        atomic_write_json(run_dir / DONE_FILE, {"stage": "retrain", **result})
        message = f"elm retrain: {result['params'] / 1e6:.2f}M params, val loss {result['val_loss']:.4f}"
        pushed = push_model(model_dir, cfg.get("hub"), message)  # after DONE: a failed push loses nothing
        if pushed is not None:
            result["hub"] = pushed
            atomic_write_json(run_dir / DONE_FILE, {"stage": "retrain", **result})
    return result
