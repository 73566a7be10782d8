"""Bad input through the real CLIs: exit != 0, one clear line naming the value, no finished outputs.

Table-driven: each row is (stage, overrides, text the last stderr line must contain).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY = ["space=tiny", "search.epochs=1", "search.steps_per_epoch=1", "search.batch_size=4", "data.max_docs=40",
        "data.seq_len=64", "logger=none", "progress=false", "search.budgets.small=45000",
        "search.budgets.tiny=30000", "device=cpu"]  # fmt: skip

CASES = [
    ("search", ["space.blocks=[bert,transformerxl]"], "transformerxl"),
    ("search", ["space.shares=[none,qk]"], "qk"),
    ("search", ["space.families.mobilebert.heads=0"], "space.families.mobilebert.heads must be a positive integer, got 0"),
    ("search", ["+space.families.gpt={heads: 2}"], "unknown block famil(ies) ['gpt']"),
    ("search", ["search.budgets.small=10"], "below the smallest architecture"),
    ("search", ["search.budgets.small=9e12"], "above the largest architecture"),
    ("search", ["data.seq_len=4096"], "4096"),
    ("search", ["teacher.name=/no/such/teacher"], "/no/such/teacher"),
    ("search", ["teacher.name=someone/not-a-real-model"], "someone/not-a-real-model"),
    ("search", ["data.source=/no/such/corpus.txt"], "/no/such/corpus.txt"),
    ("search", ["distill.loss=cosine"], "cosine"),
    ("search", ["space.nonsense=1"], "nonsense"),
    ("search", ["search.strategy=greedy"], "greedy"),
    ("search", ["cka.when=evry_epoch"], "evry_epoch"),
    ("search", ["pca.top_k=-3"], "pca.top_k=-3"),
    ("search", ["pca.scope=everywhere"], "everywhere"),
    ("search", ["space.ffn_unit=1000"], "pca.unit=1000"),
    ("search", ["cka.min_heads=9"], "cka.min_heads=9"),
    ("search", ["search.chain_prob=1.5"], "1.5"),
    ("search", ["search.budget_reference=galaxy"], "galaxy"),
    ("search", ["space.hidden_size=512"], "wider than the teacher"),
    ("search", ["search.eval_batches=0"], "search.eval_batches=0"),
    ("search", ["search.epochs=0"], "search.epochs=0"),
    ("search", ["search.batch_size=-2"], "search.batch_size=-2"),
    ("search", ["search.lr=0"], "search.lr=0"),
    ("search", ["search.analysis_batch_size=1"], "search.analysis_batch_size=1"),
    ("search", ["search.checkpoint_every=0"], "search.checkpoint_every=0"),
    ("search", ["inherit.batches=0"], "inherit.batches=0"),
    ("search", ["data.val_fraction=0.9"], "data.val_fraction=0.9"),
    ("search", ["plots.cka_layer=7"], "plots.cka_layer=7"),
    ("search", ["plots.compare_with=[/no/such/run]"], "/no/such/run"),
    ("retrain", ["arch=/no/such/arch.json"], "/no/such/arch.json"),
    ("finetune", ["model=/no/such/model"], "/no/such/model"),
    ("finetune", ["model=default", "task=/no/such/task.tsv"], "/no/such/task.tsv"),
    # Hydra-level mistakes: one line and exit 2 too (elm.utils.cli.check_overrides)
    ("search", ["search.epocs=3"], "search.epocs"),
    ("search", ["space=huge"], "space/huge"),
    ("search", ["seed=1,2"], "seed=1,2"),
    ("search", ["search.epochs=[1"], "[1"),
    ("search", ["device=tpu"], "device='tpu'"),
    ("search", ["search.budgets.small=inf"], "search.budgets.small=inf"),
    ("search", ["data.seq_len=long"], "data.seq_len='long'"),
    ("retrain", ["retrain.epoch=2"], "retrain.epoch"),
    ("finetune", ["model=default", "train.lr_sweeep=[1e-3]"], "train.lr_sweeep"),
    ("distill_task", ["student=default", "kd.sof=1"], "kd.sof"),
    ("distill_task", ["student=default", "augment.n=0"], "augment.n=0"),
    ("distill_task", ["student=default", "train.lr=-1"], "train.lr=-1"),
    ("finetune", ["model={truncated}"], "is truncated or corrupt"),
    ("search", ["teacher.name={truncated}"], "is truncated or corrupt"),
    ("compare", ["search_dir=/no/such/run", "modles=[searched]"], "modles"),
    # every retrain / fine-tuning setting before the teacher loads
    ("retrain", ["arch={arch_file}", "retrain.epochs=-1"], "retrain.epochs=-1"),
    ("retrain", ["arch={arch_file}", "retrain.lr=-1"], "retrain.lr=-1"),
    ("retrain", ["arch={arch_file}", "retrain.schedule=step"], "retrain.schedule='step'"),
    ("retrain", ["arch={arch_file}", "teacher_head.steps=0"], "teacher_head.steps=0"),
    ("retrain", ["arch={arch_file}", "distill.temperature=0"], "distill.temperature=0"),
    ("finetune", ["model=default", "train.lr=0"], "train.lr=0"),
    ("finetune", ["model=default", "data.max_train=0"], "data.max_train=0"),
    ("finetune", ["model=default", "precision=fp8"], "fp8"),
    ("causal.evaluate", ["nonsense_key=1"], "nonsense_key"),
    # the causal commands: every setting before a model, tokenizer or corpus loads (elm/causal/settings.py)
    ("causal.teacher_train", ["model.n_head=5"], "model.n_head=5"),
    ("causal.teacher_train", ["tokenizer=bpe:100"], "bpe:100"),
    ("causal.teacher_train", ["train.lr=0"], "train.lr=0"),
    ("causal.teacher_train", ["data.seq_len=512"], "model.n_positions=256"),
    ("causal.teacher_train", ["train.max_time_s=-5"], "train.max_time_s=-5"),
    ("causal.minillm", ["student=/no/such/student", "teacher.name={a_dir}"], "/no/such/student"),
    ("causal.minillm", ["student={a_dir}", "teacher.name=/no/such/teacher"], "/no/such/teacher"),
    ("causal.minillm", ["student={a_dir}", "teacher.name={a_dir}", "minillm.mix_alpha=1"], "minillm.mix_alpha=1"),
    ("causal.minillm", ["student={a_dir}", "teacher.name={a_dir}", "minillm.objective=sft"], "sft"),
    ("causal.minillm", ["student={a_dir}", "teacher.name={a_dir}", "minillm.steps=-1"], "minillm.steps=-1"),
    ("causal.minillm", ["student={a_dir}", "teacher.name={a_dir}", "prompts.response_end=tab"], "tab"),
    ("causal.minillm", ["student={a_dir}", "teacher.name={a_dir}", "prompts.source=/no/such/p.jsonl"], "/no/such/p.jsonl"),
    ("causal.minillm", ["student={a_dir}", "teacher.name={a_dir}", "prompts.template='{{no-pe}}'"], "no-pe"),
    ("causal.evaluate", ["model={a_dir}", "eval.top_p=0"], "eval.top_p=0"),
    ("causal.evaluate", ["model={a_dir}", "eval.temperature=0"], "eval.temperature=0"),
    ("causal.evaluate", ["model={a_dir}", "eval.gen_batch_size=0"], "eval.gen_batch_size=0"),
    ("causal.evaluate", ["model={a_dir}", "prompts=jsonl"], "prompts.source is not set"),
    ("causal.pipeline", ['retrain.overrides=["retrain.lr=-1"]'], "retrain.overrides: retrain.lr=-1"),
    ("causal.pipeline", ['search.overrides=["search.epochs=0"]'], "search.overrides: search.epochs=0"),
    ("causal.pipeline", ['teacher.train_overrides=["model.n_head=5"]'], "teacher.train_overrides: model.n_embd=192"),
    ("causal.pipeline", ["search.budget=huge"], "search.budget='huge'"),
    ("causal.pipeline", ["uniform.tolerance=0"], "uniform.tolerance=0"),
]


def _cli(stage: str, overrides: list[str], run_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    base = TINY if stage == "search" else []
    cmd = [sys.executable, "-m", f"elm.{stage}", *base, *overrides, f"hydra.run.dir={run_dir}"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def arch_file(tmp_path_factory) -> Path:
    return _tiny_arch(tmp_path_factory.mktemp("arch") / "arch.json")


@pytest.fixture(scope="module")
def a_dir(tmp_path_factory) -> Path:
    """An existing directory (the causal checks refuse a bad setting before reading what is inside)."""
    return tmp_path_factory.mktemp("a_dir")


@pytest.fixture(scope="module")
def truncated(tmp_path_factory) -> Path:
    """A saved model whose safetensors file lost its second half (an interrupted copy)."""
    import torch

    from elm import ArchConfig, ElmForMaskedLM, LayerConfig, config_from_arch

    out = tmp_path_factory.mktemp("truncated")
    arch = ArchConfig(hidden_size=32, embedding_size=16, vocab_size=30522, max_positions=128,
                      layers=[LayerConfig("bert", num_heads=2, head_dim=16, ffn_dim=32)]).validate()  # fmt: skip
    torch.manual_seed(0)
    ElmForMaskedLM(config_from_arch(arch)).save_pretrained(out)
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return out


@pytest.mark.parametrize(("stage", "overrides", "expected"), CASES, ids=[" ".join(c[1]) for c in CASES])
def test_bad_input_fails_early_and_clearly(
    stage: str, overrides: list[str], expected: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    run_dir = tmp_path / "run"
    names = {n for o in overrides for n in re.findall(r"\{(\w+)\}", o)}  # fixtures the case needs
    if names:
        overrides = [o.format(**{n: request.getfixturevalue(n) for n in names}) for o in overrides]
    proc = _cli(stage, overrides, run_dir)
    assert proc.returncode == 2, proc.stderr[-1500:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith(f"[elm.{stage}] error:")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr[-1500:]
    assert "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr
    for finished in ("DONE", "arch.json", "search_state.pt", "retrain_state.pt", "results.json"):
        assert not (run_dir / finished).exists(), finished


def test_arch_from_another_vocabulary_is_refused(tmp_path: Path) -> None:
    import elm

    arch = elm.ArchConfig(hidden_size=32, embedding_size=16, vocab_size=1000, max_positions=64,
                          layers=[elm.LayerConfig("bert", 2, 16, 32)])  # fmt: skip
    arch.to_json(tmp_path / "arch.json")
    proc = _cli("retrain", [f"arch={tmp_path / 'arch.json'}"], tmp_path / "run")
    assert proc.returncode == 2
    assert "1000" in proc.stderr.strip().splitlines()[-1]


def test_retrain_state_is_never_overwritten_and_corruption_is_named(tmp_path: Path) -> None:
    import elm

    arch = elm.ArchConfig(hidden_size=32, embedding_size=16, vocab_size=30522, max_positions=128,
                          layers=[elm.LayerConfig("bert", 2, 16, 32)])  # fmt: skip
    arch.to_json(tmp_path / "arch.json")
    run = tmp_path / "run"
    run.mkdir()
    (run / "retrain_state.pt").write_bytes(b"not a checkpoint")
    tiny = [f"arch={tmp_path / 'arch.json'}", "data.max_docs=40", "data.seq_len=64", "logger=none"]
    fresh = _cli("retrain", tiny, run)
    assert fresh.returncode == 2 and "resume=true" in fresh.stderr.strip().splitlines()[-1]
    resumed = _cli("retrain", [*tiny, "resume=true"], run)
    assert resumed.returncode == 2 and "corrupt" in resumed.stderr.strip().splitlines()[-1]
    assert (run / "retrain_state.pt").read_bytes() == b"not a checkpoint"  # left for the user to inspect
    assert not (run / "DONE").exists()


@pytest.mark.parametrize("stage", ["compare", "causal.minillm", "causal.evaluate"])
def test_single_process_stages_refuse_torchrun(stage: str, tmp_path: Path) -> None:
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", f"elm.{stage}", f"hydra.run.dir={tmp_path / 'run'}"], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2
    assert "not torchrun" in proc.stderr.strip().splitlines()[-1] and "Traceback" not in proc.stderr


# ---- finished work is never overwritten, not even Hydra's record of it ----------------------------


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


FINISHED = [
    ("search", "DONE", '{"stage": "search"}'),
    ("retrain", "DONE", '{"stage": "retrain"}'),
    ("compare", "DONE", '{"stage": "compare"}'),
    ("finetune", "results.json", '{"per_seed": [], "complete": true}'),
    ("distill_task", "results.json", '{"per_seed": [], "complete": true}'),
    ("causal.pipeline", "DONE", '{"stage": "causal_pipeline"}'),
]


@pytest.mark.parametrize(("stage", "marker", "text"), FINISHED, ids=[f[0] for f in FINISHED])
def test_a_finished_run_dir_is_refused_before_hydra_writes(stage: str, marker: str, text: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("the finished run's settings\n")
    (run / marker).write_text(text)
    before = _snapshot(run)
    proc = _cli(stage, ["seed=7"], run)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and f"hydra.run.dir={run} already holds a finished run ({marker})" in lines[0]
    assert _snapshot(run) == before  # byte-identical, nothing added (no .hydra rewrite, no log)


def test_resume_keeps_the_first_runs_hydra_record(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("the first run's settings\n")
    proc = _cli("search", ["resume=true", "search.strategy=greedy"], run)  # refused after Hydra starts
    assert proc.returncode == 2 and "greedy" in proc.stderr.strip().splitlines()[-1]
    assert (run / ".hydra" / "config.yaml").read_text() == "the first run's settings\n"
    (resumed,) = (run / ".hydra").glob("resume-*")  # this call's own record, beside the first
    assert "greedy" in (resumed / "overrides.yaml").read_text()


# ---- no code runs from a file a user points elm at ------------------------------------------------


class _Payload:
    """Pickles to ``os.system("touch <marker>")``: runs on any ``weights_only=False`` load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _tiny_arch(path: Path) -> Path:
    import elm

    arch = elm.ArchConfig(hidden_size=32, embedding_size=16, vocab_size=30522, max_positions=128,
                          layers=[elm.LayerConfig("bert", 2, 16, 32)])  # fmt: skip
    arch.to_json(path)
    return path


def _payload_case(kind: str, tmp_path: Path) -> tuple[str, list[str], Path]:
    import torch

    marker = tmp_path / "pwned"
    evil = {"supernet": _Payload(marker), "meta": _Payload(marker), "model": _Payload(marker)}
    run = tmp_path / "run"
    if kind == "search resume":
        run.mkdir()
        torch.save(evil, run / "search_state.pt")
        return "search", ["resume=true", "search.eval_batches=1", "search.analysis_batch_size=8"], marker
    arch = _tiny_arch(tmp_path / "arch.json")
    retrain = [f"arch={arch}", "data.max_docs=40", "data.seq_len=64", "logger=none", "progress=false",
               "retrain.epochs=1", "retrain.steps_per_epoch=1", "retrain.batch_size=4", "device=cpu"]  # fmt: skip
    if kind == "retrain search_dir":
        search = tmp_path / "search"
        search.mkdir()
        (search / "DONE").write_text("{}")
        _tiny_arch(search / "arch.json")
        torch.save(evil, search / "search_state.pt")
        return "retrain", [*retrain, f"search_dir={search}"], marker
    if kind == "retrain resume":
        run.mkdir()
        torch.save(evil, run / "retrain_state.pt")
        return "retrain", [*retrain, "resume=true"], marker
    torch.save(evil, tmp_path / "head.pt")  # "teacher_head.path"
    return "retrain", [*retrain, f"teacher_head.path={tmp_path / 'head.pt'}"], marker


@pytest.mark.parametrize("kind", ["search resume", "retrain search_dir", "retrain resume", "teacher_head.path"])
def test_a_pickle_payload_in_a_state_file_never_runs(kind: str, tmp_path: Path) -> None:
    stage, overrides, marker = _payload_case(kind, tmp_path)
    proc = _cli(stage, overrides, tmp_path / "run")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert not marker.exists()  # the payload did not run
    last = proc.stderr.strip().splitlines()[-1]
    assert "corrupt or unreadable" in last and "Traceback" not in proc.stderr


# ---- input files that are not what they claim to be ------------------------------------------------

TASK_FILES = [
    ("0,1,,1", "empty label"),
    ("0,0,0,0", "one label value"),
    ("0,1000000,0,1000000", "1000000"),
    ("-1,1,-1,1", "[-1, 1]"),
]


@pytest.mark.parametrize(("labels", "expected"), TASK_FILES, ids=[t[1] for t in TASK_FILES])
def test_bad_task_labels_are_refused(labels: str, expected: str, tmp_path: Path) -> None:
    rows = [f"sentence number {i},{lab}" for i, lab in enumerate(labels.split(",") * 5)]
    (tmp_path / "task.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    proc = _cli("finetune", ["model=default", f"task={tmp_path / 'task.csv'}"], tmp_path / "run")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert expected in last and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "results.json").exists()


def test_a_task_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    (tmp_path / "task.tsv").write_bytes(b"sentence\tlabel\nfine\t1\n\xff\xfe broken\t0\n")
    proc = _cli("finetune", ["model=default", f"task={tmp_path / 'task.tsv'}"], tmp_path / "run")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{tmp_path / 'task.tsv'}' is not UTF-8 text" in proc.stderr.strip().splitlines()[-1]


def test_random_bytes_are_not_a_corpus(tmp_path: Path) -> None:
    (tmp_path / "corpus.txt").write_bytes(np.random.default_rng(0).bytes(200_000))
    proc = _cli("search", [f"data.source={tmp_path / 'corpus.txt'}"], tmp_path / "run")
    assert proc.returncode == 2
    assert "does not look like text" in proc.stderr.strip().splitlines()[-1]


# ---- resume compares the settings that shape the run ------------------------------------------------

SEARCH_OK = ["search.eval_batches=1", "search.analysis_batch_size=8"]


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("finished")
    search = _cli("search", [*SEARCH_OK, "plots.enabled=false"], root / "search")
    assert search.returncode == 0, search.stderr[-2000:]
    arch = _tiny_arch(root / "arch.json")
    retrain = _cli("retrain", [f"arch={arch}", "data.max_docs=40", "data.seq_len=64", "logger=none", "progress=false",
                               "retrain.epochs=1", "retrain.steps_per_epoch=1", "retrain.batch_size=4",
                               "retrain.eval_batches=1", "teacher_head.fit=false", "device=cpu"], root / "retrain")  # fmt: skip
    assert retrain.returncode == 0, retrain.stderr[-2000:]
    return {"search": root / "search", "retrain": root / "retrain", "arch": arch}


RESUMES = [
    ("search", ["seed=1"], "seed: 0 -> 1"),
    ("search", ["data.max_docs=30"], "data.max_docs: 40 -> 30"),
    ("search", ["search.batch_size=2"], "search.batch_size: 4 -> 2"),
    ("search", ["search.epochs=2"], "search.epochs: 1 -> 2"),
    ("search", ["search.steps_per_epoch=2"], "search.steps_per_epoch: 1 -> 2"),
    ("search", ["distill.point=0"], "distill.point: 1.0 -> 0"),
    ("retrain", ["retrain.lr=1e-3"], "retrain.lr: 0.0005 -> 0.001"),
    ("retrain", ["seed=2"], "seed: 0 -> 2"),
    ("retrain", ["data.seq_len=32"], "data.seq_len: 64 -> 32"),
]


@pytest.mark.parametrize(("stage", "changed", "expected"), RESUMES, ids=[" ".join(r[1]) for r in RESUMES])
def test_resume_with_other_settings_is_refused_and_keeps_the_run(
    stage: str, changed: list[str], expected: str, finished_runs: dict[str, Path]
) -> None:
    run = finished_runs[stage]
    keep = {k: v for k, v in _snapshot(run).items() if not k.startswith(".hydra/resume-") and k != "__main__.log"}
    same = SEARCH_OK if stage == "search" else [f"arch={finished_runs['arch']}", "data.max_docs=40", "data.seq_len=64",
                                                "logger=none", "retrain.epochs=1", "retrain.steps_per_epoch=1",
                                                "retrain.batch_size=4", "retrain.eval_batches=1",
                                                "teacher_head.fit=false"]  # fmt: skip
    proc = _cli(stage, [*same, *changed, "resume=true"], run)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "other settings" in last and expected in last and "Traceback" not in proc.stderr
    after = _snapshot(run)
    assert all(after[k] == v for k, v in keep.items())  # the finished run is untouched


def test_bench_and_a_comma_in_the_run_dir_are_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    bench = subprocess.run([sys.executable, "-m", "elm.bench", "--device", "tpu"], env=env, capture_output=True,
                           text=True, timeout=300)  # fmt: skip
    assert bench.returncode == 2 and bench.stderr.strip().splitlines() == [
        "[elm.bench] error: device='tpu' is unknown; valid: auto, cpu, cuda, cuda:<index>"]
    comma = _cli("finetune", ["model=default"], tmp_path / "a,b")
    assert comma.returncode == 2 and "has a comma" in comma.stderr and len(comma.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "a,b").exists()


def test_a_failed_checkpoint_write_leaves_the_good_one_and_no_temp_file(tmp_path: Path) -> None:
    """A write that fails midway (here: an object that cannot be pickled; on a full disk: ENOSPC)."""
    import torch

    from elm.utils.io import atomic_torch_save, atomic_write_text

    good = atomic_torch_save({"step": 1}, tmp_path / "state.pt")
    before = good.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 - whatever pickle raises
        atomic_torch_save({"step": 2, "bad": lambda: None}, tmp_path / "state.pt")
    assert good.read_bytes() == before and torch.load(good, weights_only=True) == {"step": 1}
    atomic_write_text(tmp_path / "results.json", "{}")
    with pytest.raises(TypeError):
        atomic_write_text(tmp_path / "results.json", 123)  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "state.pt"]


def _immutable(path: Path) -> bool:
    """``chattr +i``: even root gets EPERM writing there (tests run as root, which ignores modes)."""
    return subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0


def test_a_full_disk_and_a_denied_write_are_one_line(tmp_path: Path) -> None:
    """Real ENOSPC (the run's metrics file is /dev/full) and real EPERM (an immutable file or run
    dir): one line, exit 2, and the checkpoint written before the failure is kept."""
    full = tmp_path / "full"
    full.mkdir()
    (full / "metrics.jsonl").symlink_to("/dev/full")
    proc = _cli("search", SEARCH_OK, full)
    assert proc.returncode == 2 and proc.stderr.splitlines()[-1] == (
        "[elm.search] error: No space left on device; nothing finished was removed"), proc.stderr[-1500:]  # fmt: skip
    assert "Traceback" not in proc.stderr and (full / "search_state.pt").is_file()
    denied, sealed = tmp_path / "denied", tmp_path / "sealed"
    denied.mkdir()
    (denied / "metrics.jsonl").touch()
    sealed.mkdir()
    if not (_immutable(denied / "metrics.jsonl") and _immutable(sealed)):
        pytest.skip("chattr +i is not available here (needs ext4-like fs and CAP_LINUX_IMMUTABLE)")
    try:
        proc = _cli("search", SEARCH_OK, denied)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-1500:]
        assert proc.stderr.splitlines()[-1].startswith("[elm.search] error: Operation not permitted (")
        assert "metrics.jsonl" in proc.stderr.splitlines()[-1]
        proc = _cli("retrain", ["arch=/no/such/arch.json"], sealed / "run")
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
            f"[elm.retrain] error: hydra.run.dir={sealed / 'run'} cannot be written ({sealed} is not writable); "
            "choose another dir"]  # fmt: skip
    finally:
        subprocess.run(["chattr", "-i", str(denied / "metrics.jsonl"), str(sealed)], check=True)
