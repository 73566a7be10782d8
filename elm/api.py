"""The pipeline from Python: one function per stage, the same settings and checks as the commands.

Each function composes the stage's Hydra config (``elm/configs/<stage>.yaml``) exactly as
``python -m elm.<stage>`` does, so every default, experiment and check is the command's:

* positional ``overrides`` are Hydra strings (``"+experiment=smoke"``, ``"space=tiny"``,
  ``"search.epochs=2"``);
* keyword ``settings`` are merged on top as plain values or nested dicts
  (``search={"epochs": 2}``, ``device="cpu"``); an unknown key is one ``ValueError`` line;
* ``run_dir`` is where the stage writes (default: ``outputs/<stage>/<time>``, like the command).

and returns a small result object holding paths and numbers, never a trainer::

    import elm.api as elm_api
    found = elm_api.search("+experiment=smoke", device="cpu")
    student = elm_api.retrain(found, retrain={"epochs": 1})
    scores = elm_api.finetune(student, task="bbc", seeds=[0])
    print(found.arch.num_parameters(), student.params, scores.mean["accuracy"])

[decision] The functions live in ``elm.api`` rather than at ``elm.search(...)``: ``elm.search`` is
the search stage's package (``python -m elm.search``), and a function of the same name would be
replaced by the module the moment anything imports ``elm.search.run``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .space import ArchConfig

__all__ = ["SearchResult", "RetrainResult", "FinetuneResult", "CompareResult", "search", "retrain", "finetune",
           "distill_task", "compare"]  # fmt: skip


@dataclass(frozen=True)
class SearchResult:
    """A finished search: ``archs`` maps each budget name to its chosen architecture."""

    run_dir: Path
    archs: dict[str, ArchConfig]
    summary: dict[str, Any] = field(repr=False)

    @property
    def arch(self) -> ArchConfig:
        """The first budget's architecture (``arch.json``, what retrain takes by default)."""
        return ArchConfig.from_json(self.run_dir / "arch.json")

    @property
    def plots(self) -> dict[str, Path]:
        """The plots the run wrote, by name (``pca_curves``, ``cka_heatmap``, ``architecture``, ...)."""
        return {p.stem: p for p in sorted(self.run_dir.glob("*.png"))}


@dataclass(frozen=True)
class RetrainResult:
    """A retrained, exported student: ``model_dir`` loads with ``AutoModel*.from_pretrained``."""

    run_dir: Path
    model_dir: Path
    params: int
    val_loss: float
    val_ppl: float
    train_time_s: float
    hub: dict[str, Any] | None = None


@dataclass(frozen=True)
class FinetuneResult:
    """Fine-tuning (or task distillation) over seeds: ``mean``/``std`` of each metric over them."""

    run_dir: Path
    task: str
    mean: dict[str, float]
    std: dict[str, float]
    results: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class CompareResult:
    """The searched model against the baselines: one row per model, and the report files."""

    run_dir: Path
    rows: list[dict[str, Any]]
    files: dict[str, Path]


def _config(stage: str, overrides: tuple[str, ...], settings: dict[str, Any]):
    from .utils.settings import compose_config

    bad = [o for o in overrides if not isinstance(o, str)]
    if bad:
        raise ValueError(f"overrides must be Hydra strings like 'search.epochs=2', got {bad[0]!r}; "
                         "pass values as keywords instead (search={'epochs': 2})")  # fmt: skip
    return compose_config(stage, list(overrides), merge=settings or None, what=f"elm.api.{stage} settings")


def _refuse(stage: str, overrides: tuple[str, ...], settings: dict[str, Any], keys: tuple[str, ...], why: str) -> None:
    """One line for settings the function takes as arguments instead (they would be ignored)."""
    given = [k for k in keys if k in settings or any(o.lstrip("+").split("=")[0] == k for o in overrides)]
    if given:
        raise ValueError(f"elm.api.{stage}: {', '.join(given)} is {why}")


def _run_dir(stage: str, run_dir: str | Path | None) -> Path:
    if run_dir is not None:
        return Path(run_dir).expanduser()
    return Path("outputs") / stage / time.strftime("%Y-%m-%d_%H-%M-%S")


def _path(source: Any, what: str) -> str:
    """A path out of a result object or a path-like."""
    if isinstance(source, RetrainResult):
        return str(source.model_dir)
    if isinstance(source, (SearchResult, CompareResult, FinetuneResult)):
        return str(source.run_dir)
    if isinstance(source, (str, Path)):
        return str(source)
    raise ValueError(f"{what}={source!r} must be a path or an elm.api result")


def search(*overrides: str, run_dir: str | Path | None = None, **settings: Any) -> SearchResult:
    """``python -m elm.search``: train the supernet, choose one architecture per budget."""
    from .search.run import run_search

    cfg = _config("search", overrides, settings)
    out = _run_dir("search", run_dir)
    summary = run_search(cfg, out)
    archs = {name: ArchConfig.from_dict(point["arch"]) for name, point in summary["chosen"].items()}
    return SearchResult(out, archs, summary)


def retrain(
    source: SearchResult | ArchConfig | str | Path, *overrides: str, budget: str | None = None,
    run_dir: str | Path | None = None, **settings: Any,
) -> RetrainResult:  # fmt: skip
    """``python -m elm.retrain``: distil ``source`` and export it.

    ``source``: a search (its result or run dir: the supernet's weights, ``budget``'s architecture,
    default the first), an ``arch.json`` path or an ``ArchConfig`` (random init).
    """
    from .retrain.run import retrain as run_retrain

    _refuse("retrain", overrides, settings, ("arch", "search_dir"),
            "the first argument here (a search, an arch.json or an ArchConfig)")  # fmt: skip
    cfg = _config("retrain", overrides, settings)
    out = _run_dir("retrain", run_dir)
    if isinstance(source, ArchConfig):
        arch, search_dir = source, None
    else:
        path = Path(_path(source, "source")).expanduser()
        if path.is_dir():
            arch_file = path / (f"arch_{budget}.json" if budget else "arch.json")
            if not arch_file.is_file():
                known = sorted(p.stem.removeprefix("arch_") for p in path.glob("arch_*.json"))
                raise ValueError(f"{path} has no {arch_file.name}; budgets there: "
                                 f"{', '.join(known) or 'none'}")
            arch, search_dir = ArchConfig.from_json(arch_file), path
        elif budget is not None:
            raise ValueError(f"budget={budget!r} needs a search (result or run dir), not the file {path}")
        else:
            arch, search_dir = ArchConfig.from_json(path), None
    result = run_retrain(cfg, arch, out, search_dir=search_dir, init_from=cfg.get("init_from"))
    return RetrainResult(out, Path(result["model_dir"]), int(result["params"]), float(result["val_loss"]),
                         float(result["val_ppl"]), float(result["train_time_s"]), result.get("hub"))  # fmt: skip


def _finetune_result(out: Path, results: dict[str, Any]) -> FinetuneResult:
    return FinetuneResult(out, str(results["task"]), dict(results.get("mean", {})), dict(results.get("std", {})),
                          results)  # fmt: skip


def finetune(model: RetrainResult | str | Path, *overrides: str, task: str | None = None,
             run_dir: str | Path | None = None, **settings: Any) -> FinetuneResult:  # fmt: skip
    """``python -m elm.finetune``: fine-tune ``model`` on ``task`` (None: the config's, or an override's)
    once per seed and score it."""
    from .finetune.run import run_finetune

    task_given = {} if task is None else {"task": task}  # None: leave the config's task, or an override's
    cfg = _config("finetune", overrides, {**settings, "model": _path(model, "model"), **task_given})
    out = _run_dir("finetune", run_dir)
    return _finetune_result(out, run_finetune(cfg, out))


def distill_task(student: RetrainResult | str | Path, *overrides: str, task: str | None = None,
                 run_dir: str | Path | None = None, **settings: Any) -> FinetuneResult:  # fmt: skip
    """``python -m elm.distill_task``: the student distilled from the teacher fine-tuned on ``task``."""
    from .distill_task.run import run_distill_task

    task_given = {} if task is None else {"task": task}
    cfg = _config("distill_task", overrides, {**settings, "student": _path(student, "student"), **task_given})
    out = _run_dir("distill_task", run_dir)
    return _finetune_result(out, run_distill_task(cfg, out))


def compare(search_result: SearchResult | str | Path, *overrides: str, run_dir: str | Path | None = None,
            **settings: Any) -> CompareResult:  # fmt: skip
    """``python -m elm.compare``: the searched model against equal-size baselines, retrained and fine-tuned alike."""
    from .compare.run import run_compare

    cfg = _config("compare", overrides, {**settings, "search_dir": _path(search_result, "search_result")})
    out = _run_dir("compare", run_dir)
    summary = run_compare(cfg, out)
    files = {k: Path(v) for k, v in summary.get("files", {}).items()}
    return CompareResult(out, list(summary.get("rows", [])), files)
