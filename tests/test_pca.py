"""PCA scores against scikit-learn's explained variance."""

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from elm.search.pca import explained_variance, explained_variance_ratio, pca_components, pca_score


def _low_rank(n: int, d: int, rank: int, noise: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, rank)) @ rng.normal(size=(rank, d)) + 3.0
    return x + noise * rng.normal(size=(n, d))


def _sklearn_k(x: np.ndarray, threshold: float) -> int:
    cumsum = np.cumsum(PCA().fit(x).explained_variance_ratio_)
    return int(np.searchsorted(cumsum, threshold) + 1)


def test_known_rank_gives_rank_components():
    x = _low_rank(200, 40, 5, 1e-4)
    assert pca_components(torch.tensor(x), 0.99) == 5
    assert _sklearn_k(x, 0.99) == 5


@pytest.mark.parametrize("threshold", [0.5, 0.8, 0.9, 0.95, 0.99])
@pytest.mark.parametrize("shape", [(300, 20), (15, 40)])  # N > d and N < d
def test_count_matches_sklearn(threshold, shape):
    rng = np.random.default_rng(1)
    x = rng.normal(size=shape) * np.linspace(0.1, 3.0, shape[1])  # anisotropic
    assert pca_components(torch.tensor(x, dtype=torch.float32), threshold) == _sklearn_k(x, threshold)


def test_explained_variance_matches_sklearn():
    x = np.random.default_rng(2).normal(size=(50, 8))
    pca = PCA().fit(x)
    np.testing.assert_allclose(
        explained_variance(torch.tensor(x)).numpy(), pca.explained_variance_, rtol=1e-10
    )
    np.testing.assert_allclose(
        explained_variance_ratio(torch.tensor(x)).numpy(), pca.explained_variance_ratio_, rtol=1e-10
    )


def test_score_modes_and_batched_input():
    x = torch.tensor(_low_rank(120, 40, 5, 1e-4), dtype=torch.float32)
    assert pca_score(x, 0.99, "ratio") == pytest.approx(5 / 40)
    assert pca_score(x, 0.99, "count") == 5.0
    assert pca_score(x.reshape(4, 30, 40)) == pca_score(x)  # [B, T, d] flattens to tokens


def test_full_threshold_counts_rank():
    x = torch.tensor(_low_rank(100, 12, 4, 0.0))
    assert pca_components(x, 1.0) <= 5  # rank 4 (+ round-off): never the full width
    assert pca_components(torch.randn(100, 12, dtype=torch.float64), 1.0) == 12


@pytest.mark.parametrize("x", [torch.zeros(10, 6), torch.full((10, 6), 0.1), torch.ones(1, 6)])
def test_constant_input_is_finite_zero(x):
    assert pca_components(x) == 0
    assert pca_score(x) == 0.0
    assert pca_score(x, mode="count") == 0.0
    assert torch.isfinite(explained_variance_ratio(x)).all()


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_bad_threshold(bad):
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
        pca_components(torch.randn(10, 4), bad)


def test_bad_mode_and_shape():
    with pytest.raises(ValueError, match="mode must be one of"):
        pca_score(torch.randn(10, 4), mode="fraction")
    with pytest.raises(ValueError, match="shape"):
        pca_score(torch.randn(10))
    with pytest.raises(ValueError, match="NaN"):
        pca_score(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
