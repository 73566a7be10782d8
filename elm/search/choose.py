"""Choosing the architecture and writing the search's outputs.

[project decision] Candidates are scored block-wise (validation distillation loss), so a model's
score is a sum over layers; under a budget the best combination is a multiple-choice knapsack,
solved exactly by ``select.select_under_budget``. Costs are exact parameter counts of each
candidate's active configuration (from the architecture description alone).

Budgets: ``{name: value}``; a value <= 1 is a fraction of a reference number of layer
(non-embedding) parameters, a value > 1 an absolute layer-parameter count. The reference
(``search.budget_reference``) is ``space`` (default): the largest architecture of the search space,
so every fraction below 1 binds and ``small`` and ``tiny`` differ; or ``teacher``: the teacher's
layer parameters. [project decision] The paper's sizes (Small/Tiny/Micro ~ 1/7, 1/11, 1/22 of
BERT-base) are whole-model ratios; with a 30k vocabulary the student's embeddings alone exceed
those shares of a small teacher, so budgets apply to the layers and the embedding size is a
separate, reported choice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..blocks import family
from ..space import ArchConfig, LayerConfig, SpaceConfig
from ..supernet import Supernet
from ..utils.io import atomic_write_json
from ..utils.settings import check_choice
from .selection import evolutionary_select, pareto_front, select_under_budget


def teacher_layer_parameters(teacher) -> int:
    """Non-embedding parameters of the teacher (its encoder/decoder layers)."""
    model = teacher.model
    embed = model.get_input_embeddings()
    skip = {id(p) for p in embed.parameters()}
    for name, module in model.named_modules():
        if name.endswith(("embeddings", "wpe")):  # position_embeddings included
            skip |= {id(p) for p in module.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


BUDGET_REFERENCES = ("space", "teacher")


def resolve_budgets(budgets: dict[str, float | None], reference_params: int) -> dict[str, int]:
    """Budgets in layer parameters (fractions of ``reference_params``). ``null`` drops a budget (e.g.
    one inherited from the defaults by an experiment config)."""
    out = {}
    for name, value in budgets.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < float("inf"):
            raise ValueError(f"search.budgets.{name}={value!r} must be a positive finite number "
                             "(fraction <= 1 or count)")
        out[name] = int(value * reference_params) if value <= 1 else int(value)
    if not out:
        raise ValueError(f"search.budgets={dict(budgets)} names no budget; give one, e.g. small: 0.45")
    return out


def layer_param_range(space: SpaceConfig, min_heads: int = 1) -> tuple[int, int]:
    """Smallest and largest layer-parameter count the space can reach (from its description alone:
    every layer at its cheapest candidate with ``min_heads`` heads and ``ffn_init``, or at its
    largest with all heads and ``ffn_max``)."""
    small, large = [], []
    for block, share in space.candidates():
        heads, fam = space.heads_of(block), family(block)
        small.append(LayerConfig(**fam.layer_config_fields(space, share, min(min_heads, heads), space.ffn_init)))
        large.append(LayerConfig(**fam.layer_config_fields(space, share, heads, space.ffn_max)))
    lo = min(c.num_parameters(space.hidden_size) for c in small)
    hi = max(c.num_parameters(space.hidden_size) for c in large)
    return space.num_layers * lo, space.num_layers * hi


def budget_reference(space: SpaceConfig, reference: str, teacher, min_heads: int = 1) -> int:
    """Layer parameters a fractional budget refers to (see the module doc)."""
    check_choice("search.budget_reference", reference, BUDGET_REFERENCES)
    return layer_param_range(space, min_heads)[1] if reference == "space" else teacher_layer_parameters(teacher)


def check_budgets(space: SpaceConfig | Supernet, budgets: dict[str, int], min_heads: int) -> None:
    """Fail before training when a budget is outside what the space can reach at all."""
    lo, hi = layer_param_range(space.space if isinstance(space, Supernet) else space, min_heads)
    for name, budget in budgets.items():
        if not lo <= budget:
            raise ValueError(f"budget {name}={budget:,} layer params is below the smallest architecture "
                             f"of this space ({lo:,}); raise it or shrink the space")  # fmt: skip
        if budget > hi:
            raise ValueError(f"budget {name}={budget:,} layer params is above the largest architecture "
                             f"of this space ({hi:,}); lower it or enlarge the space")  # fmt: skip


STRATEGIES = ("dp", "evolutionary")


def select_with_a_layer(table, costs, budget: int, identity: list[list[bool]]):
    """:func:`select_under_budget` among choices that keep at least one layer (not every candidate an
    identity ``skip``). Exact: if the unconstrained best skips everything, the best choice that
    keeps layer l is found for every l (its skip priced out of the budget) and the best of those taken."""
    best = select_under_budget(table, costs, budget)
    if not all(identity[li][ci] for li, ci in enumerate(best[0])):
        return best
    found = []
    for li in range(len(costs)):
        forced = [list(row) for row in costs]
        forced[li] = [budget + 1 if identity[li][ci] else c for ci, c in enumerate(costs[li])]
        try:
            found.append(select_under_budget(table, forced, budget))
        except ValueError:  # no block of layer li fits the budget
            continue
    if not found:
        raise ValueError(f"no architecture with at least one layer fits {budget:,} layer params")
    return min(found, key=lambda r: (r[1], r[2]))


def choose(supernet: Supernet, scores: dict[str, float], budgets: dict[str, int], strategy: str = "dp",
           scorer=None, evolution: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Choice per budget plus the whole (block-wise) Pareto front; returns a JSON-able summary.

    ``dp`` (default): the exact DP over the block-wise validation scores. ``evolutionary``: the
    W-PCA-style search (:func:`select.evolutionary_select`) with the chained whole-model score of
    ``scorer`` (:class:`elm.search.score.ChainScorer`) as fitness, settings from ``evolution``."""
    check_choice("search.strategy", strategy, STRATEGIES)
    keys = [[key for li2, _, key, _ in supernet.candidates() if li2 == li] for li in range(len(supernet.layers))]
    table = [[scores[k] for k in row] for row in keys]
    costs = [[cand.num_parameters() for cand in layer] for layer in supernet.layers]
    identity = [[cand.identity for cand in layer] for layer in supernet.layers]
    embed = supernet.embedding_parameters()
    chosen, errors = {}, {}
    for name, budget in budgets.items():
        try:
            if strategy == "dp":
                choice, score, cost = select_with_a_layer(table, costs, budget, identity)
            else:
                choice, score, _ = evolutionary_select(
                    scorer.fitness, [len(row) for row in costs], budget,
                    lambda ch: sum(costs[li][c] for li, c in enumerate(ch)), **(evolution or {}))  # fmt: skip
                cost = sum(costs[li][c] for li, c in enumerate(choice))
            arch = supernet.active_arch(choice)
        except ValueError as err:  # widths only grow: a budget feasible at the start may not be now;
            errors[name] = str(err)  # ArchError (a ValueError): every layer skipped, no model
            continue
        chosen[name] = {"budget": budget, "strategy": strategy, "choice": choice, "score": score, "layer_params": cost,
                        "params": arch.num_parameters(), "params_with_lm_head": arch.num_parameters("lm"),
                        "candidates": [keys[li][c] for li, c in enumerate(choice)], "arch": arch.to_dict()}  # fmt: skip
    front = [{"layer_params": c, "params": c + embed, "score": s, "choice": ch} for c, s, ch in pareto_front(table, costs)
             if not all(identity[li][ci] for li, ci in enumerate(ch))]  # (a model needs a layer)
    return {"chosen": chosen, "infeasible": errors, "pareto": front, "embedding_params": embed}


def chained_reports(summary: dict[str, Any], supernet: Supernet, scorer, seed: int = 0) -> None:
    """Add to every chosen point its whole-model (chained) scores and those of a random init of the
    same architecture (same batches), so ``pareto.json`` says whether the chosen blocks compose."""
    import torch

    from ..modeling import ElmModel, config_from_arch

    for point in summary["chosen"].values():
        arch = ArchConfig.from_dict(point["arch"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = ElmModel(config_from_arch(arch, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                              pad_token_id=supernet.pad_token_id))  # fmt: skip
        model.to(supernet.basis_proj.device)
        point["chained"] = scorer.of_choice(point["choice"])
        point["chained_random_init"] = scorer.of_model(model, supernet.kept_boundaries(point["choice"]))


def write_archs(run_dir: str | Path, summary: dict[str, Any]) -> list[Path]:
    """``arch_<budget>.json`` per budget, ``arch.json`` = the first feasible budget, ``pareto.json``."""
    run_dir = Path(run_dir)
    paths = []
    for i, (name, point) in enumerate(summary["chosen"].items()):
        arch = ArchConfig.from_dict(point["arch"])
        paths.append(atomic_write_json(run_dir / f"arch_{name}.json", arch.to_dict()))
        if i == 0:
            paths.append(atomic_write_json(run_dir / "arch.json", arch.to_dict()))
    paths.append(atomic_write_json(run_dir / "pareto.json", summary))
    return paths
