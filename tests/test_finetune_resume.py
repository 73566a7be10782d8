"""Crash recovery of ``python -m elm.finetune``: a real SIGKILL mid-seed (twice: in seed 0, then in
seed 1 of the resumed run) and ``resume=true`` end with the results of an uninterrupted run; SIGTERM
checkpoints and exits 143; an unfinished run dir is refused without ``resume=true``; torchrun with
2 ranks matches 1 process at the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from elm import ArchConfig, ElmForMaskedLM, LayerConfig, config_from_arch
from elm.finetune.checkpoint import MARKER, last_complete_checkpoint, train_loss
from elm.finetune.run import batch_sizes
from elm.teacher import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
# 32 examples, global batch 8: 4 steps per epoch, 8 steps; checkpoints at 3, 4 (epoch end), 6, 8
COMMON = ["task=bbc", "seeds=[0,1]", "data.max_train=32", "data.max_eval=32", "data.max_length=64",
          "train.epochs=2", "train.batch_size=8", "train.eval_batch_size=8", "train.lr=3e-3", "train.warmup=0",
          "train.save_steps=3", "train.logging_steps=2", "logger=none", "progress=false", "device=cpu"]  # fmt: skip


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", **extra}


def finetune(model: Path, run: Path, *extra: str, launcher: list[str] | None = None,
             **fault: str) -> subprocess.CompletedProcess:  # fmt: skip
    cmd = [*(launcher or [sys.executable]), "-m", "elm.finetune", f"model={model}", *COMMON,
           f"hydra.run.dir={run}", *extra]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, env=env(**fault), capture_output=True, text=True, timeout=600)


def results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def _export(out: Path, dropout: float) -> Path:
    tokenizer = load_tokenizer()
    arch = ArchConfig(hidden_size=32, embedding_size=16, vocab_size=len(tokenizer), max_positions=128, layers=[
        LayerConfig("bert", num_heads=2, head_dim=16, ffn_dim=32),
        LayerConfig("mobilebert", num_heads=1, head_dim=16, ffn_dim=32, num_ffn=2, bottleneck_size=16, share="kv"),
    ]).validate()  # fmt: skip
    torch.manual_seed(0)
    config = config_from_arch(arch, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    ElmForMaskedLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny exported ELM masked LM with the default dropout (0.1): resume must restore its RNG."""
    return _export(tmp_path_factory.mktemp("elm_tiny"), dropout=0.1)


@pytest.fixture(scope="module")
def uninterrupted(model_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted")
    proc = finetune(model_dir, run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def assert_same_results(a: dict, b: dict, curve: bool = True) -> None:
    assert b["complete"] and [r["seed"] for r in b["per_seed"]] == [0, 1]
    for x, y in zip(a["per_seed"], b["per_seed"], strict=True):
        assert y["steps"] == x["steps"] == 8
        assert y["metrics"] == pytest.approx(x["metrics"], abs=1e-5)
        for key in ("eval_loss", "train_loss", "score"):
            assert y[key] == pytest.approx(x[key], abs=1e-5), key
        if curve:
            assert [s for s, _ in y["loss_curve"]] == [s for s, _ in x["loss_curve"]]
            assert [v for _, v in y["loss_curve"]] == pytest.approx([v for _, v in x["loss_curve"]], abs=1e-5)
    for key, value in a["mean"].items():
        assert b["mean"][key] == pytest.approx(value, abs=1e-5)


def test_sigkill_in_each_seed_then_resume_matches(model_dir, uninterrupted, tmp_path):
    run = tmp_path / "crashed"
    killed = finetune(model_dir, run, ELM_FAULT_KILL_AT_STEP="6")  # seed 0, step 6 of 8 (mid epoch 2)
    assert killed.returncode == -9
    state = results(run)
    assert not state["complete"] and state["per_seed"] == []
    assert [p.name for p in (run / "seed0").iterdir()] == ["checkpoint-6"]
    assert json.loads((run / "seed0" / "checkpoint-6" / MARKER).read_text())["step"] == 6

    refused = finetune(model_dir, run)  # without resume=true the run is not overwritten
    assert refused.returncode == 2 and "resume=true" in refused.stderr

    # resumed: seed 0 finishes from checkpoint-6; killed again at step 6 of seed 1
    killed = finetune(model_dir, run, "resume=true", ELM_FAULT_KILL_AT_STEP="6")
    assert killed.returncode == -9
    state = results(run)
    assert [r["seed"] for r in state["per_seed"]] == [0] and not state["complete"]
    assert not (run / "seed0").exists()  # a finished seed's checkpoints are deleted
    assert (run / "seed1" / "checkpoint-6" / MARKER).is_file()

    resumed = finetune(model_dir, run, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = results(run)
    assert_same_results(results(uninterrupted), final)
    assert final["per_seed"][0] == state["per_seed"][0]  # seed 0 kept, not retrained
    assert [json.loads(line)["seed"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    assert not list(run.glob("seed*/checkpoint-*"))

    again = finetune(model_dir, run, "resume=true")  # complete: returned as is
    assert again.returncode == 0 and results(run) == final


def test_sigterm_checkpoints_exits_143_and_resumes(model_dir, uninterrupted, tmp_path):
    run = tmp_path / "preempted"
    stopped = finetune(model_dir, run, ELM_FAULT_KILL_AT_STEP="6", ELM_FAULT_SIGNAL="TERM")
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    message = stopped.stderr.strip().splitlines()[-1]
    # honoured at the next step end: step 7, mid epoch (the data position matters on resume)
    ckpt = run / "seed0" / "checkpoint-7"
    assert message.startswith("[elm.finetune] preempted at step 7 of seed 0")
    assert str(ckpt) in message and f"resume=true hydra.run.dir={run}" in message
    assert [p.name for p in (run / "seed0").iterdir()] == ["checkpoint-7"]
    for name in (MARKER, "trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        assert (ckpt / name).is_file(), name
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == 7

    resumed = finetune(model_dir, run, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    full, final = results(uninterrupted), results(run)
    assert_same_results(full, final, curve=False)
    # the stop adds a loss point at step 7 (a log line at every checkpoint keeps train_loss exact)
    steps = [s for s, _ in final["per_seed"][0]["loss_curve"]]
    assert steps == sorted({s for s, _ in full["per_seed"][0]["loss_curve"]} | {7})


def test_unfinished_run_dir_is_refused_without_resume(model_dir, tmp_path):
    run = tmp_path / "unfinished"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"per_seed": [], "complete": False}))
    proc = finetune(model_dir, run)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("[elm.finetune] error:") and "Traceback" not in proc.stderr
    assert "unfinished" in lines[0] and "pass resume=true" in lines[0] and "hydra.run.dir" in lines[0]
    assert json.loads((run / "results.json").read_text()) == {"per_seed": [], "complete": False}


def test_last_complete_checkpoint_skips_half_written_ones(tmp_path):
    seed_dir = tmp_path / "seed0"
    for step in (3, 6, 9):
        (seed_dir / f"checkpoint-{step}").mkdir(parents=True)
    for step in (3, 6):
        (seed_dir / f"checkpoint-{step}" / MARKER).write_text(json.dumps({"step": step}))
    (seed_dir / "checkpoint-9" / "trainer_state.json").write_text('{"global_st')  # killed mid-save
    assert last_complete_checkpoint(seed_dir) == seed_dir / "checkpoint-6"
    assert last_complete_checkpoint(seed_dir, clean=True) == seed_dir / "checkpoint-6"
    assert sorted(p.name for p in seed_dir.iterdir()) == ["checkpoint-6"]
    assert last_complete_checkpoint(tmp_path / "missing") is None


def test_batch_size_is_global_and_train_loss_covers_all_steps():
    t = OmegaConf.create({"batch_size": 32, "grad_accum": 2, "eval_batch_size": 64})
    assert batch_sizes(t, 1) == (16, 64) and batch_sizes(t, 2) == (8, 32)  # per device
    assert batch_sizes(OmegaConf.create({**t, "eval_batch_size": 5}), 2) == (8, 3)
    with pytest.raises(
        ValueError, match=r"global batch: it must be divisible by world size x train.grad_accum \(3 x 2\)"
    ):
        batch_sizes(t, 3)
    history = [{"loss": 2.0, "step": 1}, {"loss": 1.0, "step": 3}, {"train_loss": 9.0, "step": 3}]
    assert train_loss(history) == pytest.approx((2.0 + 2 * 1.0) / 3)


@pytest.mark.distributed
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_torchrun_two_ranks_match_one(tmp_path):
    """Dropout 0: with dropout the masks of 2 ranks (each seeded alike by the Trainer, drawing for its
    own 4 rows) differ from those of 1 process drawing for 8 rows: an equally valid, different sample. Without it, 2 ranks x 4 rows = the same 8-row global batches (accelerate's
    BatchSamplerShard deals consecutive per-rank batches of the same seeded order), the same steps."""
    model = _export(tmp_path / "model", dropout=0.0)
    one = finetune(model, tmp_path / "one", "precision=fp32")  # exact arithmetic: bf16 rounds per rank
    assert one.returncode == 0, one.stderr[-3000:]
    two = finetune(model, tmp_path / "two", "precision=fp32",
                   launcher=["torchrun", "--standalone", "--nproc_per_node", "2"])
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("[elm.finetune] results in") == 1  # rank 0 prints
    a, b = results(tmp_path / "one"), results(tmp_path / "two")
    assert_same_results(a, b)
    assert len((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) == 2  # rank 0 writes
    assert not list((tmp_path / "two").glob("seed*/checkpoint-*"))
