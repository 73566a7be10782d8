"""Choosing the architecture from block-wise scores (method doc, section 6).

[project decision] Candidates are scored block-wise (validation distillation loss, lower is
better), so a whole model's score is the sum over layers, and under a cost budget (parameters,
or measured latency in microseconds; integers) the best combination is a multiple-choice
knapsack over layers, solved exactly here by dynamic programming over Pareto frontiers: after
each layer only the non-dominated ``(cost, score)`` partial solutions are kept. A dominated
partial solution can never be completed into a better whole model (the same completion would
make the dominating one at least as good), so this is exact, and it stays fast for costs of
~1e7 because the frontier, not the cost range, bounds the work.

Ties are broken by (score, cost, choice lexicographically), identically in the DP and in
:func:`brute_force_select`.

[project decision] :func:`evolutionary_select` is the second strategy (W-PCA style:
population 25 + 25 children, mutation 0.1, cost cap, lower fitness is better), for whole-model
fitness functions that are not sums over layers.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Sequence
from numbers import Integral, Real

Choice = list[int]
Scores = Sequence[Sequence[float]]  # [layer][candidate], lower is better
Costs = Sequence[Sequence[int]]  # [layer][candidate]
FrontierPoint = tuple[int, float, tuple[int, ...]]


def _validate(scores: Scores, costs: Costs) -> None:
    if len(scores) == 0:
        raise ValueError("scores must have at least one layer")
    if len(scores) != len(costs):
        raise ValueError(f"scores has {len(scores)} layers but costs has {len(costs)}")
    for layer, (s, c) in enumerate(zip(scores, costs, strict=True)):
        if len(s) == 0:
            raise ValueError(f"layer {layer} has no candidates")
        if len(s) != len(c):
            raise ValueError(f"layer {layer}: {len(s)} scores but {len(c)} costs")
        for i, (si, ci) in enumerate(zip(s, c, strict=True)):
            if isinstance(si, bool) or not isinstance(si, Real) or not math.isfinite(float(si)):
                raise ValueError(f"layer {layer} candidate {i}: score must be a finite number, got {si!r}")
            if isinstance(ci, bool) or not isinstance(ci, Integral):
                raise ValueError(f"layer {layer} candidate {i}: cost must be an integer, got {ci!r}")


def _prune(points: list[FrontierPoint]) -> list[FrontierPoint]:
    """Keep the Pareto set: cost ascending, score strictly decreasing (ties: smallest choice)."""
    points.sort()  # tuples order by (cost, score, choice)
    kept: list[FrontierPoint] = []
    for p in points:
        if not kept or p[1] < kept[-1][1]:
            kept.append(p)
    return kept


def _frontier(scores: Scores, costs: Costs, budget: int | None) -> list[FrontierPoint]:
    """Pareto frontier of whole-model (cost, score, choice), optionally capped by ``budget``."""
    n = len(scores)
    # Cheapest cost of layers l..n-1, so partial solutions that cannot fit are dropped early.
    suffix_min = [0] * (n + 1)
    for layer in range(n - 1, -1, -1):
        suffix_min[layer] = suffix_min[layer + 1] + min(int(c) for c in costs[layer])
    frontier: list[FrontierPoint] = [(0, 0.0, ())]
    for layer in range(n):
        points = [
            (cost + int(c), score + float(s), choice + (i,))
            for cost, score, choice in frontier
            for i, (s, c) in enumerate(zip(scores[layer], costs[layer], strict=True))
            if budget is None or cost + int(c) + suffix_min[layer + 1] <= budget
        ]
        frontier = _prune(points)
    return frontier


def _min_cost(costs: Costs) -> int:
    return sum(min(int(c) for c in layer) for layer in costs)


def _budget_error(budget: int, costs: Costs) -> ValueError:
    cheapest = [min(range(len(layer)), key=lambda i: layer[i]) for layer in costs]
    return ValueError(f"budget {budget} is below the minimum achievable cost {_min_cost(costs)} "
                      f"(cheapest candidate of every layer: choice {cheapest})")


def select_under_budget(scores: Scores, costs: Costs, budget: int) -> tuple[Choice, float, int]:
    """Best candidate per layer minimising the summed score with summed cost <= ``budget``.

    Args:
        scores: ``scores[l][i]`` score of candidate ``i`` of layer ``l`` (lower is better).
        costs: ``costs[l][i]`` integer cost (parameters or latency in microseconds).
        budget: maximum total cost (inclusive).

    Returns:
        ``(choice, total_score, total_cost)`` with ``choice[l]`` the index chosen in layer ``l``.

    Raises:
        ValueError: if ``budget`` is below the minimum achievable cost (the message names both),
            or the inputs are malformed.
    """
    _validate(scores, costs)
    budget = int(budget)
    if budget < _min_cost(costs):
        raise _budget_error(budget, costs)
    frontier = _frontier(scores, costs, budget)
    cost, score, choice = min(frontier, key=lambda p: (p[1], p[0], p[2]))
    return list(choice), score, cost


def brute_force_select(scores: Scores, costs: Costs, budget: int) -> tuple[Choice, float, int]:
    """Reference for :func:`select_under_budget`: enumerate every combination (tests only)."""
    _validate(scores, costs)
    best: tuple[float, int, tuple[int, ...]] | None = None
    for choice in itertools.product(*(range(len(s)) for s in scores)):
        cost, score = 0, 0.0
        for layer, i in enumerate(choice):  # same summation order as the DP
            cost += int(costs[layer][i])
            score += float(scores[layer][i])
        if cost <= budget and (best is None or (score, cost, choice) < best):
            best = (score, cost, choice)
    if best is None:
        raise _budget_error(int(budget), costs)
    return list(best[2]), best[0], best[1]


def pareto_front(scores: Scores, costs: Costs) -> list[tuple[int, float, Choice]]:
    """Non-dominated ``(cost, score, choice)`` over all combinations, cost ascending.

    Along the list the cost strictly increases and the score strictly decreases; of several
    combinations with identical (cost, score) one is kept (smallest choice).
    """
    _validate(scores, costs)
    return [(cost, score, list(choice)) for cost, score, choice in _frontier(scores, costs, None)]


def evolutionary_select(fitness_fn: Callable[[Choice], float], layer_choices: Sequence[int], budget: int,
                        cost_fn: Callable[[Choice], int], population: int = 25, children: int = 25,
                        mutation: float = 0.1, generations: int = 20, seed: int = 0,
                        max_tries: int = 1000) -> tuple[Choice, float, list[float]]:
    """Evolutionary search over whole architectures (W-PCA style). [project decision]

    A genome is one candidate index per layer (``layer_choices[l]`` candidates in layer ``l``).
    Each generation makes ``children`` feasible (``cost_fn(choice) <= budget``) offspring, half
    by mutation (each gene resampled with probability ``mutation``) of a parent from the
    population, half by uniform crossover of two parents, and keeps the best ``population``
    distinct genomes of parents + children (lower ``fitness_fn`` is better; each genome is
    evaluated once). Deterministic given ``seed``.

    Returns:
        ``(best_choice, best_fitness, history)``; ``history[g]`` is the best fitness after
        generation ``g`` (``history[0]`` = initial population).
    """
    if any(isinstance(k, bool) or not isinstance(k, Integral) or k < 1 for k in layer_choices):
        raise ValueError(f"layer_choices must be positive integers, got {list(layer_choices)}")
    if population < 1 or children < 0 or generations < 0:
        raise ValueError(f"need population >= 1, children >= 0, generations >= 0, "
                         f"got {population}, {children}, {generations}")
    if not 0.0 <= mutation <= 1.0:
        raise ValueError(f"mutation must be in [0, 1], got {mutation!r}")
    rng = random.Random(seed)
    cache: dict[tuple[int, ...], float] = {}

    def fitness(g: tuple[int, ...]) -> float:
        if g not in cache:
            cache[g] = float(fitness_fn(list(g)))
        return cache[g]

    def sample(make: Callable[[], tuple[int, ...]]) -> tuple[int, ...] | None:
        for _ in range(max_tries):
            g = make()
            if int(cost_fn(list(g))) <= budget:  # feasible
                return g
        return None

    pop: list[tuple[int, ...]] = []
    for _ in range(population):
        g = sample(lambda: tuple(rng.randrange(k) for k in layer_choices))
        if g is not None and g not in pop:
            pop.append(g)
    if not pop:
        raise ValueError(f"no architecture within budget {budget} found in {max_tries} random samples")
    pop.sort(key=lambda g: (fitness(g), g))
    history = [fitness(pop[0])]
    for _ in range(generations):
        offspring: list[tuple[int, ...]] = []
        for c in range(children):
            if c % 2 == 0 or len(pop) < 2:
                parent = rng.choice(pop)

                def make(p: tuple[int, ...] = parent) -> tuple[int, ...]:
                    return tuple(rng.randrange(k) if rng.random() < mutation else gene
                                 for gene, k in zip(p, layer_choices, strict=True))
            else:
                pa, pb = rng.sample(pop, 2)

                def make(a: tuple[int, ...] = pa, b: tuple[int, ...] = pb) -> tuple[int, ...]:
                    return tuple(x if rng.random() < 0.5 else y for x, y in zip(a, b, strict=True))

            g = sample(make)
            if g is not None:
                offspring.append(g)
        pop = sorted(set(pop) | set(offspring), key=lambda g: (fitness(g), g))[:population]
        history.append(fitness(pop[0]))
    return list(pop[0]), fitness(pop[0]), history
