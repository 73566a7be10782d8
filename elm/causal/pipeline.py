"""The causal-LM path end to end: ``python -m elm.causal.pipeline [hydra overrides]``.

Reads like the procedure (``configs/causal_pipeline.yaml``; every stage writes into the run dir;
the stages in detail: docs/causal.md, "Stages"):

1. **teacher** — ``teacher.name`` (a causal HF model dir, or a hub name when online), or, when
   null, the local GPT-2-style teacher of ``configs/causal_teacher.yaml`` (+
   ``teacher.train_overrides``), trained by :mod:`elm.causal.teacher_train` if it is not cached;
2. **search** — the real ``python -m elm.search`` with ``space.causal=true teacher.name=<teacher>``
   (+ ``search.overrides``) into ``search/`` -> ``arch_<budget>.json``;
3. **uniform baseline** — ``elm.compare.baselines.uniform_arch``: the same BERT block in every
   layer, the searched model's sizes, parameters within ``uniform.tolerance`` under the same budget;
4. **retrain** — the real ``python -m elm.retrain`` for both (same ``retrain.overrides``): the
   searched arch from the supernet's weights, the uniform one from scratch;
5. **MiniLLM** — :mod:`elm.causal.minillm` on both exports with the same ``minillm`` settings;
6. **evaluate** — :mod:`elm.causal.evaluate` on the teacher and the four students: held-out
   perplexity, ROUGE-L of greedy responses, sampled responses;
7. ``causal_comparison.md`` / ``comparison.json`` (every number computed here), ``DONE``.

A stage whose output is complete in the run dir (its ``DONE`` file) is reused, and the search
and retrain stages run with ``resume=true`` (an interrupted one continues from its checkpoint),
so a run can be continued with ``hydra.run.dir=<run>``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..space import ArchConfig
from ..utils.cli import hydra_command
from ..utils.io import DONE_FILE, atomic_write_json, atomic_write_text
from .settings import check_pipeline_settings
from .teacher_train import default_teacher, read_info

log = logging.getLogger("elm.causal")


class StageError(RuntimeError):
    """A sub-command failed; the message names it and ends with the tail of its log."""


def _value(v: Any) -> str:
    return "null" if v is None else str(v)


def data_overrides(cfg: DictConfig) -> list[str]:
    d = cfg.data
    return [f"data.source={d.source}", f"data.seq_len={d.seq_len}", f"data.val_fraction={d.val_fraction}",
            f"data.max_docs={_value(d.get('max_docs'))}", f"seed={cfg.seed}"]  # fmt: skip


def teacher_overrides(cfg: DictConfig) -> list[str]:
    """``elm.causal.teacher_train`` overrides of the local teacher (``teacher.name: null``)."""
    return [*data_overrides(cfg), f"threads={_value(cfg.get('threads'))}", f"progress={cfg.progress}",
            f"device={cfg.device}", *cfg.teacher.train_overrides]  # fmt: skip


def _shared(cfg: DictConfig, teacher: str) -> list[str]:
    return [f"teacher.name={teacher}", "teacher.causal=true", *data_overrides(cfg), f"device={cfg.device}",
            f"precision={cfg.precision}", "logger=none", "progress=false"]  # fmt: skip


def search_overrides(cfg: DictConfig, teacher: str) -> list[str]:
    """``elm.search`` overrides (without the run dir and ``resume``)."""
    return ["space.causal=true", *_shared(cfg, teacher), *cfg.search.overrides]


def retrain_overrides(cfg: DictConfig, teacher: str) -> list[str]:
    """``elm.retrain`` overrides shared by both students (without arch, run dir and ``resume``)."""
    return [*_shared(cfg, teacher), *cfg.retrain.overrides]


def check_settings(cfg: DictConfig) -> None:
    """Every pipeline setting and every sub-command's composed config, before anything trains."""
    teacher = str(cfg.teacher.name) if cfg.teacher.get("name") else "local-teacher"
    subs = {"causal_teacher": teacher_overrides(cfg), "search": search_overrides(cfg, teacher),
            "retrain": retrain_overrides(cfg, teacher)}  # fmt: skip
    check_pipeline_settings(cfg, subs)


def run_stage(
    name: str, module: str, overrides: list[str], run_dir: Path, threads: int | None = None
) -> float:
    """``python -m <module> <overrides>`` with its output in ``<run_dir>/logs/<name>.log``; returns seconds."""
    log_path = run_dir / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", module, *overrides]
    log.info("[%s] %s", name, " ".join(cmd))
    t0 = time.perf_counter()
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
    if threads:  # torch takes its intra-op thread count from OMP_NUM_THREADS
        env["OMP_NUM_THREADS"] = str(threads)
    with log_path.open("w") as fh:
        fh.write(" ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd())
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-15:])
        raise StageError(
            f"stage {name} ({module}) failed with exit code {proc.returncode}; log {log_path}:\n{tail}"
        )
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------


def stage_teacher(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    if cfg.teacher.get("name"):
        return {"path": str(cfg.teacher.name), "trained_here": False, "info": read_info(cfg.teacher.name)}
    overrides = teacher_overrides(cfg)
    path = default_teacher(overrides)
    return {"path": path, "trained_here": True, "overrides": overrides, "info": read_info(path)}


def stage_search(cfg: DictConfig, run_dir: Path, teacher: str) -> tuple[Path, float]:
    out = run_dir / "search"
    if (out / DONE_FILE).is_file():
        return out, 0.0
    overrides = [*search_overrides(cfg, teacher), "resume=true", f"hydra.run.dir={out}"]
    return out, run_stage("search", "elm.search", overrides, run_dir, cfg.get("threads"))


def searched_arch(search_dir: Path, budget_name: str) -> tuple[ArchConfig, int]:
    """The chosen arch of ``budget_name`` and its layer budget (``pareto.json``)."""
    pareto = json.loads((search_dir / "pareto.json").read_text())
    chosen = pareto["chosen"]
    if budget_name not in chosen:
        raise ValueError(f"search.budget={budget_name!r} was not chosen by the search; chosen: {sorted(chosen)} "
                         f"(infeasible: {pareto.get('infeasible')})")  # fmt: skip
    return ArchConfig.from_dict(chosen[budget_name]["arch"]), int(chosen[budget_name]["budget"])


def stage_uniform(
    cfg: DictConfig, run_dir: Path, arch: ArchConfig, budget: int, search_dir: Path
) -> ArchConfig:
    from ..compare.baselines import uniform_arch

    head_dim = int(OmegaConf.load(search_dir / ".hydra" / "config.yaml").space.head_dim)
    uniform = uniform_arch(arch.num_parameters(), like=arch, head_dim=head_dim, budget=budget,
                           tolerance=cfg.uniform.tolerance, ffn_step=cfg.uniform.ffn_step)  # fmt: skip
    uniform.to_json(run_dir / "uniform_arch.json")
    return uniform


def stage_retrain(cfg: DictConfig, run_dir: Path, name: str, arch_path: Path, teacher: str,
                  search_dir: Path | None) -> tuple[Path, float]:  # fmt: skip
    out = run_dir / f"retrain_{name}"
    if (out / DONE_FILE).is_file():
        return out, 0.0
    init = [f"search_dir={search_dir}"] if search_dir is not None else []
    overrides = [f"arch={arch_path}", *init, *retrain_overrides(cfg, teacher), "resume=true", f"hydra.run.dir={out}"]
    return out, run_stage(f"retrain_{name}", "elm.retrain", overrides, run_dir, cfg.get("threads"))


def stage_minillm(
    cfg: DictConfig, run_dir: Path, name: str, student: str, teacher: str, prompts
) -> dict[str, Any]:
    from .minillm import INFO_FILE, run_minillm

    out = run_dir / f"minillm_{name}"
    if (out / "model" / DONE_FILE).is_file() and (out / INFO_FILE).is_file():
        return json.loads((out / INFO_FILE).read_text())
    sub = OmegaConf.create({"student": str(student), "teacher": {"name": teacher}, "out_dir": str(out / "model"),
                            "seed": cfg.seed, "device": cfg.device, "precision": cfg.precision, "threads": cfg.get("threads"),
                            "progress": cfg.progress, "logger": OmegaConf.to_container(cfg.logger),
                            "data": OmegaConf.to_container(cfg.data, resolve=True),
                            "prompts": OmegaConf.to_container(cfg.prompts, resolve=True),
                            "minillm": OmegaConf.to_container(cfg.minillm, resolve=True)})  # fmt: skip
    return run_minillm(sub, out, prompts=prompts)


def stage_evaluate(
    cfg: DictConfig, run_dir: Path, models: dict[str, str], prompts
) -> dict[str, dict[str, Any]]:
    from ..data.corpus import load_corpus_of
    from ..utils.runtime import resolve_device, seed_everything
    from .common import load_causal_lm
    from .evaluate import evaluate_model

    device = resolve_device(cfg.device)
    results, corpus = {}, None
    for name, path in models.items():
        target = run_dir / "eval" / f"{name}.json"
        if target.is_file():
            results[name] = json.loads(target.read_text())
            continue
        seed_everything(cfg.seed)
        model, tokenizer = load_causal_lm(path, device)
        if corpus is None:  # every model shares the teacher's tokenizer, hence the blocks
            corpus = load_corpus_of(cfg, tokenizer)
        result = evaluate_model(model, tokenizer, cfg, corpus=corpus, prompts=prompts, device=device)
        results[name] = {"model": path, **result}
        atomic_write_json(target, results[name])
        del model
    return results


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def comparison_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| model | params | params w/o word emb. | val perplexity | ROUGE-L F (x100) | ROUGE-L P / R | last stage |",
             "|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in rows:
        e = r["eval"]
        rl = e["rouge_l"]
        lines.append(f"| {r['name']} | {_fmt(e['params']['total'])} | {_fmt(e['params']['non_vocab'])} | "
                     f"{_fmt(e['perplexity']['ppl'])} | {_fmt(100 * rl['f'])} | "
                     f"{_fmt(100 * rl['precision'], 1)} / {_fmt(100 * rl['recall'], 1)} | {r['stage']} |")  # fmt: skip
    return lines


def write_report(run_dir: Path, summary: dict[str, Any]) -> str:
    ev = summary["eval"]
    labels = {"teacher": ("teacher", "GPT-2 teacher"), "searched": ("searched (ELM)", "retrain + MiniLLM"),
              "searched_retrain": ("searched (ELM)", "retrain"), "uniform": ("uniform", "retrain + MiniLLM"),
              "uniform_retrain": ("uniform", "retrain")}  # table order
    rows = [{"name": n, "stage": s, "eval": ev[k]} for k, (n, s) in labels.items() if k in ev]
    t, first = summary["teacher"], next(iter(ev.values()))
    tinfo = t.get("info") or {}
    ml = summary["minillm"]
    arch, uni = summary["archs"]["searched"], summary["archs"]["uniform"]
    times = summary["timings_s"]
    lines = [
        "# Causal LM: searched student vs uniform baseline vs teacher",
        "",
        *comparison_table(rows),
        "",
        "## Notes",
        "",
        f"- Teacher: `{t['path']}`"
        + (f" ({tinfo.get('params', 0) / 1e6:.2f}M params, tokenizer {tinfo.get('tokenizer')}, "
           f"trained {tinfo['training']['steps']} steps / {tinfo['training']['tokens']:,} tokens; "
           f"its own validation perplexity {tinfo['val_ppl']:.2f})" if tinfo else "") + ".",
        f"- Searched: {arch['num_layers']} layers {arch['blocks']}, {arch['layer_params']:,} layer params "
        f"(budget `{summary['budget_name']}` = {summary['budget']:,}); uniform: {uni['num_layers']} x "
        f"{uni['blocks'][0]} ({uni['num_heads']} heads, FFN {uni['ffn_dim']}), {uni['layer_params']:,} layer params. "
        "Both share hidden/embedding sizes and the teacher's tokenizer.",
        "- Both students: the same `elm.retrain` settings (searched: from the supernet's weights; uniform: "
        f"from scratch), then the same MiniLLM settings (objective `{ml['objective']}`, {ml['steps']['searched']} / "
        f"{ml['steps']['uniform']} steps, mix alpha {ml['mix_alpha']}, single-step {ml['single_step']}, "
        f"length norm {ml['length_norm']}).",
        f"- Perplexity: {first['perplexity']['tokens']:,} held-out tokens ({first['perplexity']['blocks']} blocks "
        f"of {summary['seq_len']}), documents never trained on. ROUGE-L: `rouge_score` rougeL F-measure of greedy "
        f"responses (Hugging Face `generate`) on {first['rouge_l']['examples']} held-out prompts.",
        "- MiniLLM validation (teacher-forced on the reference responses), reverse KL before -> after: "
        + "; ".join(f"{k} {v['val_before']['reverse_kl']:.4f} -> {v['val_after']['reverse_kl']:.4f}"
                    for k, v in ml["runs"].items()) + ".",
        "- Wall-clock (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()) + ".",
        "",
        "## Greedy responses (first held-out prompts)",
        "",
    ]  # fmt: skip
    for i, ex in enumerate(first["greedy"][:3]):
        lines += [f"**Prompt {i + 1}:** `{ex['prompt'].strip()}`  ", f"reference: {ex['reference']}  "]
        for r in rows:
            g = r["eval"]["greedy"]
            if i < len(g):
                lines.append(f"{r['name']} ({r['stage']}): {g[i]['response'] or '(empty)'}  ")
        lines.append("")
    text = "\n".join(lines) + "\n"
    atomic_write_text(run_dir / "causal_comparison.md", text)
    return text


def _arch_summary(arch: ArchConfig) -> dict[str, Any]:
    from ..compare.baselines import layer_params

    return {"num_layers": arch.num_layers, "blocks": [f"{x.block}/{x.share}/h{x.num_heads}/f{x.ffn_dim}" for x in arch.layers],
            "num_heads": arch.layers[0].num_heads, "ffn_dim": arch.layers[0].ffn_dim, "layer_params": layer_params(arch),
            "params": arch.num_parameters()}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------


def run_pipeline(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    from .common import set_threads
    from .prompts import load_prompts

    check_settings(cfg)  # before the teacher trains
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    set_threads(cfg.get("threads"))
    timings: dict[str, float] = {}

    t_start = t0 = time.perf_counter()
    teacher = stage_teacher(cfg, run_dir)
    timings["teacher"] = time.perf_counter() - t0
    atomic_write_json(run_dir / "teacher.json", teacher)

    search_dir, timings["search"] = stage_search(cfg, run_dir, teacher["path"])
    arch, budget = searched_arch(search_dir, cfg.search.budget)
    if not arch.causal:
        raise ValueError(f"{search_dir}/pareto.json holds a non-causal arch; the search did not run causally")
    arch_path = run_dir / "searched_arch.json"
    arch.to_json(arch_path)
    uniform = stage_uniform(cfg, run_dir, arch, budget, search_dir)

    exports: dict[str, str] = {}
    for name, path, init in (
        ("searched", arch_path, search_dir),
        ("uniform", run_dir / "uniform_arch.json", None),
    ):
        out, timings[f"retrain_{name}"] = stage_retrain(cfg, run_dir, name, path, teacher["path"], init)
        exports[f"{name}_retrain"] = str(out / "model")

    prompts = load_prompts(cfg.prompts)
    runs = {}
    for name in ("searched", "uniform"):
        t0 = time.perf_counter()
        runs[name] = stage_minillm(cfg, run_dir, name, exports[f"{name}_retrain"], teacher["path"], prompts)
        timings[f"minillm_{name}"] = time.perf_counter() - t0
        exports[name] = runs[name].get("model_dir", str(run_dir / f"minillm_{name}" / "model"))

    t0 = time.perf_counter()
    models = {
        "teacher": teacher["path"],
        **{k: exports[k] for k in ("searched", "searched_retrain", "uniform", "uniform_retrain")},
    }
    results = stage_evaluate(cfg, run_dir, models, prompts)
    timings["evaluate"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start

    m = cfg.minillm
    summary = {
        "teacher": teacher,
        "budget_name": cfg.search.budget,
        "budget": budget,
        "seq_len": cfg.data.seq_len,
        "archs": {"searched": _arch_summary(arch), "uniform": _arch_summary(uniform)},
        "models": models,
        "minillm": {"objective": m.objective, "mix_alpha": m.mix_alpha, "single_step": m.single_step,
                    "length_norm": m.length_norm, "steps": {k: v["steps"] for k, v in runs.items()},
                    "runs": {k: {"val_before": v["val_before"], "val_after": v["val_after"], "steps": v["steps"],
                                 "time_limited": v["time_limited"], "train_time_s": v["train_time_s"]}
                             for k, v in runs.items()}},
        "eval": results,
        "timings_s": timings,
    }  # fmt: skip
    atomic_write_json(run_dir / "comparison.json", summary)
    write_report(run_dir, summary)
    atomic_write_json(run_dir / DONE_FILE, {"stage": "causal_pipeline", "time_s": timings["total"]})
    return summary


def _run(cfg: DictConfig, run_dir: str) -> dict[str, Any]:
    try:
        return run_pipeline(cfg, Path(run_dir))
    except StageError as err:  # a sub-command's failure is the user's one line, not a traceback
        raise ValueError(str(err)) from None


def _report(summary, run_dir: str):
    report = Path(run_dir, "causal_comparison.md")
    yield report.read_text().split("## Notes")[0].rstrip()
    yield f"[elm.causal.pipeline] {summary['timings_s']['total']:.0f} s; report {report}"


cli = hydra_command("causal.pipeline", __name__, _run, _report)

if __name__ == "__main__":
    cli()


__all__ = ["run_pipeline"]
