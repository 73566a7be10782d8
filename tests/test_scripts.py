"""Launch scripts: valid bash, and their dry-run prints the command they would launch."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.mark.parametrize("name", sorted(p.name for p in SCRIPTS.iterdir() if p.suffix in (".sh", ".sbatch")))
def test_bash_syntax(name: str) -> None:
    subprocess.run(["bash", "-n", str(SCRIPTS / name)], check=True)


def _dry(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *args], capture_output=True, text=True,
                          env={**os.environ, "DRY_RUN": "1", **env})  # fmt: skip


def test_launch_dry_run() -> None:
    out = _dry(str(SCRIPTS / "launch.sh"), "search", "+experiment=elm_small", NPROC="8", NNODES="2")
    assert out.returncode == 0, out.stderr
    assert "torchrun --nnodes 2 --nproc_per_node 8" in out.stdout
    assert "-m elm.search +experiment=elm_small" in out.stdout


def test_slurm_dry_run() -> None:
    out = _dry(str(SCRIPTS / "slurm_stage.sbatch"), "retrain", "arch=a.json", SLURM_JOB_NUM_NODES="2",
               SLURM_GPUS_PER_NODE="4")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("srun --nodes=2")
    assert "--nproc_per_node 4" in out.stdout and "-m elm.retrain arch=a.json" in out.stdout


def test_unknown_stage_is_refused() -> None:
    out = _dry(str(SCRIPTS / "launch.sh"), "serach")
    assert out.returncode == 2 and "unknown stage 'serach'" in out.stderr


def _printed_commands(stdout: str) -> list[list[str]]:
    """The commands a dry run printed (its ``+ cmd ...`` lines), split as bash would."""
    import shlex

    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def _compose(commands: list[list[str]]) -> list[dict]:
    """Each stage command's Hydra config, composed and printed by ``--cfg job`` without running."""
    import sys

    import yaml

    configs = []
    for cmd in commands:
        proc = subprocess.run([sys.executable, *cmd[1:], "--cfg", "job"], cwd=SCRIPTS.parent, capture_output=True,
                              text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        configs.append(yaml.safe_load(proc.stdout))
    return configs


def test_pipeline_commands_compose(tmp_path) -> None:
    """Every command pipeline.sh prints parses as the stage's Hydra config (``--cfg job`` composes
    and prints it without running), with the SST-2 rows and task distillation switched on."""
    (tmp_path / "sst2").mkdir()
    out = _dry(str(SCRIPTS / "pipeline.sh"), OUT=str(tmp_path / "out"), SST2=str(tmp_path / "sst2"))
    assert out.returncode == 0, out.stderr
    commands = _printed_commands(out.stdout)
    assert [c[:3] for c in commands] == [["python", "-m", "elm.search"], ["python", "-m", "elm.compare"]]
    compare = _compose(commands)[1]
    assert compare["tasks"] == ["bbc", str(tmp_path / "sst2")]
    assert compare["task_finetune"] == {"sst2": {"data": {"max_train": 4000}}}
    kd = compare["task_distill"]
    assert kd["enabled"] and kd["models"] == ["searched"] and not kd["augment"]["enabled"]


def test_check_cuda_commands_compose(tmp_path) -> None:
    """check_cuda.sh's stage commands compose on any machine (the run itself needs a GPU: its
    results are in docs/benchmarks.md); the bench's case names are ones it knows."""
    from elm.bench.__main__ import CASES

    out = _dry(str(SCRIPTS / "check_cuda.sh"), OUT=str(tmp_path / "out"))
    assert out.returncode == 0, out.stderr
    assert not (tmp_path / "out").exists()  # a dry run writes nothing
    commands = _printed_commands(out.stdout)
    stages = [c[2] for c in commands]
    assert stages == ["elm.search", "elm.retrain", "elm.finetune", "elm.bench", "elm.search", "elm.causal.pipeline"]
    bench = commands[3]
    assert set(bench[bench.index("--only") + 1 :]) <= set(CASES)
    configs = _compose([c for c in commands if c[2] != "elm.bench"])
    assert all(cfg["device"] == "cuda" for cfg in configs)
    assert configs[3]["space"]["blocks"] == ["bert", "mobilebert", "llama", "skip"]
    assert configs[4]["teacher"]["train_overrides"] == ["train.max_time_s=90"]


def test_console_scripts_are_installed_and_reach_the_commands(tmp_path):
    """Every ``[project.scripts]`` entry is on PATH after ``pip install -e .`` (the README's setup)
    and points at a callable; two real calls, from another directory, take the commands' paths."""
    import importlib
    import re
    import shutil
    import sys

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    section = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]  # (tomllib is Python >= 3.11)
    scripts = dict(re.findall(r'^([\w-]+) = "([\w.:]+)"', section, flags=re.M))
    assert {"elm-search", "elm-retrain", "elm-finetune", "elm-compare", "elm-distill-task"} <= set(scripts)
    bindir = Path(sys.executable).parent
    for name, target in scripts.items():
        module, _, func = target.partition(":")
        assert callable(getattr(importlib.import_module(module), func)), target
        assert shutil.which(name) or (bindir / name).is_file(), f"{name} is not installed; run pip install -e ."
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
           "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip
    proc = subprocess.run(["elm-retrain", "retrain.epoch=2", f"hydra.run.dir={tmp_path / 'r'}"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("[elm.retrain] error:")
    assert "retrain.epoch" in proc.stderr
    proc = subprocess.run(["elm-bench", "--only", "nothing"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown case(s)" in proc.stderr
    proc = subprocess.run(["elm-search", "--help"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python -m elm.search")
    assert "  steps_per_epoch: 25       # null = one full pass" in proc.stdout  # the config's own comments
    assert not (tmp_path / "outputs").exists()  # --help runs nothing
    proc = subprocess.run(["elm-search", "-sc", "query=bash"], cwd=tmp_path, env={**env, "COMP_LINE": "elm-search space=ti"},
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0 and "space=tiny" in proc.stdout.split()  # shell completion (no stdlib shadowing)
