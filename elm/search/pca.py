"""PCA scores for the dynamic FFN-width search (method doc, section 3).

[paper] After each epoch the blocks with the highest PCA score grow their FFN by one unit (132).
[project decision] The PCA score of a block is ``k / d``: ``d`` is the current FFN width and ``k``
the number of principal components of the FFN intermediate activations (tokens x d, held-out
batch) needed to explain a fixed fraction (default 0.99) of the variance. A score near 1 means
the block uses all of its width and is starved. ``mode="count"`` returns ``k`` itself, as the
earlier W-PCA code did.

All maths runs in float64 on the centred activations via singular values, which is stable and
works when there are fewer tokens than features (N < d).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

PCA_MODES = ("ratio", "count")
PcaMode = Literal["ratio", "count"]

# Relative size (centred norm / raw norm) below which activations count as constant: float64
# centring leaves residues of ~1e-16 relative, real variation is many orders larger.
_DEGENERATE_RTOL = 1e-12
# Slack on the cumulative ratio so that e.g. threshold=1.0 is reachable despite round-off.
_CUMSUM_ATOL = 1e-12


def _as_matrix(acts: Tensor) -> Tensor:
    """Flatten leading dims: ``[..., d] -> [N, d]`` in float64; reject bad input."""
    if not isinstance(acts, Tensor):
        raise TypeError(f"acts must be a torch.Tensor, got {type(acts).__name__}")
    if acts.dim() < 2:
        raise ValueError(f"acts must have shape [N, d] (or [..., d]), got shape {tuple(acts.shape)}")
    x = acts.detach().reshape(-1, acts.shape[-1]).to(torch.float64)
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"acts must have at least one row and one column, got shape {tuple(acts.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("acts contains NaN or infinite values")
    return x


def explained_variance(acts: Tensor) -> Tensor:
    """Variance along each principal direction, descending, shape ``[min(N, d)]`` (float64).

    Like scikit-learn's ``PCA.explained_variance_`` (divides by ``N - 1``; by 1 when N == 1).
    Constant (or all-zero) activations give all zeros.
    """
    x = _as_matrix(acts)
    xc = x - x.mean(dim=0, keepdim=True)
    raw = torch.linalg.vector_norm(x)
    if torch.linalg.vector_norm(xc) <= _DEGENERATE_RTOL * raw:
        return torch.zeros(min(x.shape), dtype=torch.float64, device=x.device)
    # squared singular values = eigenvalues of the smaller scatter matrix: in float64 the cumulative
    # ratios agree with svdvals' to 1e-15, and it is 2-7x faster at the search's widths (issue #15)
    scatter = xc.T @ xc if xc.shape[0] >= xc.shape[1] else xc @ xc.T
    s2 = torch.linalg.eigvalsh(scatter).flip(0).clamp_min(0)  # descending
    return s2 / max(x.shape[0] - 1, 1)


def explained_variance_ratio(acts: Tensor) -> Tensor:
    """Fraction of the total variance per principal direction (descending); zeros if constant."""
    var = explained_variance(acts)
    total = var.sum()
    return var / total if total > 0 else var


def pca_components(acts: Tensor, threshold: float = 0.99) -> int:
    """Number of principal components needed to explain ``threshold`` of the variance.

    Args:
        acts: activations ``[N, d]`` (or ``[..., d]``, leading dims are flattened to tokens).
            Select valid (non-padding) tokens before calling.
        threshold: fraction of variance to explain, in ``(0, 1]``.

    Returns:
        The smallest ``k`` whose cumulative explained-variance ratio reaches ``threshold``
        (``1 <= k <= min(N, d)``). [project decision] Constant or all-zero activations have no
        variance to explain and give ``k = 0`` (score 0: a dead block is not starved, so it is
        never chosen to grow).
    """
    t = float(threshold)
    if not (0.0 < t <= 1.0):
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    ratio = explained_variance_ratio(acts)
    if ratio.sum() <= 0:
        return 0
    cumsum = torch.cumsum(ratio, dim=0)
    k = int(torch.searchsorted(cumsum, torch.tensor([t - _CUMSUM_ATOL], dtype=cumsum.dtype, device=cumsum.device)).item()) + 1
    return min(k, ratio.numel())


def pca_score(acts: Tensor, threshold: float = 0.99, mode: PcaMode = "ratio") -> float:
    """PCA score of a block's FFN activations.

    ``mode="ratio"`` (default, [project decision]): ``k / d`` in ``[0, 1]``, where ``d`` is the
    activation width (the block's current FFN width). ``mode="count"`` (W-PCA): ``k`` as float.
    Constant activations give 0.0 in both modes.
    """
    if mode not in PCA_MODES:
        raise ValueError(f"mode must be one of {PCA_MODES}, got {mode!r}")
    k = pca_components(acts, threshold)
    return float(k) if mode == "count" else k / acts.shape[-1]
