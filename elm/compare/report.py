"""The comparison table (``comparison.md``, ``comparison.csv``) and figure (``comparison.png``).

A row is one model::

    {"model": "searched", "arch": "6L: 4 bert + 2 mobilebert", "params": 5_400_000,
     "layer_params": 1_500_000, "latency_ms": {"1": 3.1, "32": 41.0}, "val_loss": 4.2,
     "val_ppl": 66.7, "tasks": {"bbc": <elm.finetune results: "metrics", "mean", "std">}}

Missing values print as ``-`` (markdown) / empty (CSV). Scores are shown x100 in markdown and the
figure, as GLUE reports them; the CSV keeps raw values. When a ``teacher`` row is present, every
row also gets its task scores as a fraction of the teacher's and its latency as a speed-up over
the teacher's (teacher ms / row ms); a task-distilled column (``<task>+kd``) is compared with the
teacher's plain fine-tuning score on that task. Figures follow ``elm.search.plots``: a fresh
``Figure`` per call, no pyplot.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from ..search.plots import save_figure
from ..utils.io import atomic_write_text

KD_SUFFIX = "+kd"  # a row's task key for its task-distilled score (elm.compare task_distill.enabled)
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")


def _num(x: Any) -> float | None:
    try:
        value = float(x)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def task_label(task: str) -> str:
    """Short column name of a task: ``/data/sst2`` -> ``sst2``, ``glue/rte`` -> ``rte``."""
    return Path(str(task).rstrip("/")).stem or str(task)


def _tasks(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    """Task -> metric names (the task's metrics, then ``score`` when there are several)."""
    out: dict[str, list[str]] = {}
    for row in rows:
        for task, res in (row.get("tasks") or {}).items():
            names = list(res.get("metrics") or [k for k in res.get("mean", {})
                                                 if k not in ("score", "eval_loss")])
            out.setdefault(task, names + (["score"] if len(names) > 1 else []))
    return out


def _latency_keys(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    keys = {str(k) for row in rows for k in (row.get("latency_ms") or {})}
    return sorted(keys, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))


def _score(row: Mapping[str, Any], task: str, metric: str) -> tuple[float | None, float | None]:
    res = (row.get("tasks") or {}).get(task) or {}
    return _num((res.get("mean") or {}).get(metric)), _num((res.get("std") or {}).get(metric))


def _teacher(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    return next((row for row in rows if row.get("model") == "teacher"), None)


def of_teacher(row: Mapping[str, Any], teacher: Mapping[str, Any] | None, task: str, metric: str) -> float | None:
    """The row's mean score as a fraction of the teacher's (None without a teacher score)."""
    if teacher is None:
        return None
    mine, theirs = _score(row, task, metric)[0], _score(teacher, task, metric)[0]
    if theirs is None and task.endswith(KD_SUFFIX):  # a task-distilled row: of the teacher's plain score
        theirs = _score(teacher, task[: -len(KD_SUFFIX)], metric)[0]
    return mine / theirs if mine is not None and theirs else None


def speedup(row: Mapping[str, Any], teacher: Mapping[str, Any] | None, batch: str) -> float | None:
    """Teacher latency / row latency at ``batch`` (None without both)."""
    if teacher is None:
        return None
    mine, theirs = _num((row.get("latency_ms") or {}).get(batch)), _num((teacher.get("latency_ms") or {}).get(batch))
    return theirs / mine if mine and theirs is not None else None


def table_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    tasks, lat, teacher = _tasks(rows), _latency_keys(rows), _teacher(rows)
    header = ["model", "arch", "params", "layer_params", *(f"latency_b{k}_ms" for k in lat),
              "val_loss", "val_ppl"]
    header += [f"{task_label(t)}_{m}_{s}" for t, ms in tasks.items() for m in ms for s in ("mean", "std")]
    if teacher is not None:
        header += [f"speedup_b{k}" for k in lat] + [f"{task_label(t)}_{ms[-1]}_of_teacher" for t, ms in tasks.items()]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        line = [row.get("model", ""), row.get("arch", ""), row.get("params", ""), row.get("layer_params", "")]
        line += [_blank((row.get("latency_ms") or {}).get(k)) for k in lat]
        line += [_blank(row.get("val_loss")), _blank(row.get("val_ppl"))]
        line += [_blank(v) for t, ms in tasks.items() for m in ms for v in _score(row, t, m)]
        if teacher is not None:
            line += [_blank(speedup(row, teacher, k)) for k in lat]
            line += [_blank(of_teacher(row, teacher, t, ms[-1])) for t, ms in tasks.items()]
        writer.writerow(line)
    return buf.getvalue()


def _blank(x: Any) -> Any:
    value = _num(x)
    return "" if value is None else value


def _fmt(x: Any, digits: int, scale: float = 1.0, unit: str = "") -> str:
    value = _num(x)
    return "-" if value is None else f"{value * scale:.{digits}f}{unit}"


def table_markdown(rows: Sequence[Mapping[str, Any]], title: str = "") -> str:
    tasks, lat, teacher = _tasks(rows), _latency_keys(rows), _teacher(rows)
    header = ["model", "arch", "params (M)", "layer params (M)", *(f"latency b{k} (ms)" for k in lat)]
    header += [f"speed-up b{k}" for k in lat] if teacher is not None else []
    header += ["val MLM loss", "val ppl"]
    header += [f"{task_label(t)} {m} (x100)" for t, ms in tasks.items() for m in ms]
    header += [f"{task_label(t)} of teacher" for t in tasks] if teacher is not None else []
    lines = [f"# {title}\n" if title else "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(row.get("model", "")), str(row.get("arch", "")), _fmt(_num(row.get("params")), 2, 1e-6),
                 _fmt(_num(row.get("layer_params")), 2, 1e-6)]  # fmt: skip
        cells += [_fmt((row.get("latency_ms") or {}).get(k), 1) for k in lat]
        if teacher is not None:
            cells += [_fmt(speedup(row, teacher, k), 2, unit="x") for k in lat]
        cells += [_fmt(row.get("val_loss"), 3), _fmt(row.get("val_ppl"), 1)]
        for t, ms in tasks.items():
            for m in ms:
                mean, std = _score(row, t, m)
                cells.append("-" if mean is None else f"{mean * 100:.1f} ± {(std or 0.0) * 100:.1f}")
        if teacher is not None:
            cells += [_fmt(of_teacher(row, teacher, t, ms[-1]), 1, 100, unit="%") for t, ms in tasks.items()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(line for line in lines if line) + "\n"


def plot_comparison(rows: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """Task score (mean ± std over seeds, x100) against parameters (M); one panel per task."""
    tasks = _tasks(rows)
    panels = list(tasks) or [""]
    fig = Figure(figsize=(max(6.4, 5.2 * len(panels)), 4.4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, task in zip(axes, panels):
        metric = "score" if "score" in tasks.get(task, []) else (tasks.get(task) or ["score"])[0]
        drawn = 0
        for i, row in enumerate(rows):
            params, (mean, std) = _num(row.get("params")), _score(row, task, metric)
            if params is None or mean is None:
                continue
            ax.errorbar(params / 1e6, mean * 100, yerr=(std or 0.0) * 100, fmt=_MARKERS[i % len(_MARKERS)],
                        color=f"C{i % 10}", capsize=4, markersize=8, alpha=0.85,
                        label=str(row.get("model", i)))  # fmt: skip
            drawn += 1
        if not drawn:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", fontsize=16, color="0.4",
                    transform=ax.transAxes)
        else:
            ax.legend(fontsize=8, loc="best")
        ax.set_xlabel("parameters (M)")
        ax.set_ylabel(f"{metric} x100 (mean ± std over seeds)")
        ax.set_title(task_label(task) if task else "task score")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def write_comparison(rows: Sequence[Mapping[str, Any]], out_dir: str | Path,
                     title: str = "") -> dict[str, Path]:
    """``comparison.md``, ``comparison.csv`` and ``comparison.png`` in ``out_dir``."""
    out_dir = Path(out_dir)
    return {
        "md": atomic_write_text(out_dir / "comparison.md", table_markdown(rows, title)),
        "csv": atomic_write_text(out_dir / "comparison.csv", table_csv(rows)),
        "png": plot_comparison(rows, out_dir / "comparison.png", title),
    }
