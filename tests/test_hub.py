"""``hub.repo_id``: retrain and fine-tuning push their saved model with the real ``huggingface_hub``
client to a local stand-in hub (``tests/hub_standin.py``, ``HF_ENDPOINT``); offline mode, a missing
token, a bad id and an unreachable hub are one-line refusals before any training, and a push that
fails after training keeps the model and says how to retry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from hub_standin import HubStandIn
from omegaconf import OmegaConf

from elm import ArchConfig, ElmForMaskedLM, LayerConfig, config_from_arch
from elm.teacher import load_tokenizer
from elm.utils.hub import HubError, check_hub_settings, push_model, reach_hub

ROOT = Path(__file__).resolve().parents[1]
RETRAIN = ["retrain.epochs=1", "retrain.steps_per_epoch=2", "retrain.batch_size=4", "retrain.eval_batches=1",
           "teacher_head.fit=false", "data.max_docs=40", "data.seq_len=32", "progress=false"]  # fmt: skip
FINETUNE = ["task=bbc", "seeds=[0,1]", "data.max_train=16", "data.max_eval=16", "data.max_length=32",
            "train.max_steps=1", "train.batch_size=8", "train.save_model=true"]  # fmt: skip


def hub_env(tmp_path: Path, url: str | None, token: str | None = "hf_standin") -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    }
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", HF_HOME=str(tmp_path / "hf_home"))
    if url is not None:
        env["HF_ENDPOINT"] = url
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def run(module: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


@pytest.fixture(scope="module")
def arch_json(tmp_path_factory) -> Path:
    vocab = len(load_tokenizer())
    arch = ArchConfig(hidden_size=32, embedding_size=16, vocab_size=vocab, max_positions=128, layers=[
        LayerConfig("bert", num_heads=2, head_dim=16, ffn_dim=32)]).validate()  # fmt: skip
    path = tmp_path_factory.mktemp("arch") / "arch.json"
    arch.to_json(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, arch_json) -> Path:
    out = tmp_path_factory.mktemp("elm_tiny")
    torch.manual_seed(0)
    ElmForMaskedLM(config_from_arch(ArchConfig.from_json(arch_json))).save_pretrained(out)
    load_tokenizer().save_pretrained(out)
    return out


def test_retrain_pushes_its_export_to_the_hub(arch_json, tmp_path):
    with HubStandIn(tmp_path / "hub") as hub:
        out = tmp_path / "run"
        proc = run("elm.retrain", f"arch={arch_json}", *RETRAIN, "hub.repo_id=elm-tester/tiny", f"hydra.run.dir={out}",
                   env=hub_env(tmp_path, hub.url))  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert hub.repos["elm-tester/tiny"]["private"] is True
        commits = hub.repos["elm-tester/tiny"]["commits"]
    assert len(commits) == 1 and commits[0]["summary"].startswith("elm retrain: ")
    pushed, export = tmp_path / "hub" / "elm-tester" / "tiny", out / "model"
    local = sorted(p.relative_to(export).as_posix() for p in export.rglob("*") if p.is_file())
    assert sorted(commits[0]["files"]) == local and "model.safetensors" in local and "README.md" in local
    assert all((pushed / f).read_bytes() == (export / f).read_bytes() for f in local)
    meta = yaml.safe_load((pushed / "README.md").read_text().split("---")[1])  # the card a hub page shows
    assert meta["pipeline_tag"] == "fill-mask" and meta["license"] == "apache-2.0"
    done = json.loads((out / "DONE").read_text())
    assert done["hub"]["repo_id"] == "elm-tester/tiny" and done["hub"]["commit"] == commits[0]["oid"]


def test_finetune_pushes_the_chosen_seed_and_resume_pushes_again(model_dir, tmp_path):
    with HubStandIn(tmp_path / "hub") as hub:
        out = tmp_path / "run"
        args = [f"model={model_dir}", *FINETUNE, "hub.repo_id=elm-tester/cls", "hub.seed=1", "hub.private=false",
                f"hydra.run.dir={out}"]  # fmt: skip
        proc = run("elm.finetune", *args, env=hub_env(tmp_path, hub.url))
        assert proc.returncode == 0, proc.stderr[-3000:]
        results = json.loads((out / "results.json").read_text())
        assert (
            results["complete"]
            and results["hub"]["seed"] == 1
            and results["hub"]["repo_id"] == "elm-tester/cls"
        )
        pushed = tmp_path / "hub" / "elm-tester" / "cls"
        assert (pushed / "model.safetensors").read_bytes() == (
            out / "seed1" / "model" / "model.safetensors"
        ).read_bytes()
        config = json.loads((pushed / "config.json").read_text())
        assert config["id2label"]["0"] == results["label_names"][0]  # the pipeline prints topic names
        assert hub.repos["elm-tester/cls"]["private"] is False

        # the same finished run pushed to another repo: nothing retrains, the push happens
        proc = run("elm.finetune", *args[:-4], "hub.repo_id=elm-tester/cls2", "hub.seed=1", "resume=true",
                   f"hydra.run.dir={out}", env=hub_env(tmp_path, hub.url))  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert len(hub.repos["elm-tester/cls2"]["commits"]) == 1
        assert json.loads((out / "results.json").read_text())["hub"]["repo_id"] == "elm-tester/cls2"


@pytest.mark.parametrize("case, args, env_kw, needle", [
    ("offline", ["hub.repo_id=me/m"], {"offline": True}, "offline mode is on"),
    ("no token", ["hub.repo_id=me/m"], {"token": None}, "no Hugging Face token"),
    ("bad id", ["hub.repo_id=me/bad..name"], {}, "hub.repo_id='me/bad..name' is not a valid repo id"),
    ("no owner", ["hub.repo_id=model"], {}, "must be '<user or org>/<name>'"),
    ("unreachable", ["hub.repo_id=me/m"], {"url": "http://127.0.0.1:9"}, "cannot reach the hub"),
    ("read-only token", ["hub.repo_id=me/m"], {"url": "standin", "token": "hf_read"}, "the token is read-only"),
])  # fmt: skip
def test_retrain_refuses_a_push_it_cannot_make_before_training(
    arch_json, tmp_path, case, args, env_kw, needle
):
    with HubStandIn(tmp_path / "hub") as hub:
        url = hub.url if env_kw.get("url") == "standin" else env_kw.get("url")
        env = hub_env(tmp_path, url, env_kw.get("token", "hf_standin"))
        if env_kw.get("offline"):
            env["HF_HUB_OFFLINE"] = "1"
        out = tmp_path / "run"
        start = time.perf_counter()
        proc = run("elm.retrain", f"arch={arch_json}", *RETRAIN, *args, f"hydra.run.dir={out}", env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert (
        not (out / "model").exists() and time.perf_counter() - start < 60
    )  # before the teacher trains anything


def test_finetune_push_needs_saved_models_and_a_known_seed(model_dir, tmp_path):
    env = hub_env(tmp_path, "http://127.0.0.1:9")
    proc = run("elm.finetune", f"model={model_dir}", *FINETUNE[:-1], "hub.repo_id=me/m", f"hydra.run.dir={tmp_path / 'a'}",
               env=env)  # fmt: skip
    assert proc.returncode == 2 and "set train.save_model=true" in proc.stderr, proc.stderr
    proc = run("elm.finetune", f"model={model_dir}", *FINETUNE, "hub.repo_id=me/m", "hub.seed=7",
               f"hydra.run.dir={tmp_path / 'b'}", env=env)  # fmt: skip
    assert proc.returncode == 2 and "hub.seed=7 is not one of seeds=[0, 1]" in proc.stderr, proc.stderr


def test_a_failed_push_keeps_the_model_and_names_the_retry(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    hub = OmegaConf.create({"repo_id": "me/m", "private": True, "revision": "dev"})
    monkeypatch.setenv("HF_TOKEN", "hf_standin")
    monkeypatch.setattr(
        "huggingface_hub.constants.HF_HUB_OFFLINE", False
    )  # conftest's offline mode, read at import
    with HubStandIn(tmp_path / "hub") as standin:
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", standin.url)
        assert reach_hub(hub) == "elm-tester"
        standin.server.shutdown()  # the hub goes away between the check and the push
    with pytest.raises(HubError) as err:
        push_model(folder, hub, "msg")
    assert f"the model is saved in {folder}" in str(err.value)
    assert f"`hf upload me/m {folder} . --revision dev`" in str(err.value)
    assert (folder / "config.json").read_text() == "{}"


def test_no_repo_id_means_no_checks_and_no_push(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    none = OmegaConf.create({"repo_id": None, "private": True, "revision": None})
    check_hub_settings(none)
    assert reach_hub(none) is None and push_model(tmp_path, none, "m") is None
    with pytest.raises(ValueError, match="hub.private='yes' must be true or false"):
        monkeypatch.delenv("HF_HUB_OFFLINE")
        check_hub_settings(OmegaConf.create({"repo_id": "me/m", "private": "yes"}))


def test_a_learning_rate_sweep_publishes_only_the_final_model(model_dir, tmp_path):
    with HubStandIn(tmp_path / "hub") as hub:
        out = tmp_path / "run"
        proc = run("elm.finetune", f"model={model_dir}", *FINETUNE, "seeds=[0]", "train.lr_sweep=[1e-3,3e-3]",
                   "hub.repo_id=elm-tester/swept", f"hydra.run.dir={out}", env=hub_env(tmp_path, hub.url))  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert list(hub.repos) == ["elm-tester/swept"] and len(hub.repos["elm-tester/swept"]["commits"]) == 1
    assert (out / "lr_sweep").is_dir() and json.loads((out / "results.json").read_text())["hub"]["seed"] == 0
