"""Scores the architecture choice rests on: block-wise validation losses with paired confidence
intervals, and whole-model (chained) scores of a chosen architecture.

* :func:`paired_intervals` — every candidate of a layer is scored on the same validation batches,
  so candidates are compared by the per-batch *difference* to the layer's best one: mean and a
  two-sided Student-t interval over batches (a paired t-test's interval). A difference whose
  interval contains 0 is a choice the data does not settle.
* :func:`chain_metrics` — the student's states chained from its own embeddings (no teacher input
  anywhere) against the teacher's mapped states, per layer boundary: RKD (1 - relational
  correlation) and the point-wise normalised MSE in the shared basis. This is what an extracted
  model computes, so it is the score that tells whether the chosen blocks compose.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..distill.losses import normalised_mse, rkd_loss


def paired_intervals(per_batch: Tensor, groups: Sequence[Sequence[int]], level: float = 0.95) -> list[dict]:
    """Per candidate (columns of ``per_batch [batches, candidates]``): the difference of its loss to
    its group's best candidate (lowest mean), averaged over batches, with a ``level`` confidence
    interval. ``groups`` lists the column indices of each layer. With one batch there is no interval
    (``low`` and ``high`` are None)."""
    n = per_batch.shape[0]
    if n < 1:
        raise ValueError("paired_intervals needs at least one batch")
    x = per_batch.double()
    out: list[dict] = [{} for _ in range(per_batch.shape[1])]
    q = None
    if n > 1:  # the two-sided Student-t quantile
        from scipy.stats import t

        q = float(t.ppf(0.5 + level / 2.0, n - 1))
    for group in groups:
        means = x[:, list(group)].mean(0)
        best = list(group)[int(means.argmin())]
        for c in group:
            diff = x[:, c] - x[:, best]
            mean = float(diff.mean())
            half = q * float(diff.std(unbiased=True)) / math.sqrt(n) if q is not None else None
            out[c] = {"best": best, "diff": mean, "low": None if half is None else mean - half,
                      "high": None if half is None else mean + half}  # fmt: skip
    return out


@torch.no_grad()
def chain_metrics(student_states: Sequence[Tensor], teacher_states: Sequence[Tensor], attention_mask: Tensor,
                  layer_map: Sequence[int], to_student, variance: Tensor) -> dict[str, list[float]]:  # fmt: skip
    """Per boundary ``b`` (0 = embeddings): RKD and normalised MSE of ``student_states[b]`` against
    the teacher's state ``layer_map[b]`` in the shared basis (``to_student`` maps it there,
    ``variance[b]`` is its variance there)."""
    rkd, nmse = [], []
    for b, s in enumerate(student_states):
        target = to_student(teacher_states[layer_map[b]].float())
        rkd.append(float(rkd_loss(s.float(), target, attention_mask)))
        nmse.append(float(normalised_mse(s.float(), target, variance[b], attention_mask)))
    return {"rkd": rkd, "nmse": nmse}


@torch.no_grad()
def supernet_chain(supernet, choice: Sequence[int], input_ids: Tensor, attention_mask: Tensor) -> list[Tensor]:
    """States of the active path ``choice`` chained from the supernet's embeddings (eval mode):
    ``[embeddings, layer 1, ..., layer L]``, exactly what the extracted model returns."""
    from ..modeling.modeling_elm import attention_bias

    was = supernet.training
    supernet.eval()
    x = supernet.embeddings(input_ids)
    mask = attention_bias(attention_mask, supernet.space.causal, x.shape[1])
    states = [x]
    for li, ci in enumerate(choice):
        x, _ = supernet.layers[li][ci](x, mask, supernet.space.causal)
        states.append(x)
    supernet.train(was)
    return states


@torch.no_grad()
def model_chain(model, input_ids: Tensor, attention_mask: Tensor) -> list[Tensor]:
    """The same states from a standalone ``ElmModel`` (e.g. a random init of the chosen arch)."""
    was = model.training
    model.eval()
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    model.train(was)
    return list(out.hidden_states)


def chained_loss(metrics: dict[str, list[float]], point: float) -> float:
    """The whole-model score: the sum over layers (boundaries 1..L) of ``rkd + point x nmse``, the
    default search loss, so it is on the scale of the block-wise sum the DP minimises (whatever
    ``distill.loss`` trained the blocks, this is the same yardstick)."""
    return sum(metrics["rkd"][b] + point * metrics["nmse"][b] for b in range(1, len(metrics["rkd"])))


class ChainScorer:
    """Whole-model scores of architectures of one supernet on fixed validation batches (teacher
    states computed once): :meth:`of_choice` for a path through the supernet, :meth:`of_model`
    for any standalone model of the same shape (e.g. a random init), :meth:`fitness` for the
    evolutionary strategy (memoised)."""

    def __init__(self, supernet, batches: Sequence[tuple[Tensor, Tensor, Sequence[Tensor]]], point: float) -> None:
        self.supernet, self.batches, self.point = supernet, list(batches), point
        self.cache: dict[tuple[int, ...], float] = {}

    def _metrics(self, states_of, boundaries: Sequence[int] | None = None) -> dict[str, list[float]]:
        net = self.supernet
        b = list(boundaries) if boundaries is not None else list(range(len(net.layer_map)))
        layer_map, variance = [net.layer_map[i] for i in b], net.target_variance[b]
        parts = [chain_metrics(states_of(ids, mask), hidden, mask, layer_map, net.to_student, variance)
                 for ids, mask, hidden in self.batches]  # fmt: skip
        out = {k: [sum(col) / len(parts) for col in zip(*(p[k] for p in parts))] for k in parts[0]}
        out["score"] = chained_loss(out, self.point)
        return out

    def of_choice(self, choice: Sequence[int]) -> dict[str, list[float]]:
        return self._metrics(lambda ids, mask: supernet_chain(self.supernet, choice, ids, mask))

    def of_model(self, model, boundaries: Sequence[int] | None = None) -> dict[str, list[float]]:
        """``boundaries``: the supernet boundaries the model's states stand for (``Supernet.kept_boundaries``
        of the choice it was built from; default all: a model as deep as the supernet)."""
        return self._metrics(lambda ids, mask: model_chain(model, ids, mask), boundaries)

    def fitness(self, choice: Sequence[int]) -> float:
        key = tuple(choice)
        if key not in self.cache:
            self.cache[key] = float(self.of_choice(choice)["score"])
        return self.cache[key]
