"""The retrain stage end to end at tiny size: a real ``python -m elm.search`` run, then retraining
from it (CLI and Python API), resume, export round trip through the Auto classes, refusals."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer

from elm import ArchConfig
from elm.modeling import ElmForMaskedLM, config_from_arch
from elm.retrain import init_from_search, retrain
from elm.retrain.trainer import STATE_FILE, RetrainTrainer
from elm.teacher import TeacherCache
from elm.utils.cli import CONFIG_DIR
from elm.utils.logging import read_metrics

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
DATA = ["data.max_docs=40", "data.seq_len=64", "logger=none", "progress=false"]
TINY = ["retrain.epochs=2", "retrain.steps_per_epoch=3", "retrain.batch_size=4", "retrain.eval_batches=2",
        "retrain.log_every=1", "teacher_head.steps=3", *DATA]  # fmt: skip


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}


def run_cli(module: str, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *overrides], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("retrain", overrides=[*TINY, *overrides])


@pytest.fixture(scope="session")
def search_dir(tmp_path_factory) -> Path:
    """A finished tiny search (absolute layer-parameter budgets the tiny space can meet)."""
    out = tmp_path_factory.mktemp("search")
    proc = run_cli("elm.search", "space=tiny", "search.epochs=2", "search.steps_per_epoch=2", "search.batch_size=4",
                   "search.eval_batches=1", "search.analysis_batch_size=8", "search.budgets.small=40000",
                   "search.budgets.tiny=30000", "plots.enabled=false", *DATA, f"hydra.run.dir={out}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "DONE").is_file() and (out / "arch.json").is_file()
    return out


@pytest.mark.parametrize("projected", [False, True])
def test_rescaled_embeddings_keep_the_hidden_states_and_start_the_lm_head_near_ln_vocab(projected):
    """Trained-but-not-inherited embeddings at PyTorch's N(0, 1) (what a search from a GPT-2
    teacher leaves): scaling them down keeps every hidden state and brings the tied LM head's
    first loss from far above ln(vocab) to about it."""
    from elm import LayerConfig
    from elm.modeling import ElmForCausalLM
    from elm.retrain.init import rescale_embeddings

    layer = LayerConfig("bert", num_heads=2, head_dim=16, ffn_dim=64)
    arch = ArchConfig(hidden_size=32, embedding_size=16 if projected else 32, vocab_size=500, max_positions=64,
                      type_vocab_size=0, causal=True, layers=[layer, layer])  # fmt: skip
    torch.manual_seed(0)
    model = ElmForCausalLM(config_from_arch(arch, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()
    emb = model.elm.embeddings
    for table in (emb.word, emb.position):
        torch.nn.init.normal_(table.weight)  # PyTorch's default init, as the supernet's tables start
    if projected:
        torch.nn.init.normal_(emb.project.bias)
    ids = torch.randint(0, 500, (4, 24))
    with torch.no_grad():
        before = model(ids, labels=ids, output_hidden_states=True)
        factor = rescale_embeddings(emb, 0.02)
        after = model(ids, labels=ids, output_hidden_states=True)
    assert factor == pytest.approx(0.02, rel=0.05) and emb.word.weight.detach().std().item() == pytest.approx(0.02, rel=1e-4)
    for a, b in zip(before.hidden_states, after.hidden_states, strict=True):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)
    assert before.loss > math.log(500) + 4 and abs(float(after.loss) - math.log(500)) < 0.5


def test_init_from_search_copies_the_supernet_slices(search_dir, teacher, tmp_path):
    arch = ArchConfig.from_json(search_dir / "arch.json")
    model, info = init_from_search(search_dir, arch, teacher, ElmForMaskedLM)
    chosen = next(iter(json.loads((search_dir / "pareto.json").read_text())["chosen"].values()))
    assert info["choice"] == chosen["choice"] and info["candidates"] == chosen["candidates"]
    raw = torch.load(search_dir / "search_state.pt", map_location="cpu", weights_only=True)["supernet"]
    for li, (ci, layer) in enumerate(zip(info["choice"], arch.layers)):
        src, dst = f"layers.{li}.{ci}.", model.elm.layers[li]
        width, a, f = layer.width(arch.hidden_size), layer.attention_size, layer.ffn_dim
        qkv = raw[src + "attention.qkv.weight"]  # stored [projection, max heads, head dim, width]
        qkv = qkv.view(2 if layer.share != "none" else 3, -1, layer.head_dim, width)[:, : layer.num_heads]
        assert torch.equal(dst.attention.qkv.weight, qkv.reshape(-1, width))
        assert torch.equal(dst.attention.out.weight, raw[src + "attention.out.weight"][:, :a])
        assert torch.equal(dst.attention.norm.weight, raw[src + "attention.norm.weight"])
        for k, ffn in enumerate(dst.ffns):
            assert torch.equal(ffn.up.weight, raw[f"{src}ffns.{k}.up.weight"][:f])
            assert torch.equal(ffn.up.bias, raw[f"{src}ffns.{k}.up.bias"][:f])
            assert torch.equal(ffn.down.weight, raw[f"{src}ffns.{k}.down.weight"][:, :f])
        if layer.block == "mobilebert":
            assert torch.equal(dst.bottleneck_in.weight, raw[src + "bottleneck_in.weight"])
            assert torch.equal(dst.norm_out.bias, raw[src + "norm_out.bias"])
    # the embeddings are the supernet's: inherited from the teacher and distilled by the search
    assert info["embeddings"] == "supernet" and info["inherited_from_teacher"]
    for name, value in model.elm.embeddings.state_dict().items():
        assert torch.equal(value, raw[f"embeddings.{name}"]), name
    # ... unless asked otherwise: the HF init (std 0.02) instead
    fresh, info = init_from_search(search_dir, arch, teacher, ElmForMaskedLM, keep_embeddings=False)
    assert info["embeddings"] == "fresh init" and fresh.elm.embeddings.word.weight.std() < 0.05

    # retrain() starts from exactly these layers (0 epochs = export the initialised model)
    result = retrain(compose_cfg("retrain.epochs=0"), arch, tmp_path, search_dir)
    exported = load_file(Path(result["model_dir"]) / "model.safetensors")
    for name, value in model.state_dict().items():
        if name.startswith("elm.layers."):
            assert torch.equal(exported[name], value), name


def test_cli_retrain_and_export_round_trip(search_dir, tmp_path):
    run = tmp_path / "run"
    proc = run_cli("elm.retrain", f"search_dir={search_dir}", *TINY, "retrain.steps_per_epoch=4", "retrain.lr=3e-3",
                   "retrain.warmup_steps=1", f"hydra.run.dir={run}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    model_dir = run / "model"
    assert (
        (run / "DONE").is_file()
        and (model_dir / "DONE").is_file()
        and (run / "teacher_mlm_head.pt").is_file()
    )

    steps = [r for r in read_metrics(run) if "train" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    first, last = steps[0]["train"], steps[-1]["train"]
    assert {"lm", "hidden", "point", "kd", "total"} <= set(first)
    assert last["total"] < first["total"] and last["lm"] < first["lm"]

    # the export holds the final trained weights and loads through the Auto classes
    arch = ArchConfig.from_json(model_dir / "arch.json")
    assert arch == ArchConfig.from_json(search_dir / "arch.json")
    trained = ElmForMaskedLM(config_from_arch(arch))
    trained.load_state_dict(torch.load(run / STATE_FILE, map_location="cpu", weights_only=True)["model"])
    loaded = AutoModelForMaskedLM.from_pretrained(model_dir)
    assert type(loaded) is ElmForMaskedLM
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert len(tokenizer) == arch.vocab_size
    batch = tokenizer(["the bank raised interest rates", "a film about [MASK] football"], padding=True,
                      return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        expected = trained.eval()(**batch).logits
        assert torch.equal(loaded.eval()(**batch).logits, expected)
    classifier = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=3)
    out = classifier(**batch, labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3) and torch.isfinite(out.loss)

    card = (model_dir / "README.md").read_text()
    params = sum(p.numel() for p in loaded.elm.parameters())
    assert f"{params:,}" in card and f"{arch.num_parameters():,}" in card
    assert "| 0 | bert |" in card or "| 0 | mobilebert |" in card
    done = json.loads((run / "DONE").read_text())
    assert done["params"] == params and done["model_dir"] == str(model_dir)
    assert f"{done['val_loss']:.4f}" in card
    meta = yaml.safe_load(card.split("---")[1])  # Hugging Face front matter a hub page can read
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2" and meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "fill-mask" and "knowledge-distillation" in meta["tags"]
    ppl = meta["model-index"][0]["results"][0]["metrics"][0]
    assert ppl["type"] == "perplexity" and ppl["value"] == pytest.approx(math.exp(done["val_loss"]), rel=1e-3)
    assert str(search_dir) not in card and str(tmp_path) not in card and "/tmp/" not in card  # no local paths


def test_resume_continues_from_the_checkpoint(search_dir, tmp_path, monkeypatch):
    arch = ArchConfig.from_json(search_dir / "arch.json")
    head = ["teacher_head.fit=true"]
    full = retrain(compose_cfg(*head), arch, tmp_path / "full", search_dir)

    calls = {"n": 0}
    train_epoch = RetrainTrainer.train_epoch

    def crash_in_second_epoch(self):
        calls["n"] += 1
        if self.epoch == 1:
            raise KeyboardInterrupt("simulated crash")
        return train_epoch(self)

    run = tmp_path / "resumed"
    monkeypatch.setattr(RetrainTrainer, "train_epoch", crash_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        retrain(compose_cfg(*head), arch, run, search_dir)
    state = torch.load(run / STATE_FILE, map_location="cpu", weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 3) and not (run / "model").exists()
    monkeypatch.setattr(RetrainTrainer, "train_epoch", train_epoch)

    resumed = retrain(compose_cfg(*head, "resume=true"), arch, run, search_dir)
    epochs = [r for r in read_metrics(run) if "epoch" in r]
    assert [(r["epoch"], r["step"]) for r in epochs] == [(1, 3), (2, 6)]
    a = load_file(Path(full["model_dir"]) / "model.safetensors")
    b = load_file(Path(resumed["model_dir"]) / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-5, msg=name)
    assert resumed["val_loss"] == pytest.approx(full["val_loss"], abs=1e-5)
    assert set(resumed) == {"model_dir", "val_loss", "val_ppl", "params", "train_time_s"}


def test_a_shared_teacher_cache_trains_exactly_as_the_teacher(search_dir, tmp_path):
    """elm.compare's TeacherCache: a retraining on the batches of an earlier one reads every teacher
    state from the cache, and ends with the same weights, bit for bit, as a run without the cache."""
    arch = ArchConfig.from_json(search_dir / "arch.json")
    cfg = compose_cfg("teacher_head.fit=true", f"teacher_head.path={tmp_path / 'head.pt'}")
    cache = TeacherCache(2**30)
    retrain(cfg, arch, tmp_path / "first", search_dir, teacher_cache=cache)
    assert (cache.hits, cache.misses) == (0, 6)  # 2 epochs x 3 steps
    cached = retrain(cfg, arch, tmp_path / "cached", search_dir, teacher_cache=cache)
    assert (cache.hits, cache.misses) == (6, 6)
    plain = retrain(cfg, arch, tmp_path / "plain", search_dir)
    a = load_file(Path(plain["model_dir"]) / "model.safetensors")
    b = load_file(Path(cached["model_dir"]) / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert cached["val_loss"] == plain["val_loss"]


@pytest.mark.parametrize("case", ["no_done", "vocab", "missing_arch"])
def test_bad_inputs_are_refused_before_training(case, search_dir, tmp_path):
    args = [f"search_dir={search_dir}"]
    if case == "no_done":
        unfinished = tmp_path / "unfinished"
        shutil.copytree(search_dir, unfinished, ignore=shutil.ignore_patterns("DONE"))
        args, expect = [f"search_dir={unfinished}"], "DONE"
    elif case == "vocab":
        data = json.loads((search_dir / "arch.json").read_text())
        (tmp_path / "arch.json").write_text(json.dumps({**data, "vocab_size": 1000}))
        args, expect = [f"arch={tmp_path / 'arch.json'}"], "vocab_size=1000"
    else:
        args, expect = [f"arch={tmp_path / 'nope.json'}"], "does not exist"
    run = tmp_path / "run"
    proc = run_cli("elm.retrain", *args, *TINY, f"hydra.run.dir={run}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("[elm.retrain] error:")]
    assert len(errors) == 1 and expect in errors[0] and "Traceback" not in proc.stderr
    assert not (run / STATE_FILE).exists() and not (run / "metrics.jsonl").exists()


@pytest.mark.parametrize("signal_name", ["KILL", "TERM"])
def test_signal_mid_epoch_then_resume_matches(search_dir, tmp_path, signal_name):
    """A real SIGKILL (or SIGTERM: checkpoint + exit 143) at step 4 of 6, then resume=true,
    exports the same weights as an uninterrupted run."""
    common = [*TINY, "retrain.checkpoint_every=1", f"search_dir={search_dir}"]
    full = run_cli("elm.retrain", *common, f"hydra.run.dir={tmp_path / 'full'}")
    assert full.returncode == 0, full.stderr[-2000:]
    run = tmp_path / "stopped"
    proc = subprocess.run([sys.executable, "-m", "elm.retrain", *common, f"hydra.run.dir={run}"], cwd=ROOT,
                          env={**env(), "ELM_FAULT_KILL_AT_STEP": "4", "ELM_FAULT_SIGNAL": signal_name},
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == (-9 if signal_name == "KILL" else 143), proc.stderr[-2000:]
    assert not (run / "DONE").exists() and not (run / "model").exists()
    step = torch.load(run / STATE_FILE, map_location="cpu", weights_only=True)["step"]
    assert step == (4 if signal_name == "KILL" else 5)  # TERM is honoured at the next step boundary
    resumed = run_cli("elm.retrain", *common, "resume=true", f"hydra.run.dir={run}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_file(tmp_path / "full" / "model" / "model.safetensors")
    b = load_file(run / "model" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-5, msg=name)
    steps = [r["step"] for r in read_metrics(run) if "train" in r]
    assert steps == sorted(set(steps))  # no step logged twice after the resume


def test_compile_trains_like_eager(search_dir, tmp_path):
    """``compile=true`` (torch.compile, inductor on CPU) gives the eager run's losses."""
    common = [*TINY, "retrain.epochs=1", "retrain.dropout=0", "precision=fp32", f"search_dir={search_dir}"]
    losses = {}
    for flag in ("false", "true"):
        proc = run_cli("elm.retrain", *common, f"compile={flag}", f"hydra.run.dir={tmp_path / flag}")
        assert proc.returncode == 0, proc.stderr[-2000:]
        losses[flag] = [r["train"]["total"] for r in read_metrics(tmp_path / flag) if "train" in r]
    assert len(losses["true"]) == 3
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-4)


def test_bf16_master_weights_match_fp32(search_dir, tmp_path):
    """precision=bf16 on a CPU with native bf16 (forced here: ELM_CPU_BF16=1, emulated where the
    CPU lacks it) computes on a bf16 replica with fp32 master weights: the validation loss after the
    same steps is within 1% of fp32's. Without native bf16 the run is fp32 and says so."""
    common = [*TINY, "retrain.dropout=0", f"search_dir={search_dir}", "precision=bf16"]
    results = {}
    for forced in ("0", "1"):
        out = tmp_path / f"cpu_bf16_{forced}"
        proc = subprocess.run([sys.executable, "-m", "elm.retrain", *common, f"hydra.run.dir={out}"], cwd=ROOT,
                              env={**env(), "ELM_CPU_BF16": forced}, capture_output=True, text=True, timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        said = "precision=bf16 runs as fp32 here" in proc.stdout + proc.stderr + (out / "__main__.log").read_text()
        assert said == (forced == "0")
        results[forced] = [r for r in read_metrics(out) if "val_loss" in r]
        weights = load_file(out / "model" / "model.safetensors")
        assert all(w.dtype == torch.float32 for w in weights.values())  # the export is the fp32 master
    fp32, bf16 = results["0"][-1]["val_loss"], results["1"][-1]["val_loss"]
    assert bf16 == pytest.approx(fp32, rel=0.01)
    assert results["1"][0]["val_loss"] != results["0"][0]["val_loss"]  # it did run in bf16


@pytest.mark.parametrize("loss, override", [("kl", None), ("rkd", "distill.loss=mse")])
def test_retrain_distils_with_the_searchs_loss_unless_told(search_dir, tmp_path, monkeypatch, loss, override):
    """distill.loss=null takes the loss the search trained its blocks with (here a search state that
    says kl); distill.loss=mse leaves the point-wise term alone (no hidden term)."""
    import elm.distill.losses as losses

    searched = tmp_path / "search"
    shutil.copytree(search_dir, searched)
    state = torch.load(searched / "search_state.pt", map_location="cpu", weights_only=True)
    state["loss"] = loss
    torch.save(state, searched / "search_state.pt")
    calls = {"kl": 0}
    kl = losses.kl_hidden_loss

    def counting_kl(*args, **kwargs):
        calls["kl"] += 1
        return kl(*args, **kwargs)

    monkeypatch.setattr(losses, "kl_hidden_loss", counting_kl)
    arch = ArchConfig.from_json(searched / "arch.json")
    result = retrain(compose_cfg(*([override] if override else [])), arch, tmp_path / "run", searched)
    terms = [r["train"] for r in read_metrics(tmp_path / "run") if "train" in r]
    card = (Path(result["model_dir"]) / "README.md").read_text()
    assert f"hidden-state KD by `{'mse' if override else loss}`" in card
    if override is None:
        assert calls["kl"] > 0 and all("hidden" in t for t in terms)
    else:
        assert calls["kl"] == 0 and not any("hidden" in t for t in terms) and all("point" in t for t in terms)
    with pytest.raises(ValueError, match="distill.loss='cos' is unknown; valid: rkd, mse, kl"):
        retrain(compose_cfg("distill.loss=cos"), arch, tmp_path / "bad", searched)
    assert not (tmp_path / "bad" / STATE_FILE).exists() and result["val_loss"] > 0


def test_a_skipped_layer_is_absent_from_the_retrained_export(teacher, tmp_path):
    """space.blocks with the identity family and a budget that fits one BERT layer of two: the search
    skips a layer, retraining distils the kept layer towards the state it stands for, and the
    export is a one-layer model that the Auto classes load."""
    from elm.retrain.init import load_search_state, supernet_from_state
    from elm.search.score import model_chain, supernet_chain

    out = tmp_path / "search"
    proc = run_cli("elm.search", "space=tiny", "space.blocks=[bert,skip]", "space.shares=[none]", "cka.enabled=false",
                   "search.epochs=2", "search.steps_per_epoch=2", "search.batch_size=4", "search.eval_batches=1",
                   "search.analysis_batch_size=8", "search.budgets.small=30000", "search.budgets.tiny=null", *DATA,
                   f"hydra.run.dir={out}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "cka_heatmap.png").is_file()  # the heat map picks a layer the model has
    chosen = json.loads((out / "pareto.json").read_text())["chosen"]["small"]
    arch = ArchConfig.from_json(out / "arch.json")
    assert arch.num_layers == 1 and sum(key.endswith(".skip") for key in chosen["candidates"]) == 1
    model, info = init_from_search(out, arch, teacher, ElmForMaskedLM)
    state = load_search_state(out)
    kept = [li for li, key in enumerate(chosen["candidates"]) if not key.endswith(".skip")]
    assert info["choice"] == chosen["choice"] and info["boundaries"] == [*kept, 2]
    assert info["layer_map"] == [state["layer_map"][b] for b in info["boundaries"]]
    supernet = supernet_from_state(state, teacher).eval()
    ids = torch.randint(1000, 2000, (2, 12))
    mask = torch.ones_like(ids)
    chain, states = supernet_chain(supernet, info["choice"], ids, mask), model_chain(model.elm, ids, mask)
    for s, b in zip(states, info["boundaries"], strict=True):
        torch.testing.assert_close(s, chain[b], atol=1e-5, rtol=1e-5)

    result = retrain(compose_cfg("retrain.epochs=1"), arch, tmp_path / "retrain", out)
    assert math.isfinite(result["val_loss"])
    loaded = AutoModelForMaskedLM.from_pretrained(result["model_dir"])
    assert loaded.config.num_hidden_layers == 1 and len(loaded.elm.layers) == 1
