"""Exact DP architecture selection against brute force; evolutionary search."""

import itertools
import random
import time

import pytest

from elm.search.selection import brute_force_select, evolutionary_select, pareto_front, select_under_budget


def _random_case(rng: random.Random):
    layers = rng.randint(3, 5)
    counts = [rng.randint(2, 4) for _ in range(layers)]
    scores = [[round(rng.uniform(0.0, 2.0), 3) for _ in range(k)] for k in counts]
    costs = [[rng.randint(1, 20) * 1000 for _ in range(k)] for k in counts]  # ties happen
    return scores, costs


def _all_points(scores, costs):
    for choice in itertools.product(*(range(len(s)) for s in scores)):
        cost = sum(costs[layer][i] for layer, i in enumerate(choice))
        score = 0.0
        for layer, i in enumerate(choice):
            score += scores[layer][i]
        yield cost, score, list(choice)


def test_dp_equals_brute_force_on_random_cases():
    rng = random.Random(0)
    for _ in range(50):
        scores, costs = _random_case(rng)
        lo = sum(min(c) for c in costs)
        hi = sum(max(c) for c in costs)
        budget = rng.randint(lo, hi)
        got = select_under_budget(scores, costs, budget)
        assert got == brute_force_select(scores, costs, budget)
        choice, score, cost = got
        assert cost <= budget
        assert cost == sum(costs[layer][i] for layer, i in enumerate(choice))
        assert score == pytest.approx(sum(scores[layer][i] for layer, i in enumerate(choice)))


def test_pareto_front_complete_and_non_dominated():
    rng = random.Random(1)
    for _ in range(50):
        scores, costs = _random_case(rng)
        front = pareto_front(scores, costs)
        points = list(_all_points(scores, costs))
        expected = {
            (c, s)
            for c, s, _ in points
            if not any(c2 <= c and s2 <= s and (c2 < c or s2 < s) for c2, s2, _ in points)
        }
        assert {(c, s) for c, s, _ in front} == expected
        assert [c for c, _, _ in front] == sorted({c for c, _, _ in front})  # strictly increasing cost
        assert all(a[1] > b[1] for a, b in itertools.pairwise(front))  # strictly decreasing score
        for c, _, choice in front:  # the choice realises its point
            assert c == sum(costs[layer][i] for layer, i in enumerate(choice))


def test_budget_boundaries():
    scores = [[1.0, 0.5], [1.0, 0.2]]
    costs = [[10, 30], [10, 50]]
    assert select_under_budget(scores, costs, 20) == ([0, 0], 2.0, 20)
    assert select_under_budget(scores, costs, 60) == ([0, 1], 1.2, 60)  # budget is inclusive
    assert select_under_budget(scores, costs, 10**9) == ([1, 1], 0.7, 80)


def test_too_small_budget_message():
    with pytest.raises(ValueError, match=r"budget 19 is below the minimum achievable cost 20"):
        select_under_budget([[1.0, 0.5], [1.0, 0.2]], [[10, 30], [50, 10]], 19)
    with pytest.raises(ValueError, match="minimum achievable cost 20"):
        brute_force_select([[1.0, 0.5], [1.0, 0.2]], [[10, 30], [50, 10]], 19)


def test_malformed_inputs():
    with pytest.raises(ValueError, match="layer 1: 2 scores but 1 costs"):
        select_under_budget([[1.0], [1.0, 2.0]], [[1], [1]], 5)
    with pytest.raises(ValueError, match="finite"):
        select_under_budget([[float("nan")]], [[1]], 5)
    with pytest.raises(ValueError, match="integer"):
        select_under_budget([[1.0]], [[1.5]], 5)
    with pytest.raises(ValueError, match="2 layers"):
        pareto_front([[1.0], [1.0]], [[1]])


def test_large_costs_stay_fast():
    rng = random.Random(2)
    scores = [[rng.uniform(0, 1) for _ in range(24)] for _ in range(12)]
    costs = [[rng.randint(100_000, 2_000_000) for _ in range(24)] for _ in range(12)]
    start = time.perf_counter()
    choice, _, cost = select_under_budget(scores, costs, 10_000_000)
    assert cost <= 10_000_000 and len(choice) == 12
    assert time.perf_counter() - start < 10.0


def test_evolutionary_finds_optimum_of_additive_problem():
    rng = random.Random(3)
    scores = [[rng.uniform(0, 1) for _ in range(4)] for _ in range(5)]
    costs = [[rng.randint(1, 10) for _ in range(4)] for _ in range(5)]
    budget = 25

    def fitness(choice):
        return sum(scores[layer][i] for layer, i in enumerate(choice))

    def cost(choice):
        return sum(costs[layer][i] for layer, i in enumerate(choice))

    kwargs = dict(layer_choices=[4] * 5, budget=budget, cost_fn=cost, generations=30, seed=7)
    best, value, history = evolutionary_select(fitness, **kwargs)
    assert cost(best) <= budget
    assert len(history) == 31 and all(a >= b for a, b in itertools.pairwise(history))
    _, exact, _ = select_under_budget(scores, costs, budget)
    assert value == pytest.approx(exact)
    assert evolutionary_select(fitness, **kwargs) == (best, value, history)  # deterministic


def test_evolutionary_infeasible_budget():
    with pytest.raises(ValueError, match="no architecture within budget"):
        evolutionary_select(lambda c: 0.0, [2, 2], budget=-1, cost_fn=lambda c: 0, max_tries=10)
