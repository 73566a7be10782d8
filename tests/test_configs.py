"""Every experiment config composes with Hydra and describes a valid, feasible search (nothing runs)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from elm.search.analysis import CKAConfig, PCAConfig
from elm.search.choose import check_budgets, layer_param_range, resolve_budgets
from elm.space import ArchConfig
from elm.supernet import SpaceConfig
from elm.utils.settings import to_dataclass

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
# [paper] sizes (method doc, sec. 8): total parameters, layers, hidden size; BERT-base vocabulary
PAPER = {"elm_small": (15.7e6, 12, 528), "elm_tiny": (10e6, 6, 528), "elm_micro": (5e6, 6, 192)}
BERT_VOCAB, BERT_POSITIONS = 30522, 512


def compose_search(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("search", overrides=list(overrides))


def space_of(cfg) -> SpaceConfig:
    return to_dataclass(SpaceConfig, cfg.space, "space").validate()  # what run_search does


def test_the_paper_sizes_and_the_smoke_run_have_experiment_files() -> None:
    assert set(EXPERIMENTS) >= {*PAPER, "smoke"}
    for name in EXPERIMENTS:
        assert (CONFIGS / "experiment" / f"{name}.yaml").read_text().startswith("# @package _global_")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_into_a_valid_feasible_search(name: str) -> None:
    cfg = compose_search(f"+experiment={name}")
    OmegaConf.resolve(cfg)  # interpolations (pca.unit: ${space.ffn_unit}) resolve
    space = space_of(cfg)
    pca, cka = to_dataclass(PCAConfig, cfg.pca, "pca"), to_dataclass(CKAConfig, cfg.cka, "cka")
    assert pca.unit == space.ffn_unit
    assert cfg.data.seq_len >= 8 and cfg.search.batch_size >= 1 and cfg.search.epochs >= 1
    # experiments pin absolute layer-parameter budgets (a fraction would depend on the teacher)
    assert all(v is None or v > 1 for v in cfg.search.budgets.values()), dict(cfg.search.budgets)
    budgets = resolve_budgets(dict(cfg.search.budgets), reference_params=1)
    check_budgets(space, budgets, cka.min_heads)  # inside the space's reachable range
    lo, hi = layer_param_range(space, cka.min_heads)
    assert all(lo <= b <= hi for b in budgets.values())


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_experiments_match_the_papers_sizes(name: str) -> None:
    total, layers, hidden = PAPER[name]
    cfg = compose_search(f"+experiment={name}")
    space = space_of(cfg)
    assert (space.num_layers, space.hidden_size, space.embedding_size) == (layers, hidden, 128)
    assert cfg.teacher.name == "bert-base-uncased" and cfg.data.source.startswith("hf:wikitext")
    assert (cfg.search.epochs, cfg.search.batch_size, cfg.search.lr) == (10, 256, 1e-4)
    assert (space.ffn_init, space.ffn_unit, space.ffn_max) == (132, 132, 792)
    assert sorted(space.blocks) == ["bert", "mobilebert"] and sorted(space.shares) == ["kv", "none", "qv"]
    # heads tile the widths: BERT heads x head_dim = hidden, MobileBERT heads x head_dim = bottleneck
    assert space.heads_of("bert") * space.head_dim_of("bert") == hidden
    assert space.heads_of("mobilebert") * space.head_dim_of("mobilebert") == space.layer_fields("mobilebert", "none")["bottleneck_size"]
    budgets = resolve_budgets(dict(cfg.search.budgets), reference_params=1)
    assert len(budgets) == 1  # the defaults' other budgets are switched off
    embed = ArchConfig(hidden_size=hidden, embedding_size=128, vocab_size=BERT_VOCAB,
                       max_positions=BERT_POSITIONS).embedding_parameters()  # fmt: skip
    assert next(iter(budgets.values())) + embed == total  # the comment's arithmetic


def test_smoke_experiment_is_the_e2e_tests_settings() -> None:
    from test_search_e2e import TINY

    smoke = compose_search("+experiment=smoke")
    spelled = compose_search(*TINY)
    assert OmegaConf.to_container(smoke) == OmegaConf.to_container(spelled)
    # offline: the packaged teacher and corpus
    assert smoke.teacher.name == "default" and smoke.data.source == "bbc"


def test_default_search_config_is_valid() -> None:
    cfg = compose_search()
    assert cfg.space.hidden_size is None  # the teacher's width
    cfg.space.hidden_size = 384  # what run_search resolves it to under the default MiniLM
    space = space_of(cfg)
    assert "experiment" not in cfg
    # fractional budgets bind: they are fractions of the space's largest architecture, within reach
    from elm.search.choose import budget_reference

    ref = budget_reference(space, cfg.search.budget_reference, None, cfg.cka.min_heads)
    budgets = resolve_budgets(dict(cfg.search.budgets), reference_params=ref)
    check_budgets(space, budgets, cfg.cka.min_heads)
    assert budgets["tiny"] < budgets["small"] < ref
    assert budgets["small"] <= 10_650_000 / 4  # a quarter of the MiniLM teacher's layer parameters
