"""``run_compare(cfg, run_dir)``: the searched model against baselines at equal budget (method doc, §7).

Reads like the procedure (each step in full: docs/evaluate.md, "Compare at equal budget"):

1. the searched arch, its layer budget (``pareto.json``) and the search space;
2. baselines under the same budget (:mod:`elm.compare.baselines`, :mod:`elm.compare.slice`);
3. retrain every model with the SAME config: the searched arch from the supernet's weights
   (``searched``) and from scratch (``scratch``), the slice from its teacher weights, the others
   from scratch; the best random arch is the one with the lowest validation MLM loss;
4. latency of every row and of the teacher, measured side by side (:mod:`elm.compare.latency`);
5. fine-tune every row, and the ``teacher``, on every task with the same seeds and settings; then,
   with ``task_distill.enabled``, task-distil the rows of ``task_distill.models`` (at the learning
   rate plain fine-tuning picked for them, from the teacher row's own fine-tuned model where it is
   the run distillation would make: :func:`kd_teacher`), as column ``<task>+kd``;
6. ``comparison.{md,csv,png,json}`` (:mod:`elm.compare.report`) and ``DONE``.

Run dir layout: ``retrain/<model>/`` (checkpoint, export ``model/``), ``finetune/<model>/<task>/``
(``results.json``). With ``resume=true`` finished sub-runs found there are reused, after
:func:`check_finished_subruns` has checked, before anything is written, that each ran with the
settings asked for now.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ..finetune.checkpoint import check_same_run
from ..finetune.run import RESULTS_FILE, check_finetune_settings, prepare_task, run_finetune
from ..space import ArchConfig, SpaceConfig
from ..teacher import TeacherCache
from ..utils.hub import load_tokenizer
from ..utils.io import DONE_FILE, atomic_write_json, load_checkpoint, read_json
from ..utils.runtime import resolve_device
from ..utils.settings import check_number, compose_config
from .baselines import layer_params, random_arch, uniform_arch
from .latency import measure_side_by_side
from .report import KD_SUFFIX, task_label, write_comparison
from .slice import slice_arch, teacher_slice

log = logging.getLogger("elm.compare")
RESULT_KEYS = ("metrics", "mean", "std", "per_seed", "train_size", "eval_size", "time_s", "params", "lr", "lr_sweep")
MODELS = ("searched", "scratch", "uniform", "random", "teacher_slice", "teacher")


def describe(arch: ArchConfig) -> str:
    """``6L: 4 bert + 2 mobilebert`` (block counts in layer order of first appearance)."""
    counts = Counter(layer.block for layer in arch.layers)
    return f"{arch.num_layers}L: " + " + ".join(f"{n} {block}" for block, n in counts.items())


def load_search(cfg: DictConfig) -> tuple[Path, ArchConfig, SpaceConfig, int, str, str]:
    """Search dir, searched arch, its space, layer budget (with where the budget came from) and
    the distillation loss the search trained its blocks with."""
    from ..retrain.init import check_search_dir, load_search_state

    if OmegaConf.is_missing(cfg, "search_dir") or cfg.search_dir is None:
        raise ValueError("search_dir=<search run dir> is required (a finished python -m elm.search run)")
    search_dir = check_search_dir(str(cfg.search_dir))
    arch = ArchConfig.from_json(search_dir / str(cfg.arch))
    state = load_search_state(search_dir)
    space, loss = SpaceConfig.from_dict(state["space"]).validate(), str(state.get("loss", "rkd"))
    if cfg.budget is not None:
        budget, source = int(cfg.budget), "config"
    else:
        pareto = search_dir / "pareto.json"
        chosen = json.loads(pareto.read_text()).get("chosen", {}) if pareto.is_file() else {}
        match = [(n, p) for n, p in chosen.items() if p.get("arch") == arch.to_dict()]
        budget, source = (int(match[0][1]["budget"]), f"pareto.json:{match[0][0]}") if match else \
            (layer_params(arch), "searched arch (no pareto.json entry)")  # fmt: skip
    if layer_params(arch) > budget:
        raise ValueError(f"the searched arch has {layer_params(arch):,} layer params, "
                         f"above the budget {budget:,}")
    return search_dir, arch, space, budget, source, loss


def candidate_archs(
    cfg: DictConfig, arch: ArchConfig, space: SpaceConfig, budget: int, teacher=None
) -> dict[str, ArchConfig]:
    """Every arch to retrain: the searched one (twice), the uniform one, ``random_<i>``, the slice."""
    models = list(cfg.models)
    archs = {name: arch for name in ("searched", "scratch") if name in models}
    if "uniform" in models:
        archs["uniform"] = uniform_arch(arch.num_parameters(), like=arch, head_dim=space.head_dim,
                                        budget=budget, tolerance=cfg.uniform.tolerance,
                                        ffn_step=cfg.uniform.ffn_step)  # fmt: skip
    if "random" in models:
        if cfg.random.n < 1:
            raise ValueError(f"random.n must be >= 1, got {cfg.random.n}")
        rng = np.random.default_rng(cfg.seed)
        floor = int((1 - cfg.random.tolerance) * min(layer_params(arch), budget))
        for i in range(cfg.random.n):
            archs[f"random_{i}"] = random_arch(space, budget, rng, like=arch, min_params=floor,
                                               max_tries=cfg.random.max_tries)  # fmt: skip
    if "teacher_slice" in models:
        archs["teacher_slice"] = slice_arch(arch, layer_params(arch), teacher)
    return archs


def _retrain_one(retrain_cfg: DictConfig, name: str, arch: ArchConfig, out: Path, search_dir: Path | None,
                 resume: bool, init_from: Path | None = None, teacher_cache=None) -> dict[str, Any]:  # fmt: skip
    from ..retrain import retrain

    done = out / DONE_FILE
    if resume and done.is_file():
        result = json.loads(done.read_text())
        if Path(result.get("model_dir", "")).is_dir():
            _check_finished_retrain(retrain_cfg, out)
            log.info("%s: reusing the finished retrain in %s", name, out)
            return result
    start = "supernet init" if search_dir else f"init from {init_from}" if init_from else "scratch"
    log.info("%s: retraining %s (%s)", name, describe(arch), start)
    cfg = retrain_cfg.copy()
    cfg.resume = resume  # a half-done retrain (its checkpoint) is continued, not refused
    return retrain(cfg, arch, out, search_dir=search_dir, init_from=init_from, teacher_cache=teacher_cache)


def _check_finished_retrain(retrain_cfg: DictConfig, out: Path) -> None:
    """A finished retrain is reused only if it ran with the settings asked for now (its state file's
    fingerprint), so a resumed comparison never mixes rows trained two ways."""
    from ..retrain.run import STATE_FILE
    from ..utils.fingerprint import check_fingerprint, fingerprint

    state_path = out / STATE_FILE
    if state_path.is_file():
        state = load_checkpoint(state_path, "cpu", "retrain state", "meta")
        check_fingerprint(state.get("meta", {}).get("settings"), fingerprint(retrain_cfg, "retrain"), str(state_path))


def check_finished_subruns(cfg: DictConfig, run_dir: Path, retrain_cfg: DictConfig, ft_cfg: DictConfig,
                           names: list[str]) -> None:  # fmt: skip
    """(``resume=true``) Before anything is written: every finished retrain, fine-tuning and task
    distillation found in ``run_dir`` must have run with the settings asked for now; otherwise one
    line names the changed key and the finished comparison stays as it was."""
    for name in names:
        if (run_dir / "retrain" / name / DONE_FILE).is_file():
            _check_finished_retrain(retrain_cfg, run_dir / "retrain" / name)
    for model in cfg.models:
        for task in cfg.tasks:
            ft = task_config(cfg, ft_cfg, str(task))
            base = run_dir / "finetune" / model / task_label(str(task))
            plain = read_json(base / RESULTS_FILE)
            if plain is not None:
                ft.model = plain.get("model")
                check_same_run(plain, ft, str(plain.get("model")), base / RESULTS_FILE)
            kd_path = base.with_name(base.name + KD_SUFFIX) / RESULTS_FILE
            kd = read_json(kd_path)
            if kd is not None and cfg.task_distill.enabled:
                teacher = kd_teacher(cfg, ft, str(retrain_cfg.teacher.name), run_dir, str(task), record=False)
                dcfg = distill_config(cfg, ft, str(kd.get("model")), teacher, run_dir)
                dcfg.train.lr, dcfg.train.lr_sweep = (plain or {}).get("lr", dcfg.train.lr), None
                check_same_run(kd, dcfg, str(kd.get("model")), kd_path)


def _write_slice(retrain_cfg: DictConfig, arch: ArchConfig, out: Path) -> Path:
    """The teacher slice's weights, saved once (``<out>/init``) for its retrain to start from."""
    from ..data.collate import sample_batches
    from ..data.corpus import load_corpus_of
    from ..modeling import ElmForMaskedLM
    from ..teacher import load_teacher

    path = out / "init"
    if (path / "config.json").is_file():
        return path
    teacher = load_teacher(retrain_cfg.teacher.name, causal=retrain_cfg.teacher.get("causal"))
    data = load_corpus_of(retrain_cfg, teacher.tokenizer)
    batches = sample_batches(data["train"], retrain_cfg.seed, 4, 8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(retrain_cfg.seed)
        model, _ = teacher_slice(teacher, arch, batches, ElmForMaskedLM, pad_token_id=teacher.tokenizer.pad_token_id or 0)
    model.save_pretrained(str(path))
    return path


def distill_config(cfg: DictConfig, ft: DictConfig, model_dir: str, teacher: str, run_dir: Path) -> DictConfig:
    """The ``elm.distill_task`` config of one row and task: that task's fine-tuning settings (the same
    budget as plain fine-tuning), then ``task_distill``'s loss / augmentation / teacher settings; one
    fine-tuned teacher per task is shared by every row (``<run dir>/distill_teacher``)."""
    own = {k: v for k, v in OmegaConf.to_container(cfg.task_distill, resolve=True).items()
           if k not in ("enabled", "models")}
    settings = {k: v for k, v in OmegaConf.to_container(ft).items() if k not in ("model", "tokenizer")}
    dcfg = OmegaConf.merge(compose_config("distill_task", [], settings), own)
    dcfg.student, dcfg.model, dcfg.teacher.name = model_dir, model_dir, teacher
    dcfg.teacher_finetune.cache_dir = str(run_dir / "distill_teacher")
    return dcfg


def kd_teacher(cfg: DictConfig, ft: DictConfig, teacher: str, run_dir: Path, task: str, *, record: bool = True) -> str:
    """The teacher ``elm.distill_task`` starts from on ``task``: the ``teacher`` row's own fine-tuned
    model where that run is the one distill_task would make (the same
    :func:`~elm.distill_task.teacher.finetune_key`: data, training at the rate the row's sweep picked,
    and ``teacher_finetune.seed`` among the seeds), else ``teacher``, which distill_task fine-tunes
    once into ``<run dir>/distill_teacher``. ``record``: write the model's ``elm_task.json``.

    [project decision, issue #15] On BBC the teacher's sweep picks 1e-4, ``teacher_finetune``'s own
    rate, so its seed-0 run is the task teacher and a second fine-tuning of it is saved."""
    from ..distill_task.teacher import finetune_key, teacher_finetune_config, write_task_record

    plain = read_json(run_dir / "finetune" / "teacher" / task_label(task) / RESULTS_FILE)
    if "teacher" not in cfg.models or not plain or not plain.get("complete"):
        return teacher
    tcfg = teacher_finetune_config(distill_config(cfg, ft, "<student>", teacher, run_dir), str(plain["model"]))
    seed = int(tcfg.seeds[0])
    ran = OmegaConf.merge(ft, {"model": plain["model"], "seeds": [seed], "train": {"lr": plain["lr"], "lr_sweep": None}})
    model_dir = run_dir / "finetune" / "teacher" / task_label(task) / f"seed{seed}" / "model"
    done = [r for r in plain.get("per_seed") or [] if r.get("seed") == seed]
    if not done or not (model_dir / "config.json").is_file() or finetune_key(ran) != finetune_key(tcfg):
        return teacher
    if record:
        write_task_record(model_dir, task, plain.get("label_names"), int(plain["num_labels"]), str(plain["model"]),
                          done[0]["metrics"])  # fmt: skip
    return str(model_dir)


def _check_inputs(cfg: DictConfig, retrain_cfg: DictConfig, ft_cfg: DictConfig) -> None:
    """Models, tasks and latency settings, before any (long) retraining."""
    bad = [m for m in cfg.models if m not in MODELS]
    if bad or not cfg.models:
        raise ValueError(f"models={list(cfg.models)} has unknown/no entries {bad}; "
                         f"valid: {', '.join(MODELS)}")
    if not cfg.tasks:
        raise ValueError("tasks is empty; give at least one fine-tuning task (e.g. tasks=[bbc])")
    for what, sub in (("retrain", retrain_cfg), ("finetune", ft_cfg)):  # every row would push to one repo
        if (sub.get("hub") or {}).get("repo_id") is not None:
            raise ValueError(f"{what}.hub.repo_id is set, but elm.compare publishes nothing (every row would push to "
                             f"one repo); drop it and push a chosen row with elm.retrain / elm.finetune")  # fmt: skip
    check_number("teacher_cache_gb", cfg.get("teacher_cache_gb", 0), 0, integer=False)
    if any(b < 1 for b in cfg.latency.batch_sizes) or cfg.latency.seq_len < 1 or cfg.latency.repeats < 1:
        raise ValueError("latency.batch_sizes, latency.seq_len and latency.repeats must be >= 1")
    tokenizer = load_tokenizer(retrain_cfg.teacher.name)
    if any(m in cfg.models for m in ("teacher", "teacher_slice")) and retrain_cfg.teacher.get("causal"):
        raise ValueError("models teacher/teacher_slice compare against an encoder teacher; drop them for causal runs")
    labels = [task_label(str(t)) for t in cfg.tasks]
    extra = [k for k in cfg.get("task_finetune") or {} if k not in labels]
    if extra:
        raise ValueError(f"task_finetune has settings for {extra}, which are not among the tasks {labels}")
    td = cfg.get("task_distill") or {}
    if td.get("enabled"):
        bad = [m for m in td.get("models") or [] if m not in cfg.models or m == "teacher"]
        if bad or not td.get("models"):
            raise ValueError(f"task_distill.models={list(td.get('models') or [])} must name rows of models "
                             f"({', '.join(m for m in cfg.models if m != 'teacher')}); the teacher is not distilled")  # fmt: skip
        from ..distill_task.run import check_augment, kd_weights

        probe = distill_config(cfg, ft_cfg, "<student>", str(retrain_cfg.teacher.name), Path("."))
        kd_weights(probe), check_augment(probe)
    from ..retrain.settings import check_retrain_settings

    check_retrain_settings(retrain_cfg)
    for task in cfg.tasks:  # loads and tokenises once; a bad name or path fails here
        ft = task_config(cfg, ft_cfg, str(task))
        check_finetune_settings(ft)
        prepare_task(ft, tokenizer)


def task_config(cfg: DictConfig, ft_cfg: DictConfig, task: str) -> DictConfig:
    """The fine-tuning config of one task (``task`` set): ``finetune:`` with ``task_finetune.<label>``
    merged over it (e.g. more training rows for SST-2 than for BBC), the same for every model."""
    own = (cfg.get("task_finetune") or {}).get(task_label(task))
    merged = OmegaConf.merge(ft_cfg, own) if own else ft_cfg.copy()
    merged.task = task
    return merged


def teacher_facts(teacher) -> dict[str, Any]:
    """Parameters of the teacher's backbone (embeddings + layers, no pooler) and of its layers."""
    base = getattr(teacher.model, "base_model", teacher.model)
    named = list(base.named_parameters())
    layers = sum(p.numel() for n, p in named if not n.startswith(("embeddings.", "pooler.")))
    embeddings = sum(p.numel() for n, p in named if n.startswith("embeddings."))
    return {"params": layers + embeddings, "layer_params": layers}


def run_compare(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    t_start = time.perf_counter()
    search_dir, arch, space, budget, budget_source, search_loss = load_search(cfg)
    retrain_cfg = compose_config("retrain", list(cfg.retrain_overrides), cfg.get("retrain"))
    if retrain_cfg.teacher_head.get("path") is None:  # one fitted teacher head for every row
        retrain_cfg.teacher_head.path = str(run_dir / "teacher_mlm_head.pt")
    if retrain_cfg.distill.get("loss") is None and search_loss != "rkd":  # every row distils with the search's
        retrain_cfg.distill.loss = search_loss  # loss (rkd stays null: rows finished before the key existed resume)
    ft_cfg = compose_config("finetune", list(cfg.finetune_overrides), cfg.get("finetune"))
    ft_cfg.seeds = list(cfg.seeds)
    _check_inputs(cfg, retrain_cfg, ft_cfg)
    teacher = None
    if any(m in cfg.models for m in ("teacher", "teacher_slice")):
        from ..teacher import load_teacher

        teacher = load_teacher(retrain_cfg.teacher.name, causal=retrain_cfg.teacher.get("causal"))
    archs = candidate_archs(cfg, arch, space, budget, teacher)
    if cfg.resume:
        check_finished_subruns(cfg, run_dir, retrain_cfg, ft_cfg, list(archs))
    run_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "search_dir": str(search_dir), "budget": budget, "budget_source": budget_source,
        "retrain_config": OmegaConf.to_container(retrain_cfg, resolve=True),
        "finetune_config": OmegaConf.to_container(ft_cfg, resolve=True),
        "task_finetune": OmegaConf.to_container(cfg.get("task_finetune") or OmegaConf.create({}), resolve=True),
        "archs": {name: {"arch": a.to_dict(), "params": a.num_parameters(), "layer_params": layer_params(a),
                         "describe": describe(a)} for name, a in archs.items()},
    }  # fmt: skip
    atomic_write_json(run_dir / "comparison.json", summary)

    # 3. the same retraining for every arch (the same batches: the teacher's states are kept between them)
    retrained = {}
    gib = float(cfg.get("teacher_cache_gb", 0))
    cache = TeacherCache(int(gib * 2**30)) if gib > 0 else None
    for name, a in archs.items():
        out = run_dir / "retrain" / name
        init_from = _write_slice(retrain_cfg, a, out) if name == "teacher_slice" else None
        search = search_dir if name == "searched" else None
        retrained[name] = _retrain_one(retrain_cfg, name, a, out, search, bool(cfg.resume), init_from, cache)
        summary["archs"][name]["retrain"] = retrained[name]
        atomic_write_json(run_dir / "comparison.json", summary)
    if cache is not None and cache.hits:
        log.info("teacher states reused between the retrainings: %s", cache)
    del cache
    rows_archs = {m: m for m in cfg.models if m not in ("random", "teacher")}
    note = {}
    if "random" in cfg.models:
        randoms = [n for n in archs if n.startswith("random_")]
        best = min(randoms, key=lambda n: retrained[n]["val_loss"])
        rows_archs["random"] = best
        note["random"] = f" [best of {len(randoms)}: {best}]"
        summary["random_best"] = best

    # 4. latency, side by side (the teacher too: every row's speed-up is over it)
    extra = {"teacher": teacher_classifier(teacher)} if teacher is not None else {}
    latency = measure_rows({m: archs[a] for m, a in rows_archs.items()}, cfg.latency, extra)

    # 5. the same fine-tuning for every row
    td = cfg.get("task_distill") or {}
    distilled = list(td.get("models") or []) if td.get("enabled") else []
    rows = []
    for model in cfg.models:
        if model == "teacher":
            row = {"model": "teacher", "arch": f"{teacher.num_layers}L teacher ({teacher.name})",
                   **teacher_facts(teacher), "model_dir": retrain_cfg.teacher.name}  # fmt: skip
        else:
            name = rows_archs[model]
            a, r = archs[name], retrained[name]
            row = {"model": model, "arch": describe(a) + note.get(model, ""), "params": r["params"],
                   "layer_params": layer_params(a), "val_loss": r["val_loss"], "val_ppl": r["val_ppl"],
                   "retrain_time_s": r["train_time_s"], "model_dir": r["model_dir"]}  # fmt: skip
        row["latency_ms"] = {str(b): latency[b][model] for b in latency}
        row["tasks"] = {}
        for task in cfg.tasks:
            out = run_dir / "finetune" / model / task_label(str(task))
            ft = task_config(cfg, ft_cfg, str(task))
            if model == "teacher" and distilled:  # its seed can be the task teacher (kd_teacher)
                ft.train.save_model = True
            # resume: an unfinished run continues from its checkpoint, a finished one is returned
            # after its settings are checked against these (run_finetune, run_distill_task)
            res = run_finetune(OmegaConf.merge(ft, {"model": str(row["model_dir"]), "resume": bool(cfg.resume)}), out)
            row["tasks"][str(task)] = {k: res.get(k) for k in RESULT_KEYS}
        rows.append(row)
        summary["rows"] = rows
        atomic_write_json(run_dir / "comparison.json", summary)

    # 5b. task distillation of the rows asked for, at the rate plain fine-tuning picked for each
    for row in [r for r in rows if r["model"] in distilled]:
        from ..distill_task import run_distill_task

        for task in cfg.tasks:
            ft = task_config(cfg, ft_cfg, str(task))
            teacher = kd_teacher(cfg, ft, str(retrain_cfg.teacher.name), run_dir, str(task))
            dcfg = distill_config(cfg, ft, str(row["model_dir"]), teacher, run_dir)
            dcfg.train.lr, dcfg.train.lr_sweep = float(row["tasks"][str(task)]["lr"]), None
            dcfg.resume = bool(cfg.resume)
            out = run_dir / "finetune" / row["model"] / (task_label(str(task)) + KD_SUFFIX)
            res = run_distill_task(dcfg, out)
            row["tasks"][f"{task}{KD_SUFFIX}"] = {k: res.get(k) for k in (*RESULT_KEYS, "distillation")}
        atomic_write_json(run_dir / "comparison.json", summary)

    # 6. report
    title = f"equal budget: {budget:,} layer params ({budget_source}), {len(list(cfg.seeds))} seed(s)"
    summary["files"] = {k: str(v) for k, v in write_comparison(rows, run_dir, title).items()}
    summary["time_s"] = time.perf_counter() - t_start
    atomic_write_json(run_dir / "comparison.json", summary)
    atomic_write_json(run_dir / DONE_FILE, {"stage": "compare", "time_s": summary["time_s"]})
    return summary


def teacher_classifier(teacher):
    """A sequence classifier of the teacher's shape, for latency (weights do not change the time)."""
    from transformers import AutoModelForSequenceClassification

    config = teacher.model.config.__class__.from_dict(teacher.model.config.to_dict())
    config.num_labels = 2
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(config)


def measure_rows(archs: dict[str, ArchConfig], lat: DictConfig, extra: dict | None = None) -> dict[int, dict[str, float]]:
    """``{batch: {model: median ms}}``: sequence-classification models built from the archs (weights
    do not change the time) and the ready models of ``extra``, all timed in the same interleaved
    rounds on ``latency.device``."""
    from ..modeling import ElmForSequenceClassification, config_from_arch

    device = resolve_device(str(lat.device))
    seq_len = int(lat.seq_len)
    models = {}
    for name, a in archs.items():
        if seq_len > a.max_positions:
            raise ValueError(f"latency.seq_len={seq_len} exceeds the model's {a.max_positions} positions")
        torch.manual_seed(0)
        models[name] = ElmForSequenceClassification(config_from_arch(a, num_labels=2)).to(device)
    models.update({name: m.to(device) for name, m in (extra or {}).items()})
    return {int(b): measure_side_by_side(models, int(b), seq_len, int(lat.repeats), int(lat.warmup))
            for b in lat.batch_sizes}  # fmt: skip
