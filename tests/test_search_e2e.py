"""End to end: the real ``python -m elm.search`` at tiny size (offline, CPU, well under 90 s)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import elm
from elm.space import ArchConfig

REPO = Path(__file__).resolve().parents[1]
# configs/experiment/smoke.yaml pins the same settings; the first run spells them out
TINY = [
    "space=tiny", "search.epochs=3", "search.steps_per_epoch=3", "search.batch_size=4",
    "search.eval_batches=1", "search.analysis_batch_size=8", "data.max_docs=60", "data.seq_len=64",
    "logger=none", "progress=false",
    # absolute layer parameters: the tiny space spans 15,232 .. 66,944 (2 layers of 4 candidates)
    "search.budgets.small=45000", "search.budgets.tiny=30000",
]  # fmt: skip
PLOTS = ("pca_curves.png", "cka_heatmap.png", "diversity.png", "architecture.png", "pareto.png")


def search(run_dir: Path, *overrides: str, cache: Path) -> subprocess.CompletedProcess:
    # one thread: the ops are tiny, and OpenMP spin-waits make a shared 2-core box 10x slower
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ELM_CACHE": str(cache), "WANDB_MODE": "disabled",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    cmd = [sys.executable, "-m", "elm.search", *overrides, f"hydra.run.dir={run_dir}"]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "%|" not in line]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[-1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("elm_cache")


@pytest.fixture(scope="module")
def rkd_run(tmp_path_factory, cache) -> Path:
    run = tmp_path_factory.mktemp("search") / "rkd"
    proc = search(run, *TINY, cache=cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[elm.search] small:" in proc.stdout and "[elm.search] tiny:" in proc.stdout
    return run


def test_search_writes_a_valid_architecture_metrics_and_plots(rkd_run: Path) -> None:
    arch = ArchConfig.from_json(rkd_run / "arch.json")
    assert arch.validate() is arch and arch.num_layers == 2 and arch.hidden_size == 64
    assert elm.config_from_arch(arch).num_hidden_layers == 2

    epochs = [json.loads(line) for line in (rkd_run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in epochs if "epoch" in r]  # the last line is the run's "final" summary
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    candidates = {f"L{li}.{b}{s}" for li in (0, 1) for b in ("bert", "mobilebert") for s in ("", ".qv")}
    for r in epochs:
        assert set(r["pca"]) == set(r["ffn"]) == set(r["heads"]) == candidates
        assert len(r["diversity"]) == 2 and all(-1 <= d <= 1 for d in r["diversity"])
        assert all(0 < v <= 1 for v in r["pca"].values())
        assert set(r["pca_untrained"]) == set(r["cka_untrained"]) == candidates  # the untrained twins' levels
    # search.eval_when=final (default): the candidates are scored after the last epoch only
    assert ["val_loss" in r for r in epochs] == [False, False, True]
    assert set(epochs[-1]["val_loss"]) == candidates | {"embeddings"}  # the embeddings are distilled too
    ci = epochs[-1]["val_ci"]  # paired intervals against each layer's best
    assert set(ci) == candidates and all(c["low"] is None and c["high"] is None for c in ci.values())  # 1 batch
    # per-layer growth (one candidate of each layer) after every epoch but the last
    assert sum(len(r["growth"]) for r in epochs) == 4 and not epochs[-1]["growth"]
    assert all(sorted(e["candidate"][:2] for e in r["growth"]) == ["L0", "L1"] for r in epochs[:-1])
    assert all(epochs[-1]["ffn"][e["candidate"]] >= e["to"] for r in epochs for e in r["growth"])

    pareto = json.loads((rkd_run / "pareto.json").read_text())
    assert set(pareto["chosen"]) == {"small", "tiny"} and not pareto["infeasible"]
    for name, point in pareto["chosen"].items():
        chosen = ArchConfig.from_dict(point["arch"])
        assert point["params"] == chosen.num_parameters()
        layer_params = chosen.num_parameters() - chosen.embedding_parameters()
        assert point["layer_params"] == layer_params <= point["budget"]
        assert ArchConfig.from_json(rkd_run / f"arch_{name}.json") == chosen
        # the chosen blocks carry the widths and heads the search ended with
        for layer, key in zip(chosen.layers, point["candidates"]):
            assert (layer.ffn_dim, layer.num_heads) == (epochs[-1]["ffn"][key], epochs[-1]["heads"][key])
        # the chosen blocks compose: chained from the student's own embeddings they stay closer to
        # the teacher (relations at the last layer) than a random init of the same architecture
        chained, random = point["chained"], point["chained_random_init"]
        assert len(chained["rkd"]) == len(chained["nmse"]) == 3
        assert chained["rkd"][-1] < random["rkd"][-1], (chained, random)
    assert pareto["inherit"]["inherited"] and pareto["inherit"]["basis"] == "pca"  # 64 wide under 384
    assert ArchConfig.from_dict(pareto["chosen"]["small"]["arch"]) == arch
    assert pareto["pareto"] and pareto["embedding_params"] == arch.embedding_parameters()

    for png in PLOTS:
        assert (rkd_run / png).stat().st_size > 5_000, png
    done = json.loads((rkd_run / "DONE").read_text())
    assert done["stage"] == "search" and Path(done["arch"]) == rkd_run / "arch.json"


def test_validating_every_epoch_changes_only_the_records(rkd_run: Path, tmp_path: Path, cache: Path) -> None:
    """Validation draws no random numbers, so ``search.eval_when=every_epoch`` trains the same
    supernet and chooses the same architecture as the default ``final``."""
    run = tmp_path / "every_epoch"
    proc = search(run, *TINY, "search.eval_when=every_epoch", cache=cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final, every = ([json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()] for r in (rkd_run, run))
    final, every = [r for r in final if "epoch" in r], [r for r in every if "epoch" in r]
    assert all(set(r["val_loss"]) == set(final[-1]["val_loss"]) for r in every)
    for a, b in zip(final, every, strict=True):
        assert a["train_loss"] == b["train_loss"] and a["ffn"] == b["ffn"] and a["heads"] == b["heads"]
    assert every[-1]["val_loss"] == final[-1]["val_loss"]
    assert (run / "arch.json").read_text() == (rkd_run / "arch.json").read_text()


def test_mse_run_from_the_smoke_experiment_compares_diversity(
    rkd_run: Path, tmp_path: Path, cache: Path
) -> None:
    run = tmp_path / "mse"
    proc = search(
        run, "+experiment=smoke", "distill.loss=mse", f"plots.compare_with=['{rkd_run}']", cache=cache
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "DONE").is_file() and ArchConfig.from_json(run / "arch.json").num_layers == 2
    assert (run / "diversity.png").stat().st_size > 5_000
    # the smoke experiment is the same search as the spelled-out overrides, but with MSE
    assert (run / ".hydra" / "config.yaml").read_text().count("loss: mse") == 1
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in metrics if "epoch" in r] == [1, 2, 3]


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["space.blocks=[bert,foo]"], "foo"),
        (["~search.budgets", "+search.budgets={x:10}"], "x=10"),  # 10 layer params: below any model
    ],
    ids=["unknown-block", "infeasible-budget"],
)
def test_bad_input_fails_early_with_one_line(
    overrides: list[str], needle: str, tmp_path: Path, cache
) -> None:
    run = tmp_path / "bad"
    proc = search(run, *TINY, *overrides, cache=cache)
    assert proc.returncode != 0
    line = error_line(proc)
    assert line.startswith("[elm.search] error:") and needle in line, proc.stderr[-2000:]
    for name in ("DONE", "arch.json", "metrics.jsonl", "search_state.pt"):  # before any training
        assert not (run / name).exists(), name
