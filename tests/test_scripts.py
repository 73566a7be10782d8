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
