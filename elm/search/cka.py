"""Linear CKA between attention heads and CKA-based head pruning (method doc, section 4).

[paper] Heads are compared with centred kernel alignment (CKA).
[project decision] Linear CKA (Kornblith et al., 2019) between per-head outputs
(tokens x head_dim) on a held-out batch; after each epoch, while some pair of active heads is
more similar than a threshold (0.9) and more than ``min_heads`` remain, the less important head
of the most similar pair is dropped. Every decision is recorded.

Linear CKA of centred ``X [N, p]`` and ``Y [N, q]``::

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F * ||Y^T Y||_F)

It is invariant to orthogonal transforms and isotropic scaling of either input, lies in [0, 1]
and is 1 for identical inputs. Computed in float64. Constant (degenerate) inputs give 0.0.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

# Centred norm below this fraction of the raw norm means "constant input" (see pca.py).
_DEGENERATE_RTOL = 1e-12


def _centre(x: Tensor, name: str) -> tuple[Tensor, bool]:
    """Column-centre ``x [N, p]`` in float64; also report whether it is degenerate (constant)."""
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape [N, features], got shape {tuple(x.shape)}")
    x = x.detach().to(torch.float64)
    xc = x - x.mean(dim=0, keepdim=True)
    degenerate = bool(torch.linalg.vector_norm(xc) <= _DEGENERATE_RTOL * torch.linalg.vector_norm(x))
    return xc, degenerate


def linear_cka(x: Tensor, y: Tensor) -> Tensor:
    """Linear CKA between ``x [N, p]`` and ``y [N, q]`` (same N rows = same tokens).

    Returns a 0-dim float64 tensor in ``[0, 1]``; 0.0 when either input is constant.
    Uses the feature-space form (p x q products), or the sample-space Gram form when N is
    smaller than the widths; both are the same number.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of rows, got {x.shape[0]} and {y.shape[0]}")
    xc, dx = _centre(x, "x")
    yc, dy = _centre(y, "y")
    if dx or dy:
        return torch.zeros((), dtype=torch.float64)
    n, p, q = xc.shape[0], xc.shape[1], yc.shape[1]
    if n < max(p, q):
        kx, ky = xc @ xc.T, yc @ yc.T
        num = (kx * ky).sum()
        den = torch.linalg.matrix_norm(kx) * torch.linalg.matrix_norm(ky)
    else:
        num = torch.linalg.matrix_norm(yc.T @ xc).square()
        den = torch.linalg.matrix_norm(xc.T @ xc) * torch.linalg.matrix_norm(yc.T @ yc)
    if den <= 0:
        return torch.zeros((), dtype=torch.float64)
    return (num / den).clamp(0.0, 1.0)


def head_cka_matrix(head_outputs: Tensor) -> Tensor:
    """Pairwise linear CKA between heads, vectorised (no loop over pairs).

    Args:
        head_outputs: ``[H, N, dh]`` per-head outputs over N tokens (``[H, B, T, dh]`` is
            flattened to ``[H, B*T, dh]``; select valid tokens first if there is padding).

    Returns:
        ``[H, H]`` float64, symmetric, entries in ``[0, 1]``; diagonal 1 except for constant
        heads, whose row and column (diagonal included) are 0.

    The cross-head inner products ``||X_j^T X_i||_F^2`` come from one batched product: in
    feature space (``[H*dh, H*dh]`` Gram of the stacked heads) when ``N >= dh``, else in sample
    space (``<K_i, K_j>`` of per-head ``[N, N]`` Gram matrices).
    """
    if head_outputs.dim() < 3:
        raise ValueError(f"head_outputs must have shape [H, N, dh], got shape {tuple(head_outputs.shape)}")
    h, dh = head_outputs.shape[0], head_outputs.shape[-1]
    x = head_outputs.detach().reshape(h, -1, dh).to(torch.float64)
    n = x.shape[1]
    xc = x - x.mean(dim=1, keepdim=True)
    raw = torch.linalg.vector_norm(x.reshape(h, -1), dim=1)
    cen = torch.linalg.vector_norm(xc.reshape(h, -1), dim=1)
    ok = cen > _DEGENERATE_RTOL * raw  # [H] non-constant heads
    if n >= dh:
        stacked = xc.permute(1, 0, 2).reshape(n, h * dh)  # [N, H*dh]
        cross = (stacked.T @ stacked).reshape(h, dh, h, dh)  # block (i, j) = X_i^T X_j
        s = cross.square().sum(dim=(1, 3))  # [H, H] = ||X_i^T X_j||_F^2
    else:
        grams = (xc @ xc.transpose(1, 2)).reshape(h, n * n)  # [H, N*N]
        s = grams @ grams.T  # <K_i, K_j> = ||X_i^T X_j||_F^2
    diag = s.diagonal().clamp_min(0.0).sqrt()  # ||X_i^T X_i||_F
    den = diag[:, None] * diag[None, :]
    pair_ok = ok[:, None] & ok[None, :] & (den > 0)
    cka = torch.where(pair_ok, s / torch.where(pair_ok, den, torch.ones_like(den)), torch.zeros_like(s))
    return cka.clamp(0.0, 1.0)


def prune_by_cka(cka: Tensor, active: list[int], importance: Tensor | list[float], threshold: float = 0.9,
                 min_heads: int = 1) -> tuple[list[int], list[dict[str, Any]]]:
    """Greedily drop redundant heads. [project decision]

    While some pair of active heads has CKA strictly above ``threshold`` and more than
    ``min_heads`` heads remain: take the most similar pair and drop the head with lower
    ``importance`` (e.g. mean output norm); on a tie drop the higher head index. NaN CKA
    values never trigger a drop.

    Args:
        cka: ``[H, H]`` head CKA matrix (only entries between active heads are read).
        active: indices of the heads that are currently active.
        importance: ``[H]`` importance per head (higher = keep).
        threshold: similarity above which a pair is redundant.
        min_heads: never go below this many heads (>= 1).

    Returns:
        ``(kept, decisions)``: kept head indices in the order of ``active``, and one dict per
        dropped head: ``{"head", "partner", "cka", "importance", "partner_importance",
        "remaining"}`` (``remaining`` = active heads after the drop).
    """
    if cka.dim() != 2 or cka.shape[0] != cka.shape[1]:
        raise ValueError(f"cka must be a square [H, H] matrix, got shape {tuple(cka.shape)}")
    h = cka.shape[0]
    importance = torch.as_tensor(importance).detach().reshape(-1).to(torch.float64)
    if importance.numel() != h:
        raise ValueError(f"importance must have {h} entries (one per head), got {importance.numel()}")
    if len(set(active)) != len(active) or any(not 0 <= a < h for a in active):
        raise ValueError(f"active must be distinct head indices in [0, {h}), got {active}")
    if isinstance(min_heads, bool) or not isinstance(min_heads, int) or min_heads < 1:
        raise ValueError(f"min_heads must be an integer >= 1, got {min_heads!r}")
    sim = torch.nan_to_num(cka.detach().to(torch.float64), nan=float("-inf"))  # a new tensor
    sim = torch.maximum(sim, sim.T)  # use the symmetric part; ignores tiny asymmetries
    current = list(active)
    decisions: list[dict[str, Any]] = []
    while len(current) > min_heads and len(current) >= 2:
        idx = torch.tensor(current)
        sub = sim[idx][:, idx]
        sub = sub.masked_fill(~torch.ones_like(sub, dtype=torch.bool).triu(1), float("-inf"))
        best = int(torch.argmax(sub).item())
        a, b = current[best // len(current)], current[best % len(current)]
        value = float(sub.reshape(-1)[best].item())
        if not value > threshold:
            break
        ia, ib = float(importance[a]), float(importance[b])
        drop, keep = (a, b) if (ia < ib or (ia == ib and a > b)) else (b, a)
        current.remove(drop)
        decisions.append({"head": drop, "partner": keep, "cka": value, "importance": float(importance[drop]),
                          "partner_importance": float(importance[keep]), "remaining": len(current)})
    return current, decisions
