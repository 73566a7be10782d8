"""``run_search(cfg)``: the whole search stage from a (Hydra) config; ``python -m elm.search`` calls it.

Order: check inputs (cheap, before any training) -> teacher -> data -> supernet -> train with
growth/pruning -> final scores -> budgeted choice -> arch*.json, pareto.json, plots, DONE.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..data.corpus import load_corpus_of
from ..space import ArchConfig, SpaceConfig
from ..teacher import load_teacher
from ..train import LoopConfig
from ..utils.fingerprint import check_fingerprint, fingerprint
from ..utils.io import DONE_FILE, atomic_write_json, load_checkpoint
from ..utils.logging import RunLogger
from ..utils.runtime import dist_info, resolve_device, seed_everything
from ..utils.settings import to_dataclass
from . import plots
from .analysis import CKAConfig, PCAConfig
from .choose import (
    budget_reference,
    chained_reports,
    check_budgets,
    choose,
    resolve_budgets,
    teacher_layer_parameters,
    write_archs,
)
from .score import ChainScorer
from .settings import check_search_settings
from .trainer import STATE_FILE, SearchSettings, SearchTrainer

log = logging.getLogger("elm.search")


def run_search(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rank, _ = dist_info()
    seed_everything(cfg.seed)
    space = to_dataclass(SpaceConfig, cfg.space, "space").check_families()  # before the teacher loads
    pca, cka = to_dataclass(PCAConfig, cfg.pca, "pca"), to_dataclass(CKAConfig, cfg.cka, "cka")
    s = cfg.search
    check_search_settings(cfg, space.num_layers)  # before the teacher and the data load
    device = resolve_device(cfg.device)
    t_start = time.perf_counter()
    state_path = run_dir / STATE_FILE
    if not cfg.resume and state_path.exists():
        raise ValueError(f"{run_dir} already holds a search state; pass resume=true to continue it "
                         "or choose another hydra.run.dir")  # fmt: skip
    settings = fingerprint(cfg, "search")
    state = None
    if cfg.resume and state_path.exists():  # before the teacher and the data load; unreadable: one line
        state = load_checkpoint(state_path, device, "search state", "supernet")
        check_fingerprint(state.get("settings"), settings, str(state_path))

    teacher = load_teacher(cfg.teacher.name, causal=cfg.teacher.get("causal"), device=device)
    space.resolve(teacher.hidden_size).validate()
    pca.validate(space), cka.validate(space)
    if cfg.data.seq_len > teacher.max_positions:
        raise ValueError(f"data.seq_len={cfg.data.seq_len} exceeds the teacher's max positions ({teacher.max_positions})")
    reference = budget_reference(space, s.get("budget_reference", "space"), teacher, cka.min_heads)
    budgets = resolve_budgets(dict(s.budgets), reference)
    check_budgets(space, budgets, cka.min_heads)  # before loading data or training anything
    data = load_corpus_of(cfg, teacher.tokenizer)
    resuming = state is not None
    logger = None
    if rank == 0:
        logger = RunLogger.for_run(run_dir, cfg.logger, OmegaConf.to_container(cfg, resolve=True))
    loop = LoopConfig.from_config(s, seed=cfg.seed, device=device, precision=cfg.precision, run_dir=run_dir,
                                  progress=cfg.progress, schedule=s.get("schedule", "ramped_cosine"))  # fmt: skip
    search = SearchSettings(loss=cfg.distill.loss, point=cfg.distill.point, chain_prob=s.chain_prob,
                            train_embeddings=s.train_embeddings, inherit=cfg.inherit.enabled and not resuming,
                            inherit_batches=cfg.inherit.batches, eval_batches=s.eval_batches,
                            analysis_batch_size=s.analysis_batch_size, eval_when=s.get("eval_when", "final"),
                            common_dropout=s.get("common_dropout", True))  # fmt: skip
    trainer = SearchTrainer(teacher, space, data["train"], data["validation"], loop, search, pca=pca, cka=cka,
                            logger=logger, settings=settings)  # fmt: skip
    if state is not None:
        trainer.load_state_dict(state)
        del state
        log.info("resumed from %s at step %d (epoch %d)", state_path, trainer.step, trainer.epoch + 1)
        if logger is not None:  # the metrics of finished epochs, exactly once
            logger.rewrite(trainer.history)
    else:
        if cfg.resume:
            log.info("resume=true but %s does not exist yet: starting a new search", state_path)
        log.info("supernet initialised: %s", trainer.inherit_report)
    history = trainer.fit()

    scores = history[-1]["val_loss"] if history else trainer.validate()["loss"]
    batches = [(b["input_ids"], b["attention_mask"], h) for b, h in trainer.scoring_batches()]
    scorer = ChainScorer(trainer.supernet, batches, point=cfg.distill.point)
    summary = choose(trainer.supernet, scores, budgets, s.strategy, scorer,
                     dict(s.get("evolution") or {}, seed=cfg.seed))  # fmt: skip
    chained_reports(summary, trainer.supernet, scorer, seed=cfg.seed)
    summary["search_time_s"] = time.perf_counter() - t_start
    summary["teacher"] = {"name": teacher.name, "layer_params": teacher_layer_parameters(teacher)}
    summary["budget_reference"] = {"kind": s.get("budget_reference", "space"), "layer_params": reference}
    summary["inherit"] = trainer.inherit_report
    for name, point in summary["chosen"].items():
        chained, rand = point["chained"], point["chained_random_init"]
        log.info("%s: %s layer params (budget %s); chained last-layer RKD %.3f (random init %.3f), NMSE %.3f (%.3f)",
                 name, f"{point['layer_params']:,}", f"{point['budget']:,}", chained["rkd"][-1], rand["rkd"][-1],
                 chained["nmse"][-1], rand["nmse"][-1])  # fmt: skip
    if rank == 0:
        write_archs(run_dir, summary)
        if cfg.plots.enabled:
            write_plots(run_dir, trainer, summary, list(cfg.plots.compare_with), cfg.plots.get("cka_layer"))
        if logger is not None:
            logger.log({"final": {name: {"params": p["params"], "score": p["score"], "chained_rkd": p["chained"]["rkd"][-1],
                                         "random_init_rkd": p["chained_random_init"]["rkd"][-1]}
                                  for name, p in summary["chosen"].items()}})  # fmt: skip
            logger.finish()
    if not summary["chosen"]:
        raise ValueError("no budget is feasible after the search: " + "; ".join(summary["infeasible"].values())
                         + f" (the trained supernet is kept in {state_path})")  # fmt: skip
    if rank == 0:
        atomic_write_json(run_dir / DONE_FILE, {"stage": "search", "arch": str(run_dir / "arch.json"),
                                                "time_s": summary["search_time_s"]})  # fmt: skip
    return summary


def write_plots(run_dir: Path, trainer: SearchTrainer, summary: dict, compare_with: list[str], cka_layer=None) -> None:
    """Fig. 2 (PCA curves), 3a (head CKA), 3b (diversity per layer, several losses), 5 (arch), Pareto."""
    history = trainer.history
    plots.plot_pca_curves(history, run_dir / "pca_curves.png")
    first = next(iter(summary["chosen"].values()), None)
    if first is not None:
        arch = ArchConfig.from_dict(first["arch"])
        plots.plot_architecture(arch, run_dir / "architecture.png", title=f"chosen: {next(iter(summary['chosen']))}")
        layer = len(arch.layers) // 2 if cka_layer is None else int(cka_layer)
        key = [first["candidates"][li] for li in trainer.supernet.kept_layers(first["choice"])][layer]
        pruned = [d["head"] for rec in history for d in rec["pruning"] if d["candidate"] == key]
        matrix = trainer.last_cka.get(key, [])
        plots.plot_cka_heatmap(matrix, run_dir / "cka_heatmap.png",
                               title=f"head CKA of {key} (after pruning {len(pruned)} head(s))")  # fmt: skip
    diversity = {trainer.loss: history[-1]["diversity"]} if history else {}
    for other in compare_with:
        lines = [json.loads(x) for x in (Path(other) / "metrics.jsonl").read_text().splitlines() if x.strip()]
        epochs = [r for r in lines if "diversity" in r]
        cfg_path = Path(other) / ".hydra" / "config.yaml"
        name = OmegaConf.load(cfg_path).distill.loss if cfg_path.exists() else Path(other).name
        if epochs:
            diversity[str(name)] = epochs[-1]["diversity"]
    plots.plot_diversity(diversity, run_dir / "diversity.png")
    plots.plot_pareto(summary["pareto"], [{"name": n, **p} for n, p in summary["chosen"].items()], run_dir / "pareto.png")
