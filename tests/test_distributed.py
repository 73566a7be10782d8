"""torchrun (gloo, CPU): 2 processes give the same search as 1 process with the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

COMMON = [
    "space=tiny", "space.dropout=0", "search.epochs=3", "search.steps_per_epoch=3", "search.batch_size=4",
    "search.eval_batches=1", "search.analysis_batch_size=8", "data.max_docs=60", "data.seq_len=64",
    "logger=none", "progress=false", "search.budgets.small=60000", "search.budgets.tiny=50000", "device=cpu",
]  # fmt: skip


def _epochs(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "epoch" in r]


def _run(cmd: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.distributed
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_two_ranks_match_one(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, "-m", "elm.search", *COMMON, f"hydra.run.dir={one}"], tmp_path)
    _run(
        [
            "torchrun",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "elm.search",
            *COMMON,
            f"hydra.run.dir={two}",
        ],
        tmp_path,
    )
    a, b = _epochs(one), _epochs(two)
    assert len(a) == len(b) == 3
    for x, y in zip(a, b, strict=True):
        assert x["ffn"] == y["ffn"] and x["heads"] == y["heads"]
        for key, value in x["train_loss"].items():
            assert y["train_loss"][key] == pytest.approx(value, abs=1e-5)
        for key, value in x["val_loss"].items():
            assert y["val_loss"][key] == pytest.approx(value, abs=1e-5)
    assert json.loads((one / "arch.json").read_text()) == json.loads((two / "arch.json").read_text())
    assert (two / "DONE").exists()
