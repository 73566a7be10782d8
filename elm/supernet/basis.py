"""One shared coordinate system between the teacher's hidden space and the student's.

[project decision] (method doc §10, issue "Students worth using") Every candidate block of every
layer reads and writes the same coordinates, so that the blocks chosen for different layers
chain: block l+1 was trained on inputs in exactly the coordinates block l writes. The map is a
fixed affine basis, not a learned map per layer (a learned map per layer lets each layer drift
into its own rotation, which relational losses cannot see):

    student = (teacher - mean) @ proj          teacher ~= student @ proj.T + mean

* student width == teacher width: the identity (``mean = 0``, ``proj = I``), so BERT candidates
  can inherit their teacher layer exactly;
* narrower student: ``proj`` holds the top principal directions of the teacher's hidden states
  (pooled over the mapped layers, valid tokens of a few corpus batches) and ``mean`` their mean:
  the MiniLM / TinyBERT single projection, fixed, so the teacher's weights map to ``P^T W P``.

The statistics are second moments accumulated in float64 (:class:`Moments`), so a basis for any
width comes from one pass over the data, and tests check it against ``sklearn.decomposition.PCA``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Moments:
    """Running ``sum x``, ``sum x x^T`` and count of row vectors (float64), for means, covariances
    and least-squares fits of anything linear in ``x``."""

    sum_x: Tensor
    sum_xx: Tensor
    count: int = 0

    @classmethod
    def zeros(cls, dim: int) -> Moments:
        return cls(torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dim, dtype=torch.float64))

    def add(self, x: Tensor) -> None:
        """Accumulate rows ``x [N, D]`` (select valid tokens first)."""
        x = x.detach().reshape(-1, x.shape[-1]).to(device="cpu", dtype=torch.float64)
        self.sum_x += x.sum(0)
        self.sum_xx += x.T @ x
        self.count += x.shape[0]

    def merge(self, other: Moments) -> Moments:
        return Moments(self.sum_x + other.sum_x, self.sum_xx + other.sum_xx, self.count + other.count)

    def scaled(self, factor: float) -> Moments:
        """The moments of ``factor * x``."""
        return Moments(self.sum_x * factor, self.sum_xx * factor**2, self.count)

    @property
    def mean(self) -> Tensor:
        return self.sum_x / max(self.count, 1)

    @property
    def second(self) -> Tensor:
        """``E[x x^T]``."""
        return self.sum_xx / max(self.count, 1)

    @property
    def covariance(self) -> Tensor:
        """Population covariance ``E[(x - m)(x - m)^T]``."""
        m = self.mean
        return self.second - torch.outer(m, m)

    def augmented(self) -> Tensor:
        """``E[[x, 1][x, 1]^T]`` ([D + 1, D + 1]): affine least squares need only this."""
        d = self.sum_x.numel()
        out = torch.empty(d + 1, d + 1, dtype=torch.float64)
        out[:d, :d], out[:d, d], out[d, :d], out[d, d] = self.second, self.mean, self.mean, 1.0
        return out


def principal_directions(moments: Moments, k: int) -> Tensor:
    """The top-``k`` eigenvectors of the covariance, as columns ``[D, k]``, largest variance first
    (sign fixed so each column's largest-magnitude entry is positive, for reproducibility)."""
    d = moments.sum_x.numel()
    if not 1 <= k <= d:
        raise ValueError(f"cannot take {k} principal directions of a {d}-dimensional space")
    values, vectors = torch.linalg.eigh(moments.covariance)
    top = vectors[:, values.argsort(descending=True)[:k]]
    signs = torch.sign(top.gather(0, top.abs().argmax(0, keepdim=True)))
    return top * torch.where(signs == 0, torch.ones_like(signs), signs)


@dataclass
class Basis:
    """The shared teacher -> student map: ``student = (teacher - mean) @ proj``.

    ``proj`` has orthonormal columns ``[teacher_dim, student_dim]``; the identity basis is exact.
    """

    mean: Tensor
    proj: Tensor
    is_identity: bool = field(init=False)

    def __post_init__(self) -> None:
        if self.proj.dim() != 2 or self.mean.shape != self.proj.shape[:1]:
            raise ValueError(f"a basis needs mean [Dt] and proj [Dt, Ds], got {tuple(self.mean.shape)} and "
                             f"{tuple(self.proj.shape)}")  # fmt: skip
        square = self.proj.shape[0] == self.proj.shape[1]
        self.is_identity = square and bool(torch.equal(self.proj.cpu(), torch.eye(self.proj.shape[0])))
        self.is_identity = self.is_identity and not bool(self.mean.any())

    @classmethod
    def identity(cls, dim: int) -> Basis:
        return cls(torch.zeros(dim), torch.eye(dim))

    @classmethod
    def pca(cls, moments: Moments, student_dim: int, directions: Moments | None = None) -> Basis:
        """Identity when the widths agree, else the top principal directions of ``moments`` (or of
        ``directions``, e.g. per-layer normalised moments; the mean always comes from ``moments``),
        taken orthogonal to the all-ones direction: a LayerNorm removes that direction anyway, so a
        student LayerNorm over the basis coordinates sees the teacher's centred vector."""
        teacher_dim = moments.sum_x.numel()
        if student_dim == teacher_dim:
            return cls.identity(teacher_dim)
        if student_dim > teacher_dim:
            raise ValueError(
                f"space.hidden_size={student_dim} is wider than the teacher ({teacher_dim}); "
                f"a student may be as wide as its teacher or narrower"
            )
        c = torch.eye(teacher_dim, dtype=torch.float64) - 1.0 / teacher_dim
        src = directions or moments
        proj = principal_directions(Moments(c @ src.sum_x, c @ src.sum_xx @ c, src.count), student_dim)
        return cls(moments.mean.float(), proj.float())

    def to(self, device) -> Basis:
        return Basis(self.mean.to(device), self.proj.to(device))

    def to_student(self, h: Tensor) -> Tensor:
        """Teacher states ``[..., Dt]`` in student coordinates ``[..., Ds]``."""
        if self.is_identity:
            return h
        return (h - self.mean.to(h.dtype)) @ self.proj.to(h.dtype)

