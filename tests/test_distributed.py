"""torchrun (gloo, CPU): 2 processes give the same search and the same retrain as 1 process with the
same global batch (and gradient accumulation gives the same retrain as one big batch). In fp32: the
claim is exact arithmetic; in bf16 one process computes on a bf16 replica of fp32 master weights
while DDP ranks use autocast, and the two round differently (tests/test_precision.py covers bf16)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH"),
]
DATA = ["data.max_docs=60", "data.seq_len=64", "logger=none", "progress=false", "device=cpu", "precision=fp32"]
SEARCH = [
    "space=tiny", "space.dropout=0", "search.epochs=3", "search.steps_per_epoch=3", "search.batch_size=4",
    "search.eval_batches=1", "search.analysis_batch_size=8", "search.budgets.small=60000",
    "search.budgets.tiny=50000", *DATA,
]  # fmt: skip
RETRAIN = [
    "retrain.epochs=2", "retrain.steps_per_epoch=3", "retrain.batch_size=4", "retrain.eval_batches=3",
    "retrain.log_every=1", "retrain.dropout=0", "teacher_head.fit=true", "teacher_head.steps=2", *DATA,
]  # fmt: skip
TORCHRUN = ["torchrun", "--standalone", "--nproc_per_node", "2", "-m"]


def _records(run_dir: Path, key: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if key in r]


def _run(cmd: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def searches(tmp_path_factory) -> tuple[Path, Path]:
    """The same tiny search run by 1 process and by 2 torchrun processes."""
    root = tmp_path_factory.mktemp("search")
    one, two = root / "one", root / "two"
    _run([sys.executable, "-m", "elm.search", *SEARCH, f"hydra.run.dir={one}"], root)
    _run([*TORCHRUN, "elm.search", *SEARCH, f"hydra.run.dir={two}"], root)
    return one, two


def test_search_two_ranks_match_one(searches) -> None:
    one, two = searches
    a, b = _records(one, "epoch"), _records(two, "epoch")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b, strict=True):
        assert x["ffn"] == y["ffn"] and x["heads"] == y["heads"]
        for key, value in x["train_loss"].items():
            assert y["train_loss"][key] == pytest.approx(value, abs=1e-5)
        assert ("val_loss" in x) == ("val_loss" in y)  # scored after the last epoch (search.eval_when)
        for key, value in x.get("val_loss", {}).items():
            assert y["val_loss"][key] == pytest.approx(value, abs=1e-5)
    assert json.loads((one / "arch.json").read_text()) == json.loads((two / "arch.json").read_text())
    assert (two / "DONE").exists()


@pytest.fixture(scope="module")
def retrain_one(searches, tmp_path_factory) -> Path:
    """A tiny retrain of the 1-process search by 1 process: the reference run."""
    run = tmp_path_factory.mktemp("retrain") / "one"
    _run([sys.executable, "-m", "elm.retrain", *RETRAIN, f"search_dir={searches[0]}", f"hydra.run.dir={run}"],
         run.parent)  # fmt: skip
    return run


def _same_weights(run: Path, reference: Path, atol: float = 1e-4) -> None:
    a, b = (
        load_file(reference / "model" / "model.safetensors"),
        load_file(run / "model" / "model.safetensors"),
    )
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=atol, msg=f"{run.name}: {key}")


def test_retrain_two_ranks_and_accumulation_match_one(searches, retrain_one, tmp_path: Path) -> None:
    runs = {name: tmp_path / name for name in ("two", "accum", "two_accum")}
    common = [*RETRAIN, f"search_dir={searches[0]}"]
    _run([*TORCHRUN, "elm.retrain", *common, f"hydra.run.dir={runs['two']}"], tmp_path)
    _run([sys.executable, "-m", "elm.retrain", *common, "retrain.grad_accum=2", f"hydra.run.dir={runs['accum']}"],
         tmp_path)  # fmt: skip
    # 2 ranks x 2 micro-steps of 1 row: DDP's no_sync on the first micro-step of every step
    _run(
        [*TORCHRUN, "elm.retrain", *common, "retrain.grad_accum=2", f"hydra.run.dir={runs['two_accum']}"],
        tmp_path,
    )

    reference = _records(retrain_one, "train")
    assert len(reference) == 6 and set(reference[0]["train"]) == {"lm", "hidden", "point", "kd", "total"}
    for name, run in runs.items():
        steps = _records(run, "train")
        assert [r["step"] for r in steps] == [r["step"] for r in reference]
        for x, y in zip(reference, steps, strict=True):
            for key, value in x["train"].items():
                assert y["train"][key] == pytest.approx(value, abs=1e-5), (name, x["step"], key)
        for x, y in zip(_records(retrain_one, "val_loss"), _records(run, "val_loss"), strict=True):
            assert (
                y["val_loss"] == pytest.approx(x["val_loss"], abs=1e-5) and y["val_tokens"] == x["val_tokens"]
            )
        _same_weights(run, retrain_one)
        assert json.loads((run / "DONE").read_text())["stage"] == "retrain"


def test_retrain_preempted_on_two_ranks_resumes_on_one(searches, retrain_one, tmp_path: Path) -> None:
    """SIGTERM on every rank after step 2: checkpoint at the next step boundary (rank 0 writes it, with
    both ranks' RNG states), exit 143; ``resume=true`` in one process then ends like the reference."""
    run = tmp_path / "preempted"
    common = [*RETRAIN, f"search_dir={searches[0]}", "retrain.checkpoint_every=2", f"hydra.run.dir={run}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "ELM_FAULT_KILL_AT_STEP": "2", "ELM_FAULT_SIGNAL": "TERM"}  # fmt: skip
    proc = subprocess.run([*TORCHRUN, "elm.retrain", *common], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode != 0 and "preempted at step 3" in proc.stderr, proc.stderr[-3000:]
    state = torch.load(run / "retrain_state.pt", map_location="cpu", weights_only=False)
    assert state["step"] == 3 and len(state["rng"]) == 2 and not (run / "DONE").exists()
    _run([sys.executable, "-m", "elm.retrain", *common, "resume=true"], tmp_path)
    _same_weights(run, retrain_one)
    assert [r["step"] for r in _records(run, "train")] == [1, 2, 3, 4, 5, 6]
