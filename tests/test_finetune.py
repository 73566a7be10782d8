"""Fine-tuning end to end at tiny size: the real ``python -m elm.finetune`` on an exported ELM model
(BBC, 2 seeds), the Trainer's loss going down, a local SST-2 copy, a regression task, the metric
glue against scikit-learn / scipy, and one-line refusals of bad inputs."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from transformers import EvalPrediction, pipeline

from elm import ArchConfig, ElmForMaskedLM, ElmForSequenceClassification, LayerConfig, config_from_arch
from elm.finetune import count_parameters, run_finetune, trainer_metrics
from elm.teacher import load_tokenizer
from elm.utils.cli import CONFIG_DIR

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "sst2"
TINY = ["seeds=[0]", "data.max_train=32", "data.max_eval=32", "data.max_length=64", "train.max_steps=2",
        "train.batch_size=8", "train.eval_batch_size=32", "logger=none", "progress=false"]  # fmt: skip


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("finetune", overrides=[*TINY, *overrides])


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def tiny_arch(vocab: int) -> ArchConfig:
    return ArchConfig(hidden_size=32, embedding_size=16, vocab_size=vocab, max_positions=128, layers=[
        LayerConfig("bert", num_heads=2, head_dim=16, ffn_dim=32),
        LayerConfig("mobilebert", num_heads=1, head_dim=16, ffn_dim=32, num_ffn=2, bottleneck_size=16, share="kv"),
    ]).validate()  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer) -> Path:
    """An exported tiny ELM masked LM with the default teacher's tokenizer."""
    out = tmp_path_factory.mktemp("elm_tiny")
    torch.manual_seed(0)
    ElmForMaskedLM(config_from_arch(tiny_arch(len(tokenizer)))).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_cli_finetunes_bbc_over_two_seeds(model_dir, tokenizer, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "elm.finetune", f"model={model_dir}", "task=bbc", *TINY,
                           "seeds=[0,1]", "train.max_steps=3", "train.save_model=true", f"hydra.run.dir={out}"],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[elm.finetune] bbc: accuracy" in proc.stdout
    log_lines = (out / "__main__.log").read_text().splitlines()  # the run dir keeps the result, timed
    assert any(ln.startswith("[20") and "[elm.finetune] bbc: accuracy" in ln for ln in log_lines)
    res = json.loads((out / "results.json").read_text())
    assert res["complete"] and res["task"] == "bbc" and res["model"] == str(model_dir)
    assert res["metrics"] == ["accuracy", "f1_macro"] and res["num_labels"] == 5
    assert (res["train_size"], res["eval_size"]) == (32, 32)
    assert [r["seed"] for r in res["per_seed"]] == [0, 1]
    assert all(r["steps"] == 3 and r["train_time_s"] > 0 for r in res["per_seed"])
    for key in ("accuracy", "f1_macro", "score", "eval_loss"):
        values = [r["metrics"][key] if key in r["metrics"] else r[key] for r in res["per_seed"]]
        assert res["mean"][key] == pytest.approx(np.mean(values))
        assert res["std"][key] == pytest.approx(np.std(values, ddof=1))
    assert res["per_seed"][0]["score"] == pytest.approx(np.mean(list(res["per_seed"][0]["metrics"].values())))
    arch = tiny_arch(len(tokenizer))
    assert res["backbone_params"] == arch.num_parameters()
    assert res["params"] == arch.num_parameters("cls", num_labels=5) == count_parameters(str(model_dir), 5)[0]
    assert res["time_s"] > 0 and len((out / "metrics.jsonl").read_text().splitlines()) == 2
    classify = pipeline("text-classification", model=str(out / "seed0" / "model"))  # names, not LABEL_k
    assert classify.model.config.id2label == dict(enumerate(res["label_names"]))
    assert classify("Shares rose after the central bank cut rates.")[0]["label"] in res["label_names"]
    card = (out / "seed0" / "model" / "README.md").read_text()  # a card every saved model gets
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["pipeline_tag"] == "text-classification" and str(model_dir) not in card
    accuracy = meta["model-index"][0]["results"][0]["metrics"][0]
    assert accuracy["type"] == "accuracy" and accuracy["value"] == round(res["per_seed"][0]["metrics"]["accuracy"], 4)


def test_trainer_loss_decreases(model_dir, tmp_path):
    cfg = compose_cfg(f"model={model_dir}", "train.max_steps=-1", "train.epochs=30", "train.lr=5e-3",
                      "train.batch_size=16", "train.warmup=0", "train.logging_steps=1", "data.max_train=16",
                      "data.max_eval=16")  # fmt: skip
    res = run_finetune(cfg, tmp_path)
    losses = [loss for _, loss in res["per_seed"][0]["loss_curve"]]
    assert len(losses) == 30  # one step per epoch: 16 examples, batch 16
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.05, losses  # 1.58 -> 1.48 at seed 0


@pytest.mark.skipif(not SST2.is_dir(), reason="../shared/data/sst2 is not present")
def test_local_sst2(model_dir, tmp_path):
    res = run_finetune(compose_cfg(f"model={model_dir}", f"task={SST2}"), tmp_path)
    assert res["metrics"] == ["accuracy"] and res["num_labels"] == 2
    assert 0.0 <= res["mean"]["accuracy"] <= 1.0 and res["eval_size"] == 32


def test_regression_task_scores_pearson_spearman(model_dir, tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "stsb"  # a GLUE name: STS-B's text fields and metrics
    folder.mkdir()
    for split, n in (("train", 24), ("dev", 12)):
        with (folder / f"{split}.tsv").open("w", newline="") as fh:
            writer = csv.writer(fh, delimiter="\t")
            writer.writerow(["sentence1", "sentence2", "label"])
            for i in range(n):
                writer.writerow([f"a man plays guitar number {i}", f"someone is playing music {i % 5}",
                                 f"{rng.uniform(0, 5):.2f}"])  # fmt: skip
    res = run_finetune(compose_cfg(f"model={model_dir}", f"task={folder}"), tmp_path / "run")
    assert res["num_labels"] == 1 and res["metrics"] == ["pearson", "spearmanr"]
    assert all(np.isfinite(v) for v in res["per_seed"][0]["metrics"].values())


def test_trainer_metrics_match_sklearn_scipy():
    rng = np.random.default_rng(1)
    scores, gold = rng.normal(size=(40, 1)), rng.normal(size=40)
    pred = EvalPrediction(predictions=(scores, rng.normal(size=(40, 3, 4))), label_ids=gold)
    got = trainer_metrics(["pearson", "spearmanr"])(pred)
    assert got["pearson"] == pytest.approx(pearsonr(scores[:, 0], gold)[0])
    assert got["spearmanr"] == pytest.approx(spearmanr(scores[:, 0], gold)[0])
    logits, labels = rng.normal(size=(50, 2)), rng.integers(0, 2, 50)
    got = trainer_metrics(["accuracy", "f1", "matthews_correlation"])(EvalPrediction(logits, labels))
    preds = logits.argmax(-1)
    assert got == pytest.approx({"accuracy": accuracy_score(labels, preds), "f1": f1_score(labels, preds),
                                 "matthews_correlation": matthews_corrcoef(labels, preds)})  # fmt: skip


def test_bad_inputs_are_refused_before_training(model_dir, tokenizer, tmp_path):
    no_tok = tmp_path / "no_tokenizer"
    ElmForMaskedLM(config_from_arch(tiny_arch(len(tokenizer)))).save_pretrained(no_tok)
    three = tmp_path / "three_labels"
    ElmForSequenceClassification(config_from_arch(tiny_arch(len(tokenizer)), num_labels=3)).save_pretrained(
        three
    )
    tokenizer.save_pretrained(three)
    cases = {
        "does not exist": [f"model={tmp_path / 'missing'}"],
        "is not 'bbc'": [f"model={model_dir}", "task=no_such_task"],
        "no tokenizer files": [f"model={no_tok}"],
        "reinit_head=true": [f"model={three}"],
        "exceeds the model's 128 positions": [f"model={model_dir}", "data.max_length=256"],
        "seeds must be": [f"model={model_dir}", "seeds=[]"],
        "model=<dir> is required": [],
    }
    for message, overrides in cases.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            run_finetune(compose_cfg(*overrides), tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_cli_error_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "elm.finetune", f"model={tmp_path / 'missing'}",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("[elm.finetune] error:") and "does not exist" in lines[0]
