"""The comparison stage: baseline architectures (uniform, random) against their contracts, latency,
the table/figure writer, refusals, and the real ``python -m elm.compare`` end to end at tiny size."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from omegaconf import OmegaConf

from elm import ArchConfig, ElmForSequenceClassification, LayerConfig, config_from_arch
from elm.blocks import family
from elm.compare import layer_params, measure_latency, measure_side_by_side, random_arch, uniform_arch
from elm.compare.report import table_csv, table_markdown, write_comparison
from elm.compare.run import _check_inputs, compose_config, kd_teacher, run_compare, task_config
from elm.supernet import SpaceConfig

ROOT = Path(__file__).resolve().parents[1]
SPACE = SpaceConfig(hidden_size=256)  # hidden 256, head_dim 32, FFN 132..792 by 132


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}


def searched_arch() -> ArchConfig:
    """A mixed 6-layer arch of the default space (~5.9M params, ~1.9M in the layers)."""
    return ArchConfig(hidden_size=256, embedding_size=128, vocab_size=30522, max_positions=512, layers=[
        LayerConfig("bert", 6, 32, 396, share="qv"), LayerConfig("mobilebert", 3, 32, 264, 2, 128, "none"),
        LayerConfig("bert", 8, 32, 528), LayerConfig("mobilebert", 4, 32, 132, 2, 128, "kv"),
        LayerConfig("bert", 5, 32, 660, share="kv"), LayerConfig("bert", 2, 32, 132),
    ]).validate()  # fmt: skip


@pytest.mark.parametrize("scale", [1.0, 0.6, 1.5])
def test_uniform_arch_hits_the_target_under_the_budget(scale):
    arch = searched_arch()
    budget = int(layer_params(arch) * scale)  # tight: the target's own layer parameters
    target = arch.embedding_parameters() + budget
    uni = uniform_arch(target, like=arch, head_dim=32, budget=budget)
    assert abs(uni.num_parameters() - target) <= 0.05 * target
    assert layer_params(uni) <= budget
    assert uni.num_layers == arch.num_layers and uni.hidden_size == arch.hidden_size
    assert uni.embedding_parameters() == arch.embedding_parameters()
    assert len({(la.num_heads, la.ffn_dim) for la in uni.layers}) == 1  # the same block everywhere
    assert all(la.block == "bert" and la.share == "none" and la.head_dim == 32 for la in uni.layers)
    layer = uni.layers[0]
    assert 0.5 <= layer.ffn_dim / (4 * layer.attention_size) <= 2.0  # BERT-like FFN = 4 x attention


def test_uniform_arch_refuses_an_unreachable_target():
    arch = searched_arch()
    with pytest.raises(ValueError, match="no uniform 6-layer BERT model"):
        uniform_arch(arch.num_parameters(), like=arch, head_dim=32, budget=1000)
    with pytest.raises(ValueError, match="within 0%"):
        uniform_arch(arch.num_parameters() * 3, like=arch, head_dim=32, tolerance=0.0, ffn_max=264)


def check_in_space(arch: ArchConfig, space: SpaceConfig) -> None:
    widths = set(range(space.ffn_init, space.ffn_max + 1, space.ffn_unit))
    assert arch.num_layers == space.num_layers and arch.hidden_size == space.hidden_size
    for la in arch.layers:
        assert la.block in space.blocks and la.share in family(la.block).shares(space) and la.ffn_dim in widths
        assert la.num_heads % family(la.block).head_step(la.share) == 0  # (grouped queries: whole groups)
        assert la.head_dim == space.head_dim_of(la.block)
        assert 1 <= la.num_heads <= space.heads_of(la.block)
        fields = space.layer_fields(la.block, la.share)
        assert (la.bottleneck_size, la.num_ffn) == (fields["bottleneck_size"], fields["num_ffn"])


def test_random_arch_respects_the_budget_and_the_space():
    like, budget = searched_arch(), 2_000_000
    floor = int(0.95 * layer_params(like))
    archs = [
        random_arch(SPACE, budget, np.random.default_rng(s), like=like, min_params=floor) for s in range(30)
    ]
    for arch in archs:
        assert floor <= layer_params(arch) <= budget
        check_in_space(arch, SPACE)
    assert len({json.dumps(a.to_dict()) for a in archs}) == len(archs)  # draws differ ...
    again = random_arch(SPACE, budget, np.random.default_rng(3), like=like, min_params=floor)
    assert again.to_dict() == archs[3].to_dict()  # ... and are reproducible
    blocks = {la.block for a in archs for la in a.layers}
    assert blocks == {"bert", "mobilebert"}
    # a narrow window that rejection misses is reached by head / FFN steps
    narrow = random_arch(
        SPACE, budget, np.random.default_rng(0), like=like, min_params=budget - 60_000, max_tries=1
    )
    assert budget - 60_000 <= layer_params(narrow) <= budget
    check_in_space(narrow, SPACE)


def test_random_arch_draws_mobilebert_heads_of_their_own_width():
    """+experiment=elm_small's space: MobileBERT heads 33 wide beside 44-wide BERT heads. The
    baseline drew every head at space.head_dim (44 for MobileBERT too: outside the space)."""
    space = SpaceConfig(hidden_size=528, head_dim=44, families={"bert": {"heads": 12}, "mobilebert": {"heads": 4, "head_dim": 33}},
                        ffn_init=132, ffn_unit=132, ffn_max=792)  # fmt: skip
    like = ArchConfig(hidden_size=528, embedding_size=128, vocab_size=30522, max_positions=512,
                      layers=[LayerConfig("bert", num_heads=6, head_dim=44, ffn_dim=264)] * 6).validate()  # fmt: skip
    archs = [random_arch(space, 6_000_000, np.random.default_rng(s), like=like) for s in range(20)]
    mobile = [la for a in archs for la in a.layers if la.block == "mobilebert"]
    assert mobile and all(la.head_dim == 33 for la in mobile)
    for arch in archs:
        check_in_space(arch, space)
    with pytest.raises(ValueError, match="no random architecture"):
        random_arch(SPACE, 10_000, np.random.default_rng(0), like=like, max_tries=5)


def test_random_arch_of_a_space_with_llama_blocks_keeps_whole_query_groups():
    space = SpaceConfig(hidden_size=256, blocks=["bert", "mobilebert", "llama"], families={"llama": {"heads": 8, "group": 4}})
    like, budget = searched_arch(), 2_000_000
    archs = [random_arch(space, budget, np.random.default_rng(s), like=like, min_params=budget - 200_000, max_tries=s % 3 + 1)
             for s in range(12)]  # fmt: skip
    shares = {la.share for a in archs for la in a.layers if la.block == "llama"}
    assert shares == {"none", "gqa4"}
    for arch in archs:
        check_in_space(arch, space)
        assert budget - 200_000 <= layer_params(arch) <= budget


def test_latency_is_a_positive_median():
    arch = ArchConfig(hidden_size=32, embedding_size=16, vocab_size=100, max_positions=64,
                      layers=[LayerConfig("bert", 2, 16, 32)]).validate()  # fmt: skip
    model = ElmForSequenceClassification(config_from_arch(arch, num_labels=2))
    ms = measure_latency(model, batch=2, seq_len=16, repeats=3, warmup=1)
    assert math.isfinite(ms) and ms > 0
    both = measure_side_by_side({"a": model, "b": model}, batch=1, seq_len=8, repeats=2, warmup=0)
    assert set(both) == {"a", "b"} and all(v > 0 for v in both.values())
    with pytest.raises(ValueError, match="repeats"):
        measure_side_by_side({"a": model}, repeats=0)


def result(mean: float, std: float) -> dict:
    return {"metrics": ["accuracy", "f1_macro"], "mean": {"accuracy": mean, "f1_macro": mean - 0.1, "score": mean - 0.05},
            "std": {"accuracy": std, "f1_macro": std, "score": std}}  # fmt: skip


def test_table_writer_makes_md_csv_png(tmp_path):
    rows = [
        {"model": "searched", "arch": "6L: 4 bert + 2 mobilebert", "params": 5_930_348, "layer_params": 1_924_204,
         "latency_ms": {"1": 3.2, "32": 51.0}, "val_loss": 4.1, "val_ppl": 60.3, "tasks": {"bbc": result(0.91, 0.01)}},
        {"model": "uniform", "arch": "6L: 6 bert", "params": 5_911_984, "layer_params": 1_905_840,
         "latency_ms": {"1": 2.9, "32": 48.5}, "val_loss": 4.3, "val_ppl": 73.7, "tasks": {"bbc": result(0.88, 0.02)}},
        {"model": "random", "arch": "6L: 3 bert + 3 mobilebert", "params": 5_800_000, "layer_params": 1_800_000,
         "latency_ms": {"1": 3.0}, "val_loss": None, "val_ppl": float("nan"), "tasks": {}},
    ]  # fmt: skip
    paths = write_comparison(rows, tmp_path, title="test")
    assert set(paths) == {"md", "csv", "png"}
    md = paths["md"].read_text()
    assert md == table_markdown(rows, "test")
    assert (
        "| searched | 6L: 4 bert + 2 mobilebert | 5.93 | 1.92 | 3.2 | 51.0 | 4.100 | 60.3 | 91.0 ± 1.0 | 81.0 ± 1.0 "
        "| 86.0 ± 1.0 |" in md
    )
    assert "| random | 6L: 3 bert + 3 mobilebert | 5.80 | 1.80 | 3.0 | - | - | - | - | - | - |" in md
    table = list(csv.DictReader(io.StringIO(paths["csv"].read_text())))
    assert paths["csv"].read_text() == table_csv(rows)
    assert [r["model"] for r in table] == ["searched", "uniform", "random"]
    assert float(table[1]["bbc_accuracy_mean"]) == 0.88 and float(table[1]["bbc_score_std"]) == 0.02
    assert (
        float(table[0]["latency_b32_ms"]) == 51.0 and table[2]["latency_b32_ms"] == "" == table[2]["val_ppl"]
    )
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(paths["png"])
    assert image.shape[0] > 100 and len(np.unique(image[..., :3].reshape(-1, 3), axis=0)) > 20


def test_table_with_a_teacher_row_gives_speed_ups_and_fractions_of_its_scores():
    rows = [
        {"model": "searched", "arch": "6L", "params": 5_930_348, "layer_params": 1_924_204,
         "latency_ms": {"1": 3.2, "32": 51.0}, "val_loss": 4.1, "val_ppl": 60.3, "tasks": {"bbc": result(0.90, 0.01)}},
        {"model": "random", "arch": "6L", "params": 5_800_000, "layer_params": 1_800_000, "latency_ms": {"1": 3.0},
         "val_loss": None, "val_ppl": None, "tasks": {}},
        {"model": "teacher", "arch": "teacher", "params": 22_700_000, "layer_params": 10_790_000,
         "latency_ms": {"1": 6.4, "32": 204.0}, "tasks": {"bbc": result(0.96, 0.01)}},
    ]  # fmt: skip
    md = table_markdown(rows, "t")
    assert "| speed-up b1 | speed-up b32 |" in md and "| bbc of teacher |" in md
    assert "| 2.00x | 4.00x |" in md and "| 85.0 ± 1.0 | 93.4% |" in md  # score 0.90 - 0.05 = 0.85 of 0.91
    assert "| 2.13x | - |" in md and md.splitlines()[-2].endswith("| - |")  # nothing measured: "-", no unit
    assert "| 1.00x | 1.00x |" in md and md.rstrip().endswith("| 100.0% |")


def test_slice_shape_fills_the_budget_at_the_teachers_ffn_ratio():
    from elm.compare.slice import slice_shape
    from elm.space.arch import layer_parameters

    h, w = slice_shape(2_400_000, hidden=384, head_dim=32, heads=12, ffn=1536, depth=6)
    size = 6 * layer_parameters(LayerConfig("bert", num_heads=h, head_dim=32, ffn_dim=w), 384)
    one_more = 6 * layer_parameters(LayerConfig("bert", num_heads=h, head_dim=32, ffn_dim=w + 1), 384)
    assert size <= 2_400_000 < one_more  # the widest FFN that fits
    assert (h, w) == (3, 325)  # 3 heads x 32 = 96 wide, FFN 325: ratio 3.4, the closest to MiniLM's 4
    with pytest.raises(ValueError, match="no slice"):
        slice_shape(1000, hidden=384, head_dim=32, heads=12, ffn=1536, depth=6)


def test_teacher_slice_is_the_teacher_when_nothing_is_cut():
    import torch

    from elm.compare.slice import teacher_slice
    from elm.data.collate import sample_batches
    from elm.modeling import ElmModel
    from elm.teacher import load_teacher

    teacher = load_teacher()
    like = ArchConfig(hidden_size=384, embedding_size=384, vocab_size=len(teacher.tokenizer), max_positions=512,
                      layers=[LayerConfig("bert", 12, 32, 1536)] * 6).validate()  # fmt: skip
    ids = torch.randint(1000, 2000, (2, 16), generator=torch.Generator().manual_seed(0))
    rows = sample_batches(_rows(ids), 0, 1, 2)
    model, _ = teacher_slice(teacher, like, rows, ElmModel)
    mask = torch.ones_like(ids)
    want = teacher(ids, mask).hidden_states[-1]
    torch.testing.assert_close(model.eval()(input_ids=ids, attention_mask=mask).last_hidden_state, want,
                               atol=5e-5, rtol=1e-5)  # fmt: skip


def _rows(ids):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * ids.shape[1]] * ids.shape[0]})


def test_bad_inputs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="retrain settings"):
        compose_config("retrain", [], {"retrain": {"no_such_key": 1}})
    with pytest.raises(ValueError, match="retrain_overrides"):
        compose_config("retrain", ["teacher=no_such_teacher"])
    base = OmegaConf.load(ROOT / "configs" / "compare.yaml")
    base.pop("hydra")
    with pytest.raises(ValueError, match="search_dir=<search run dir> is required"):
        run_compare(base, tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        run_compare(OmegaConf.merge(base, {"search_dir": str(tmp_path / "missing")}), tmp_path)
    typo = OmegaConf.merge(base, {"tasks": ["bbc"], "task_finetune": {"sst": {"data": {"max_train": 10}}}})
    with pytest.raises(ValueError, match=r"task_finetune has settings for \['sst'\].*\['bbc'\]"):
        _check_inputs(typo, compose_config("retrain", []), compose_config("finetune", []))
    # every retrain / fine-tuning / distillation setting before the first (long) retrain
    ok = OmegaConf.merge(base, {"tasks": ["bbc"]})
    cases = [(ok, {"retrain": {"epochs": -1}}, {}, "retrain.epochs=-1"),
             (ok, {}, {"train": {"lr": -1.0}}, "train.lr=-1.0"),
             (OmegaConf.merge(ok, {"task_finetune": {"bbc": {"data": {"max_train": 0}}}}), {}, {}, "data.max_train=0"),
             (OmegaConf.merge(ok, {"task_distill": {"enabled": True, "kd": {"temperature": 0}}}), {}, {},
              "kd.temperature=0"),
             (OmegaConf.merge(ok, {"task_distill": {"enabled": True, "models": ["teacher"]}}), {}, {},
              "the teacher is not distilled"),
             (ok, {"hub": {"repo_id": "me/m"}}, {}, "retrain.hub.repo_id is set, but elm.compare publishes nothing"),
             (ok, {}, {"hub": {"repo_id": "me/m"}}, "finetune.hub.repo_id is set"),
             (OmegaConf.merge(ok, {"teacher_cache_gb": -1}), {}, {}, "teacher_cache_gb=-1 must be a number >= 0")]  # fmt: skip
    for cfg, retrain, finetune, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            _check_inputs(cfg, compose_config("retrain", [], retrain), compose_config("finetune", [], finetune))


def test_task_distillation_reuses_the_teacher_rows_run_only_when_it_is_the_same_run(tmp_path):
    """kd_teacher hands distill_task the teacher row's seed-0 model exactly when distill_task would
    fine-tune the same one (same model, data, training, rate, seed); otherwise the teacher itself."""
    from elm.utils.hub import resolve_model_path

    base = OmegaConf.load(ROOT / "configs" / "compare.yaml")
    base.pop("hydra")
    cfg = OmegaConf.merge(base, {"tasks": ["bbc"], "models": ["searched", "teacher"], "task_distill": {"enabled": True}})
    ft = task_config(cfg, compose_config("finetune", [], cfg.finetune), "bbc")
    model = resolve_model_path("default")
    seed_dir = tmp_path / "finetune" / "teacher" / "bbc" / "seed0"

    def plain(**changes):
        results = {"model": model, "complete": True, "lr": 1e-4, "num_labels": 5, "label_names": list("abcde"),
                   "per_seed": [{"seed": 0, "metrics": {"accuracy": 0.9}}], **changes}  # fmt: skip
        (seed_dir / "model").mkdir(parents=True, exist_ok=True)
        (seed_dir / "model" / "config.json").write_text("{}")
        (seed_dir.parent / "results.json").write_text(json.dumps(results))

    plain()
    got = kd_teacher(cfg, ft, "default", tmp_path, "bbc", record=False)
    assert got == str(seed_dir / "model") and not (seed_dir / "model" / "elm_task.json").exists()
    assert kd_teacher(cfg, ft, "default", tmp_path, "bbc") == got
    record = json.loads((seed_dir / "model" / "elm_task.json").read_text())
    assert record["task"] == "bbc" and record["label_names"] == list("abcde") and record["metrics"]["accuracy"] == 0.9
    other = OmegaConf.merge(ft, {"train": {"epochs": 4}})
    for changed, c, f in [("the rate its sweep picked", cfg, ft), ("training", cfg, other),
                          ("no teacher row", OmegaConf.merge(cfg, {"models": ["searched"]}), ft)]:  # fmt: skip
        plain(lr=3e-4 if changed.startswith("the rate") else 1e-4)
        assert kd_teacher(c, f, "default", tmp_path, "bbc") == "default", changed
    plain(per_seed=[{"seed": 1, "metrics": {}}])
    assert kd_teacher(cfg, ft, "default", tmp_path, "bbc") == "default"
    plain(complete=False)
    assert kd_teacher(cfg, ft, "default", tmp_path, "bbc") == "default"
    plain()
    (seed_dir / "model" / "config.json").unlink()  # weights not kept
    assert kd_teacher(cfg, ft, "default", tmp_path, "bbc") == "default"


# ---- end to end ----------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_compare_end_to_end(tmp_path):
    data = ["data.max_docs=40", "data.seq_len=64", "logger=none", "progress=false"]
    search = tmp_path / "search"
    proc = subprocess.run([sys.executable, "-m", "elm.search", "space=tiny", "search.epochs=2",
                           "search.steps_per_epoch=2", "search.batch_size=4", "search.eval_batches=1",
                           "search.analysis_batch_size=8", "search.budgets.small=40000", "search.budgets.tiny=30000",
                           "plots.enabled=false", *data, f"hydra.run.dir={search}"],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "compare"
    args = [f"search_dir={search}", "seeds=[0,1]", "random.n=2", "models=[searched,scratch,uniform,random,teacher]",
            "+retrain.teacher_head.steps=3", "finetune.train.lr_sweep=[1e-3,3e-3]",
            "+task_finetune={bbc: {data: {max_train: 12}}}", "retrain.data.max_docs=40", "retrain.data.seq_len=64",
            "retrain.retrain.epochs=1", "retrain.retrain.steps_per_epoch=2", "retrain.retrain.batch_size=4",
            "+retrain.retrain.eval_batches=1", "finetune.data.max_train=16", "finetune.data.max_eval=16",
            "finetune.data.max_length=32", "finetune.train.max_steps=2", "finetune.train.batch_size=8",
            "latency.batch_sizes=[1,4]", "latency.seq_len=32", "latency.repeats=2", "latency.warmup=0",
            "task_distill.enabled=true", f"hydra.run.dir={out}"]  # fmt: skip

    def compare(*extra: str) -> subprocess.CompletedProcess:
        keys = {e.split("=")[0] for e in extra}
        return subprocess.run([sys.executable, "-m", "elm.compare", *[a for a in args if a.split("=")[0] not in keys],
                               *extra], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)  # fmt: skip

    proc = compare()
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "comparison.json").read_text())
    assert (
        (out / "DONE").is_file()
        and summary["budget"] == 40000
        and summary["budget_source"] == "pareto.json:small"
    )
    rows = {r["model"]: r for r in summary["rows"]}
    assert list(rows) == ["searched", "scratch", "uniform", "random", "teacher"]
    searched = ArchConfig.from_json(search / "arch.json")
    assert rows["searched"]["params"] == rows["scratch"]["params"] == searched.num_parameters()
    teacher = rows.pop("teacher")  # fine-tuned as it is, timed beside the others
    assert teacher["layer_params"] > 10 * rows["searched"]["layer_params"] and "val_loss" not in teacher
    assert abs(rows["uniform"]["params"] - searched.num_parameters()) <= 0.05 * searched.num_parameters()
    randoms = {n: a for n, a in summary["archs"].items() if n.startswith("random_")}
    assert len(randoms) == 2 and all(a["layer_params"] <= 40000 for a in randoms.values())
    best = min(randoms, key=lambda n: randoms[n]["retrain"]["val_loss"])
    assert (
        summary["random_best"] == best and rows["random"]["val_loss"] == randoms[best]["retrain"]["val_loss"]
    )
    for row in [*rows.values(), teacher]:
        assert set(row["latency_ms"]) == {"1", "4"} and all(v > 0 for v in row["latency_ms"].values())
        bbc = row["tasks"]["bbc"]
        assert [r["seed"] for r in bbc["per_seed"]] == [0, 1] and set(bbc["std"]) >= {"accuracy", "score"}
        assert bbc["train_size"] == 12  # task_finetune's rows, not finetune's 16
        # the rate was picked on held-out training data, not on the reported split
        assert set(bbc["lr_sweep"]) == {"0.001", "0.003"} and bbc["lr"] in (1e-3, 3e-3)
        assert bbc["lr_sweep"][f"{bbc['lr']:g}"] == max(bbc["lr_sweep"].values())
    for row in rows.values():
        assert row["val_loss"] > 0 and Path(row["model_dir"], "config.json").is_file()
    # task distillation of the searched row only, with the same budget, from the teacher fine-tuned on bbc
    kd, bbc = rows["searched"]["tasks"]["bbc+kd"], rows["searched"]["tasks"]["bbc"]
    assert [r["seed"] for r in kd["per_seed"]] == [0, 1] and kd["train_size"] == 12 and kd["lr"] == bbc["lr"]
    assert kd["distillation"]["teacher"]["finetuned_here"] and str(out / "distill_teacher") in kd["distillation"]["teacher"]["cache"]
    assert all("bbc+kd" not in r["tasks"] for n, r in rows.items() if n != "searched")
    for name in ("comparison.md", "comparison.csv", "comparison.png"):
        assert (out / name).is_file()
    table = (out / "comparison.md").read_text()
    assert "speed-up b1" in table and "bbc of teacher" in table and "| teacher |" in table and "bbc+kd of teacher" in table
    assert len((out / "comparison.csv").read_text().splitlines()) == 6

    # a resume with other settings is refused before anything is written, naming the key
    finished = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.suffix != ".log"}
    for change, key in (("retrain.retrain.steps_per_epoch=3", "retrain.steps_per_epoch: 2 -> 3"),
                        ("finetune.train.max_steps=3", "train.max_steps: 2 -> 3")):  # fmt: skip
        refused = compare("resume=true", change)
        assert refused.returncode == 2, refused.stderr[-2000:]
        lines = [ln for ln in refused.stderr.splitlines() if ln.startswith("[elm.compare]")]
        assert len(lines) == 1 and key in lines[0], refused.stderr[-2000:]
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.suffix != ".log"} == finished
