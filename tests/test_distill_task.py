"""Task distillation: the soft-label loss against a numpy reference, the layer map, masked-word
augmentation, the trainer's loss, and the real ``python -m elm.distill_task`` at tiny size (the
teacher fine-tuned once and reused from its cache; one-line refusals of bad inputs)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from elm import ArchConfig, ElmForMaskedLM, ElmForSequenceClassification, LayerConfig, config_from_arch
from elm.distill.losses import soft_label_loss
from elm.distill_task import KDWeights, layer_map
from elm.distill_task.augment import augment, continuation_vocabulary, word_positions, word_vocabulary
from elm.distill_task.trainer import DistillCollator, DistillTrainer
from elm.teacher import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY = ["seeds=[0]", "data.max_train=32", "data.max_eval=32", "data.max_length=64", "train.max_steps=2",
        "train.batch_size=8", "train.eval_batch_size=32", "logger=none", "progress=false",
        "teacher_finetune.train.max_steps=2"]  # fmt: skip


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}


# ---------------------------------------------------------------------------------------------
# The math
# ---------------------------------------------------------------------------------------------


def _reference_kd(s: np.ndarray, t: np.ndarray, temp: float) -> float:
    def log_softmax(x):
        x = x / temp
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    ls, lt = log_softmax(s), log_softmax(t)
    return float((np.exp(lt) * (lt - ls)).sum(axis=-1).mean() * temp**2)


@pytest.mark.parametrize("temp", [1.0, 2.0, 4.0])
def test_soft_label_loss_matches_numpy(temp):
    g = np.random.default_rng(0)
    s, t = g.normal(size=(6, 3)), g.normal(size=(6, 3)) * 3
    got = soft_label_loss(torch.tensor(s), torch.tensor(t), temp).item()
    assert got == pytest.approx(_reference_kd(s, t, temp), rel=1e-6)


def test_soft_label_loss_is_zero_at_the_teacher_and_its_gradient_flows():
    t = torch.randn(5, 4)
    same = t.clone().requires_grad_(True)
    loss = soft_label_loss(same, t, 2.0)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-7) and same.grad.abs().max().item() < 1e-6
    other = torch.zeros(5, 4, requires_grad=True)
    soft_label_loss(other, t, 2.0).backward()
    assert other.grad.abs().sum().item() > 0  # pulls the student towards the teacher
    with torch.no_grad():
        moved = other - 1.0 * other.grad
    assert soft_label_loss(moved, t, 2.0) < soft_label_loss(other.detach(), t, 2.0)


def test_soft_label_loss_regression_is_mse_and_shapes_are_checked():
    s, t = torch.tensor([[1.0], [2.0]]), torch.tensor([[0.0], [4.0]])
    assert soft_label_loss(s, t).item() == pytest.approx((1 + 4) / 2)
    with pytest.raises(ValueError, match="differ in shape"):
        soft_label_loss(torch.zeros(2, 3), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="temperature"):
        soft_label_loss(torch.zeros(2, 3), torch.zeros(2, 3), 0.0)


def test_layer_map_is_uniform():
    assert layer_map(6, 6) == [1, 2, 3, 4, 5, 6]
    assert layer_map(3, 6) == [2, 4, 6]
    assert layer_map(4, 6) == [2, 3, 5, 6]  # 1.5, 3, 4.5, 6 rounded half up
    assert layer_map(2, 1) == [1, 1]
    with pytest.raises(ValueError):
        layer_map(0, 6)


@pytest.mark.parametrize("bad, key", [({"soft": -1}, "kd.soft"), ({"temperature": 0}, "kd.temperature"),
                                      ({"soft": 0}, "all 0"), ({"hidden": "x"}, "kd.hidden")])  # fmt: skip
def test_kd_weights_are_checked(bad, key):
    with pytest.raises(ValueError, match=key):
        KDWeights(**bad).validate()


# ---------------------------------------------------------------------------------------------
# Augmentation and the trainer's loss
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def tiny_arch(vocab: int, layers: int = 2) -> ArchConfig:
    return ArchConfig(hidden_size=32, embedding_size=16, vocab_size=vocab, max_positions=128, layers=[
        LayerConfig("bert", num_heads=2, head_dim=16, ffn_dim=32) for _ in range(layers)]).validate()  # fmt: skip


def test_augment_replaces_whole_words_with_other_whole_words(tokenizer):
    torch.manual_seed(0)
    mlm = ElmForMaskedLM(config_from_arch(tiny_arch(len(tokenizer))))
    texts = ["the film is a charming and often affecting journey", "unflinchingly bleak and desperate", "12 34 !!"]
    rows = [dict(tokenizer(t)) for t in texts]
    kwargs = dict(n=3, prob=0.5, top_k=5, seed=1, batch_size=2)
    out = augment(rows, mlm, tokenizer, **kwargs)
    again = augment(rows, mlm, tokenizer, **kwargs)
    assert [v["input_ids"] for _, v in out] == [v["input_ids"] for _, v in again]  # seeded
    assert sorted({s for s, _ in out}) == [0, 1] and len(out) == 6  # "12 34 !!" has no word: no variant
    words, cont = word_vocabulary(tokenizer), continuation_vocabulary(tokenizer)
    for source, variant in out:
        old, new = rows[source]["input_ids"], variant["input_ids"]
        assert len(new) == len(old) and variant["token_type_ids"] == rows[source]["token_type_ids"]
        changed = [i for i, (a, b) in enumerate(zip(old, new)) if a != b]
        assert changed and set(changed) <= set(word_positions(old, words, cont))
        assert all(words[new[i]] for i in changed)


def test_augment_needs_wordpiece():
    gpt2 = load_tokenizer("gpt2-bpe")
    with pytest.raises(ValueError, match="WordPiece"):
        word_vocabulary(gpt2)


def test_trainer_loss_is_zero_at_the_teachers_logits_and_adds_the_hard_term(tokenizer, tmp_path):
    from transformers import TrainingArguments

    torch.manual_seed(0)
    model = ElmForSequenceClassification(config_from_arch(tiny_arch(len(tokenizer)), num_labels=3)).eval()
    rows = [dict(tokenizer(t), labels=i % 3) for i, t in enumerate(["a good film", "bad", "it is fine, i guess"])]
    batch = DistillCollator(tokenizer)(rows)
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")

    def loss(kd, hard):
        trainer = DistillTrainer(model=model, args=args, kd=kd)
        model.eval()
        inputs = {**batch, "teacher_logits": logits.clone(), "kd_hard": torch.tensor(hard)}
        return trainer.compute_loss(model, inputs).item()

    assert loss(KDWeights(soft=1.0), [1.0, 1.0, 1.0]) == pytest.approx(0.0, abs=1e-6)
    ce = torch.nn.functional.cross_entropy(logits[:2], batch["labels"][:2]).item()
    assert loss(KDWeights(soft=1.0, hard=0.5), [1.0, 1.0, 0.0]) == pytest.approx(0.5 * ce, rel=1e-5)
    with pytest.raises(ValueError, match="teacher"):
        DistillTrainer(model=model, args=args, kd=KDWeights(hidden=1.0))


# ---------------------------------------------------------------------------------------------
# The real command
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """A tiny exported student and a tiny 'pretrained' teacher encoder (another elm masked LM, so the
    teacher's fine-tuning takes seconds), both with the default teacher's tokenizer."""
    out = {}
    for name, seed, layers in (("student", 0, 2), ("teacher", 1, 4)):
        path = tmp_path_factory.mktemp(name)
        torch.manual_seed(seed)
        ElmForMaskedLM(config_from_arch(tiny_arch(len(tokenizer), layers))).save_pretrained(path)
        tokenizer.save_pretrained(path)
        out[name] = path
    return out


def _cli(args: list[str], out: Path, **fault: str) -> subprocess.CompletedProcess:
    """The real command with ``TINY`` settings, ``args`` winning over them."""
    keys = {a.split("=")[0].lstrip("+") for a in args}
    tiny = [t for t in TINY if t.split("=")[0].lstrip("+") not in keys]
    return subprocess.run([sys.executable, "-m", "elm.distill_task", *tiny, *args, f"hydra.run.dir={out}"],
                          cwd=ROOT, env={**env(), **fault}, capture_output=True, text=True, timeout=600)  # fmt: skip


def test_cli_distils_with_every_term_and_reuses_the_cached_teacher(dirs, tmp_path):
    cache = tmp_path / "teachers"
    args = [f"student={dirs['student']}", f"teacher={dirs['teacher']}", "task=bbc", f"teacher_finetune.cache_dir={cache}",
            "augment.enabled=true", "augment.n=2", "kd.hard=0.5", "kd.hidden=1.0", "kd.attention=1.0", "kd.temperature=2"]  # fmt: skip
    first = _cli(args, tmp_path / "one")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "[elm.distill_task] bbc: student accuracy" in first.stdout
    res = json.loads((tmp_path / "one" / "results.json").read_text())
    d = res["distillation"]
    assert res["complete"] and res["train_size"] == 32 and res["model"] == str(dirs["student"])
    assert d["variants"] > 32 and d["train_rows"] == 32 + d["variants"] and d["proposer"].startswith("teacher")
    assert d["kd"]["hidden"] == 1.0 and d["teacher"]["finetuned_here"] and d["teacher"]["reused"] is False
    assert set(d["teacher"]["metrics"]) >= {"accuracy", "f1_macro"}
    teacher_dir = Path(d["teacher"]["path"])
    record = json.loads((teacher_dir / "elm_task.json").read_text())
    assert record["task"] == "bbc" and record["num_labels"] == 5
    cached = Path(d["teacher"]["cache"]) / "results.json"
    before = (cached.read_bytes(), cached.stat().st_mtime_ns, (teacher_dir / "model.safetensors").stat().st_mtime_ns)

    second = _cli([*args, "seeds=[1]"], tmp_path / "two")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "reusing the fine-tuned teacher" in second.stderr + second.stdout
    d2 = json.loads((tmp_path / "two" / "results.json").read_text())["distillation"]
    assert d2["teacher"]["reused"] is True and d2["teacher"]["path"] == str(teacher_dir)
    assert (cached.read_bytes(), cached.stat().st_mtime_ns, (teacher_dir / "model.safetensors").stat().st_mtime_ns) == before

    # the fine-tuned teacher itself, given directly: used as is, no fine-tuning
    third = _cli([f"student={dirs['student']}", f"teacher={teacher_dir}", "task=bbc"], tmp_path / "three")
    assert third.returncode == 0, third.stderr[-3000:]
    d3 = json.loads((tmp_path / "three" / "results.json").read_text())["distillation"]
    assert d3["teacher"]["finetuned_here"] is False and not (tmp_path / "three" / "teacher").exists()


@pytest.fixture(scope="module")
def other_teachers(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """A teacher with a 3-label classifier, and one elm fine-tuned on SST-2 (2 labels, its record)."""
    out = {}
    for name, labels in (("three_labels", 3), ("sst2", 2)):
        path = tmp_path_factory.mktemp(name)
        ElmForSequenceClassification(config_from_arch(tiny_arch(len(tokenizer)), num_labels=labels)).save_pretrained(path)
        tokenizer.save_pretrained(path)
        out[name] = path
    (out["sst2"] / "elm_task.json").write_text(json.dumps({"task": "sst2", "label_names": ["negative", "positive"]}))
    return out


BAD = [
    (["tokenizer=gpt2-bpe"], "tokenizer"),
    (["teacher={three_labels}"], "3-label classifier"),
    (["kd.temperature=0"], "kd.temperature=0"),
    (["augment.enabled=true", "augment.prob=1.5"], "augment.prob=1.5"),
    (["kd.soft=0"], "all 0"),
    (["teacher={student}"], "the same model"),
]


@pytest.mark.parametrize("extra, expected", [b for b in BAD if b[1] is not None])
def test_bad_input_is_one_line_exit_2(dirs, other_teachers, tmp_path, extra, expected):
    paths = {**{k: str(v) for k, v in dirs.items()}, **{k: str(v) for k, v in other_teachers.items()}}
    extra = [e.format(**paths) for e in extra]
    args = [f"student={dirs['student']}", f"teacher={dirs['teacher']}", "task=bbc", *extra]
    proc = _cli([a for a in args if not any(a.split("=")[0] == e.split("=")[0] and a != e for e in extra)],
                tmp_path / "run")  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("[elm.distill_task]")]
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "results.json").exists()


def test_a_teacher_fine_tuned_on_another_task_is_refused(dirs, other_teachers, tmp_path):
    local = tmp_path / "task.tsv"  # a 2-label task that is not SST-2
    local.write_text("sentence\tlabel\n" + "".join(f"text number {i}\t{i % 2}\n" for i in range(40)))
    proc = _cli([f"student={dirs['student']}", f"teacher={other_teachers['sst2']}", f"task={local}"], tmp_path / "run")
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("[elm.distill_task]")]
    assert len(line) == 1 and "was fine-tuned on task 'sst2'" in line[0]


def test_sigkill_mid_seed_then_resume_matches_an_uninterrupted_run(dirs, tmp_path):
    cache = tmp_path / "teachers"
    args = [f"student={dirs['student']}", f"teacher={dirs['teacher']}", "task=bbc", f"teacher_finetune.cache_dir={cache}",
            "augment.enabled=true", "augment.n=1", "kd.hard=0.5", "train.max_steps=6", "train.save_steps=3",
            "train.logging_steps=1"]  # fmt: skip
    whole = _cli(args, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    run = tmp_path / "killed"
    killed = _cli(args, run, ELM_FAULT_KILL_AT_STEP="3")
    assert killed.returncode == -9 and not json.loads((run / "results.json").read_text())["complete"]
    refused = _cli(args, run)
    assert refused.returncode == 2 and "resume=true" in refused.stderr
    resumed = _cli([*args, "resume=true"], run)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (json.loads((p / "results.json").read_text()) for p in (tmp_path / "whole", run))
    assert a["per_seed"][0]["metrics"] == b["per_seed"][0]["metrics"]
    assert a["per_seed"][0]["loss_curve"] == b["per_seed"][0]["loss_curve"]
    assert a["distillation"]["train_rows"] == b["distillation"]["train_rows"]


@pytest.mark.distributed
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_torchrun_two_ranks(dirs, tmp_path):
    """The teacher's fine-tuning, the rows (built on rank 0, read by both) and the distillation
    under 2 ranks; rank 0 alone prints and writes."""
    out = tmp_path / "run"
    keys = {"train.batch_size", "hydra.run.dir"}
    cmd = ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "elm.distill_task",
           *[t for t in TINY if t.split("=")[0] not in keys], "train.batch_size=8", f"student={dirs['student']}",
           f"teacher={dirs['teacher']}", "task=bbc", "augment.enabled=true", "augment.n=1", f"hydra.run.dir={out}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("[elm.distill_task] results in") == 1
    res = json.loads((out / "results.json").read_text())
    assert res["complete"] and res["distillation"]["train_rows"] > 32
    assert (Path(res["distillation"]["teacher"]["path"]) / "elm_task.json").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
