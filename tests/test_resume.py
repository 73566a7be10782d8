"""Crash recovery of the search: SIGKILL mid-epoch + resume == uninterrupted; SIGTERM checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

COMMON = [
    "space=tiny", "search.epochs=3", "search.steps_per_epoch=3", "search.batch_size=4", "search.eval_batches=1",
    "search.analysis_batch_size=8", "search.checkpoint_every=1", "search.warmup_steps=2", "data.max_docs=60",
    "data.seq_len=64", "logger=none", "progress=false", "search.budgets.small=45000", "search.budgets.tiny=30000",
    "device=cpu",
]  # fmt: skip


def _search(run_dir: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **(env or {})}
    cmd = [sys.executable, "-m", "elm.search", *COMMON, f"hydra.run.dir={run_dir}", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _epochs(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "epoch" in r]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted")
    proc = _search(run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run


def _assert_same(a: Path, b: Path) -> None:
    assert json.loads((a / "arch.json").read_text()) == json.loads((b / "arch.json").read_text())
    ea, eb = _epochs(a), _epochs(b)
    assert [r["epoch"] for r in eb] == [1, 2, 3]
    for x, y in zip(ea, eb, strict=True):
        assert x["ffn"] == y["ffn"] and x["heads"] == y["heads"] and x["growth"] == y["growth"]
        for part in ("train_loss", "val_loss", "pca"):  # val_loss: the last epoch's (search.eval_when)
            assert (part in x) == (part in y)
            for key, value in x.get(part, {}).items():
                assert y[part][key] == pytest.approx(value, abs=1e-5), (part, key)


def test_sigkill_mid_epoch_then_resume_matches(uninterrupted: Path, tmp_path: Path) -> None:
    run = tmp_path / "crashed"
    killed = _search(run, env={"ELM_FAULT_KILL_AT_STEP": "5"})  # epoch 2, step 2 of 3
    assert killed.returncode == -9
    assert not (run / "DONE").exists() and not (run / "arch.json").exists()
    state = torch.load(run / "search_state.pt", weights_only=False)
    assert state["step"] == 5 and state["epoch"] == 1
    refused = _search(run)  # without resume=true the state is not overwritten
    assert refused.returncode == 2 and "resume=true" in refused.stderr
    resumed = _search(run, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_same(uninterrupted, run)


def test_sigterm_writes_checkpoint_and_exits_143(uninterrupted: Path, tmp_path: Path) -> None:
    run = tmp_path / "preempted"
    stopped = _search(run, env={"ELM_FAULT_KILL_AT_STEP": "4", "ELM_FAULT_SIGNAL": "TERM"})
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    assert "preempted at step 5" in stopped.stderr  # the signal is honoured at the next step boundary
    assert torch.load(run / "search_state.pt", weights_only=False)["step"] == 5
    resumed = _search(run, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_same(uninterrupted, run)


def test_corrupt_state_is_a_clear_error(tmp_path: Path) -> None:
    run = tmp_path / "corrupt"
    run.mkdir()
    (run / "search_state.pt").write_bytes(b"not a checkpoint")
    proc = _search(run, "resume=true")
    assert proc.returncode == 2
    assert "corrupt or unreadable" in proc.stderr.strip().splitlines()[-1]
