"""Linear CKA against a direct numpy implementation, and CKA head pruning."""

import numpy as np
import pytest
import torch

from elm.search.cka import head_cka_matrix, linear_cka, prune_by_cka


def _np_cka(x: np.ndarray, y: np.ndarray) -> float:
    x = x - x.mean(0)
    y = y - y.mean(0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def _orthogonal(d: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


@pytest.mark.parametrize("n,p,q", [(100, 8, 12), (10, 30, 20), (64, 16, 16)])
def test_matches_numpy(n, p, q):
    rng = np.random.default_rng(n + p)
    x = rng.normal(size=(n, p))
    y = x[:, :1] @ rng.normal(size=(1, q)) + rng.normal(size=(n, q))  # partially related
    got = linear_cka(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32))
    assert got.dtype == torch.float64 and got.dim() == 0
    assert float(got) == pytest.approx(_np_cka(x, y), rel=1e-5)


def test_invariances():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 16))
    tx = torch.tensor(x)
    assert float(linear_cka(tx, tx)) == pytest.approx(1.0, abs=1e-12)
    rotated = torch.tensor(3.7 * x @ _orthogonal(16, 4) + 5.0)  # rotate, scale, shift
    assert float(linear_cka(tx, rotated)) == pytest.approx(1.0, abs=1e-10)


def test_independent_noise_near_zero():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5000, 8, generator=g), torch.randn(5000, 8, generator=g)
    assert float(linear_cka(x, y)) < 0.1


def test_degenerate_is_zero():
    x = torch.randn(20, 4)
    for const in (torch.zeros(20, 3), torch.full((20, 3), 0.1)):
        assert float(linear_cka(x, const)) == 0.0
        assert float(linear_cka(const, const)) == 0.0
    with pytest.raises(ValueError, match="same number of rows"):
        linear_cka(torch.randn(5, 2), torch.randn(6, 2))


@pytest.mark.parametrize("n", [50, 6])  # feature-space and sample-space paths
def test_head_matrix_equals_pairwise_loop(n):
    g = torch.Generator().manual_seed(n)
    heads = torch.randn(5, n, 8, generator=g)
    heads[3] = heads[1] @ torch.tensor(_orthogonal(8, 1), dtype=torch.float32)  # duplicate of 1
    heads[4] = heads[0] + 0.3 * heads[2]
    m = head_cka_matrix(heads)
    ref = torch.stack([torch.stack([linear_cka(heads[i], heads[j]) for j in range(5)]) for i in range(5)])
    torch.testing.assert_close(m, ref, atol=1e-10, rtol=1e-9)
    assert float(m[1, 3]) == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(m, m.T)


def test_head_matrix_batched_input_and_constant_head():
    heads = torch.randn(3, 2, 7, 4)
    heads[2] = 1.5
    m = head_cka_matrix(heads)
    assert m.shape == (3, 3) and torch.isfinite(m).all()
    assert float(m[2].abs().sum()) == 0.0 and float(m[0, 0]) == pytest.approx(1.0)
    torch.testing.assert_close(m, head_cka_matrix(heads.reshape(3, 14, 4)))


def test_prune_hand_case():
    cka = torch.tensor(
        [
            [1.00, 0.95, 0.20, 0.10],
            [0.95, 1.00, 0.30, 0.92],
            [0.20, 0.30, 1.00, 0.10],
            [0.10, 0.92, 0.10, 1.00],
        ]
    )
    importance = torch.tensor([2.0, 1.0, 5.0, 3.0])
    kept, decisions = prune_by_cka(cka, [0, 1, 2, 3], importance, threshold=0.9)
    # most similar pair (0, 1): drop 1 (less important); then no pair above 0.9 remains
    assert kept == [0, 2, 3]
    assert decisions == [
        {"head": 1, "partner": 0, "cka": pytest.approx(0.95), "importance": 1.0,
         "partner_importance": 2.0, "remaining": 3}
    ]  # fmt: skip


def test_prune_chain_and_min_heads():
    cka = torch.full((4, 4), 0.99)
    importance = [4.0, 3.0, 2.0, 1.0]
    kept, decisions = prune_by_cka(cka, [0, 1, 2, 3], importance, threshold=0.9, min_heads=2)
    # every pair ties at 0.99: the first pair is (0, 1) -> drop 1, then (0, 2) -> drop 2
    assert kept == [0, 3] and [d["head"] for d in decisions] == [1, 2]
    assert [d["partner"] for d in decisions] == [0, 0] and decisions[-1]["remaining"] == 2
    kept, _ = prune_by_cka(cka, [1, 3], importance, threshold=0.9)
    assert kept == [1]  # only active heads are considered
    kept, decisions = prune_by_cka(cka, [0, 1, 2, 3], importance, threshold=0.995)
    assert kept == [0, 1, 2, 3] and decisions == []


def test_prune_validation():
    with pytest.raises(ValueError, match="active"):
        prune_by_cka(torch.eye(2), [0, 2], torch.ones(2))
    with pytest.raises(ValueError, match="importance"):
        prune_by_cka(torch.eye(2), [0, 1], torch.ones(3))
    with pytest.raises(ValueError, match="min_heads"):
        prune_by_cka(torch.eye(2), [0, 1], torch.ones(2), min_heads=0)
