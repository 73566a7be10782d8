"""The package as users get it: a built wheel installed into a fresh venv runs the smoke search
from an empty directory, offline, through its console script (configs ship inside the wheel)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-1500:]}\n{proc.stderr[-2500:]}"
    return proc


def test_wheel_in_a_fresh_venv_runs_the_smoke_search(tmp_path: Path) -> None:
    empty, wheels, venv = tmp_path / "empty", tmp_path / "wheels", tmp_path / "venv"
    empty.mkdir()
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip
    env.pop("PYTHONPATH", None)  # nothing of the checkout on the path (cwd is an empty dir too)
    _run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels)],
         cwd=empty, env=env)  # fmt: skip
    (wheel,) = wheels.glob("elastic_lm_search-*.whl")
    # the dependencies (torch, transformers, ...) come from this interpreter's site-packages
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], cwd=empty, env=env)
    _run([str(bindir / "python"), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], cwd=empty, env=env)
    where = _run([str(bindir / "python"), "-c", "import elm; print(elm.__file__)"], cwd=empty, env=env)
    assert where.stdout.strip().startswith(str(venv)), where.stdout  # the wheel's copy, not the checkout
    _run([str(bindir / "elm-search"), "+experiment=smoke", "hydra.run.dir=run"], cwd=empty, env=env)
    assert (empty / "run" / "DONE").is_file() and (empty / "run" / "arch.json").is_file()
