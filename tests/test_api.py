"""``elm.api``: the stages from Python with the commands' configs and checks (the quickstart
notebook runs search → retrain → finetune through it end to end, tests/test_notebook.py)."""

from __future__ import annotations

import json

import pytest

import elm
import elm.api
from elm import ArchConfig, LayerConfig

TINY_ARCH = ArchConfig(hidden_size=32, embedding_size=16, vocab_size=100, max_positions=64,
                       layers=[LayerConfig("bert", num_heads=2, head_dim=16, ffn_dim=32)])  # fmt: skip


def test_settings_merge_over_the_commands_config():
    cfg = elm.api._config(
        "search", ("+experiment=smoke", "search.epochs=5"), {"search": {"lr": 0.01}, "seed": 3}
    )
    assert cfg.search.epochs == 5 and cfg.search.lr == 0.01 and cfg.seed == 3
    assert cfg.space.hidden_size == 64  # the smoke experiment's tiny space


@pytest.mark.parametrize("overrides, settings, needle", [
    ((), {"search": {"epochz": 2}}, "epochz"),
    (("search.nope=1",), {}, "elm.api.search settings"),
    ((3,), {}, "overrides must be Hydra strings like 'search.epochs=2', got 3"),
])  # fmt: skip
def test_bad_settings_are_one_line_errors(overrides, settings, needle):
    with pytest.raises(ValueError, match=needle) as err:
        elm.api.search(*overrides, **settings)
    assert "\n" not in str(err.value)


def test_retrain_names_the_budgets_a_search_has(tmp_path):
    (tmp_path / "arch.json").write_text(json.dumps(TINY_ARCH.to_dict()))
    (tmp_path / "arch_small.json").write_text(json.dumps(TINY_ARCH.to_dict()))
    with pytest.raises(ValueError, match="has no arch_huge.json; budgets there: small"):
        elm.api.retrain(tmp_path, budget="huge", run_dir=tmp_path / "out")
    with pytest.raises(ValueError, match="budget='small' needs a search"):
        elm.api.retrain(tmp_path / "arch.json", budget="small", run_dir=tmp_path / "out")
    with pytest.raises(ValueError, match="source=3 must be a path or an elm.api result"):
        elm.api.retrain(3)
    assert not (tmp_path / "out").exists()


def test_results_point_at_what_the_stage_wrote(tmp_path):
    (tmp_path / "arch.json").write_text(json.dumps(TINY_ARCH.to_dict()))
    (tmp_path / "pca_curves.png").write_bytes(b"")
    found = elm.api.SearchResult(tmp_path, {"small": TINY_ARCH}, {})
    assert found.arch == TINY_ARCH and found.plots == {"pca_curves": tmp_path / "pca_curves.png"}
    assert elm.api._path(found, "x") == str(tmp_path) and hasattr(elm, "api")


def test_arguments_win_over_nothing_and_overrides_are_kept(monkeypatch, tmp_path):
    """task=None leaves the config's task or an override's; a retrain's source is its first
    argument, so arch/search_dir settings (which retrain would ignore) are refused."""
    import elm.finetune.run as finetune_run

    seen = {}

    def fake_run(cfg, run_dir):  # the stage itself is tested in tests/test_finetune.py
        seen["task"] = cfg.task
        return {"task": cfg.task, "mean": {}, "std": {}}

    monkeypatch.setattr(finetune_run, "run_finetune", fake_run)
    elm.api.finetune(tmp_path, "task=sst2", run_dir=tmp_path / "a")
    assert seen["task"] == "sst2"
    elm.api.finetune(tmp_path, "task=sst2", task="glue/rte", run_dir=tmp_path / "b")
    assert seen["task"] == "glue/rte"
    elm.api.finetune(tmp_path, run_dir=tmp_path / "c")
    assert seen["task"] == "bbc"  # finetune.yaml's default
    for args, kwargs in ((("search_dir=/x",), {}), ((), {"arch": "a.json"})):
        with pytest.raises(ValueError, match="is the first argument here"):
            elm.api.retrain(TINY_ARCH, *args, run_dir=tmp_path / "r", **kwargs)
