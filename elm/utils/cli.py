"""The command-line entry points: where the configs are, one-line errors, and :func:`hydra_command`,
the one ``cli()`` every Hydra stage is built from."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .io import DONE_FILE, read_json

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"  # shipped in the wheel; ./configs links here


# the stages with a data-parallel implementation; the others refuse torchrun before any work
DISTRIBUTED_STAGES = ("search", "retrain", "finetune", "distill_task")


@contextlib.contextmanager
def fail_cleanly(stage: str):
    """Turn expected user errors (bad values, missing files) into one line on stderr and exit 2."""
    from .hub import HubError
    from .preempt import Preempted
    from .runtime import dist_info

    try:
        if stage not in DISTRIBUTED_STAGES and dist_info()[1] > 1:
            raise ValueError(f"elm.{stage} runs in one process: launch it with python, not torchrun "
                             f"(torchrun works for {', '.join('elm.' + s for s in DISTRIBUTED_STAGES)})")  # fmt: skip
        yield
    except Preempted as stop:
        print(f"[elm.{stage}] {stop.message}", file=sys.stderr)
        sys.exit(143)
    except (ValueError, FileNotFoundError, FloatingPointError, HubError) as err:
        _refuse(stage, str(err))
    except OSError as err:  # the machine, not elm: no permission, a full or read-only disk
        if not (isinstance(err, PermissionError) or err.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT)):
            raise
        where = f" ({err.filename})" if err.filename else ""
        _refuse(stage, f"{err.strerror or err}{where}; nothing finished was removed")


def _override(argv: list[str], key: str) -> str | None:
    """The value the command line gives ``key`` (last one wins, ``+``/``++`` prefixes allowed)."""
    value = None
    for arg in argv:
        name, sep, rest = arg.lstrip("+").partition("=")
        if sep and name == key:
            value = rest.strip().strip("'\"")
    return value


def finished_work(run_dir: Path) -> str | None:
    """What in ``run_dir`` says a stage finished there: ``DONE`` or a complete ``results.json``."""
    if (run_dir / DONE_FILE).is_file():
        return "DONE"
    results = read_json(run_dir / "results.json")  # (unreadable: the stage itself names it)
    return "results.json" if results is not None and results.get("complete", False) else None


# each command's Hydra config (configs/<name>.yaml)
STAGE_CONFIGS = {"search": "search", "retrain": "retrain", "finetune": "finetune", "distill_task": "distill_task",
                 "compare": "compare", "causal.pipeline": "causal_pipeline", "causal.minillm": "causal_minillm",
                 "causal.evaluate": "causal_eval", "causal.teacher_train": "causal_teacher"}  # fmt: skip


def say(message: str) -> None:
    """A command's result line: on the console as it is and, with time and level, in the run
    dir's ``<job>.log`` (Hydra's job logging, ``configs/hydra/job_logging/elm.yaml``)."""
    logging.getLogger("elm.cli").info(message)


def _refuse(stage: str, message: str) -> None:
    print(f"[elm.{stage}] error: {message}", file=sys.stderr)
    sys.exit(2)


def check_overrides(stage: str, argv: list[str] | None = None) -> None:
    """Compose the command's config with its command-line overrides before Hydra runs, so that a
    typo'd key, an unknown group choice, a value Hydra cannot parse or a comma in a ``hydra.*`` path
    (Hydra reads it as a sweep) is one line naming it and exit 2, not Hydra's own several lines
    and exit 1. ``--multirun`` / ``--cfg`` calls are left to Hydra."""
    argv = sys.argv if argv is None else argv
    config = STAGE_CONFIGS.get(stage)
    if config is None or any(a.startswith("-") for a in argv[1:]):
        return
    args = [a for a in argv[1:] if "=" in a]
    hydra_args = [a for a in args if a.lstrip("+~").startswith(("hydra.", "hydra/"))]
    for arg in hydra_args:
        key, _, value = arg.partition("=")
        if "," in value and not (value[:1] in "'\"" and value[-1:] == value[:1]):
            _refuse(stage, f"{key}={value} has a comma, which Hydra reads as a sweep; quote the value or choose one without")
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            compose(config_name=config, overrides=[a for a in args if a not in hydra_args])
    except Exception as err:  # noqa: BLE001 - Hydra / OmegaConf errors become one line; anything else is a bug
        if not type(err).__module__.startswith(("hydra", "omegaconf")):
            raise
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        lines = [ln for ln in lines if not ln.startswith(("full_key:", "object_type=", "reference_type=", "Set the"))]
        _refuse(stage, " ".join(lines[:3]) or type(err).__name__)


def command_help(stage: str) -> str:
    """``--help`` of a command: its usage line and every setting with its one-line comment, read
    from the config file itself (so it cannot drift from what runs), plus the config groups."""
    config = STAGE_CONFIGS[stage]
    lines = (CONFIG_DIR / f"{config}.yaml").read_text().splitlines()
    usage = lines[0].lstrip("# ").strip() if lines and lines[0].startswith("#") else f"python -m elm.{stage}"
    body = lines[1:] if lines and lines[0].startswith("#") else lines
    if "hydra:" in body:  # Hydra's own run-dir settings close every config
        body = body[: body.index("hydra:")]
    groups = sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir() and p.name != "hydra")
    return "\n".join([
        f"usage: {usage}", "",
        f"Every setting below is a Hydra override: key=value (e.g. seed=1), group=option (a file of "
        f"{CONFIG_DIR}/<group>/), +experiment=<name>. Config file: {CONFIG_DIR / (config + '.yaml')}",
        f"Config groups: {', '.join(groups)}. Hydra's own help: --hydra-help; shell completion: -sc install=bash",
        "", *(line.rstrip() for line in body), "",
    ]).rstrip() + "\n"  # fmt: skip


def guard_run_dir(stage: str, argv: list[str] | None = None) -> None:
    """Before Hydra writes anything into ``hydra.run.dir``: refuse a dir that cannot be written or
    holds finished work (one line, exit 2), check the overrides (:func:`check_overrides`), and on
    ``resume=true`` send Hydra's own files to ``.hydra/resume-<time>`` so the finished or
    interrupted run's ``.hydra/config.yaml`` stays the record of what it ran."""
    argv = sys.argv if argv is None else argv
    if any(a in ("-h", "--help") for a in argv[1:]) and stage in STAGE_CONFIGS:
        print(command_help(stage), end="")
        sys.exit(0)
    run_dir = _override(argv[1:], "hydra.run.dir")
    if not run_dir or "${" in run_dir:
        check_overrides(stage, argv)
        return
    path = Path(run_dir).expanduser()
    existing = path.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        _refuse(stage, f"hydra.run.dir={run_dir} cannot be written ({existing} is not writable); choose another dir")
    resume = (_override(argv[1:], "resume") or "false").lower() in ("true", "1", "yes")
    marker = finished_work(path)
    if marker and not resume:
        _refuse(stage, f"hydra.run.dir={run_dir} already holds a finished run ({marker}); choose another "
                       "hydra.run.dir (nothing was written)")  # fmt: skip
    check_overrides(stage, argv)
    if resume and (path / ".hydra").is_dir() and _override(argv[1:], "hydra.output_subdir") is None:
        argv.append(f"hydra.output_subdir=.hydra/resume-{time.strftime('%Y%m%d-%H%M%S')}")


def teacher_shorthand(argv: list[str] | None = None) -> None:
    """``teacher=<dir or hub name>`` means ``teacher.name=<it>`` when it is not one of the
    ``configs/teacher`` presets (``teacher=minilm``, ``teacher=bert_base``), which Hydra would
    otherwise reject as an unknown group choice."""
    argv = sys.argv if argv is None else argv
    presets = {p.stem for p in (CONFIG_DIR / "teacher").glob("*.yaml")}
    for i, arg in enumerate(argv[1:], start=1):
        key, sep, value = arg.partition("=")
        if sep and key == "teacher" and value not in presets:
            argv[i] = f"teacher.name={value}"


def _module_name(module: str) -> str:
    """The importable name of ``module``; ``__main__`` (``python -m``, or a script) becomes its spec's
    name or the file's stem. Hydra names the job after its last part (the run dir's ``<job>.log``)."""
    if module != "__main__":
        return module
    main = sys.modules["__main__"]
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None else Path(getattr(main, "__file__", None) or "__main__").stem


def hydra_command(stage: str, module: str, run: Callable[[Any, str], Any], report: Callable[[Any, str], Iterable[str]],
                  *, join_group: bool = False, prepare: Callable[[], None] | None = None) -> Callable[[], None]:  # fmt: skip
    """``cli()`` of ``python -m elm.<stage>``: ``prepare`` (argv rewrites), :func:`guard_run_dir`,
    then Hydra with ``configs/<STAGE_CONFIGS[stage]>.yaml`` runs ``run(cfg, run_dir)`` inside
    :func:`fail_cleanly` and rank 0 says each line of ``report(result, run_dir)``. Under torchrun
    the other ranks log warnings only, and ``join_group`` joins (and leaves) the process group
    around the run (the stages whose own loop is data-parallel; the HF Trainer joins by itself).
    Hydra is imported only when the command runs, not when its module is imported."""

    def main(cfg) -> None:
        from hydra.core.hydra_config import HydraConfig

        from .runtime import dist_info, init_distributed, keep_freed_memory, shutdown_distributed

        if dist_info()[0] != 0:  # torchrun: rank 0 reports
            logging.getLogger("elm").setLevel(logging.WARNING)
        keep_freed_memory()
        with fail_cleanly(stage):
            if join_group:
                init_distributed()
            run_dir = HydraConfig.get().runtime.output_dir
            result = run(cfg, run_dir)
            shutdown_distributed()
            if dist_info()[0] == 0:
                for line in report(result, run_dir):
                    say(line)

    def cli() -> None:
        import hydra

        if prepare is not None:
            prepare()
        guard_run_dir(stage)  # before Hydra writes into the run dir
        main.__module__ = _module_name(module)  # Hydra's job name: as if the stage defined main itself
        sys.exit(hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=STAGE_CONFIGS[stage])(main)())

    cli.__doc__ = f"``python -m elm.{stage}`` (and its ``elm-*`` script in ``pyproject.toml``)."
    return cli
