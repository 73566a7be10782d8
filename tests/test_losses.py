"""Distillation losses against direct numpy / torch.distributions references."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributions import Categorical, kl_divergence

from elm.distill.losses import (
    HIDDEN_LOSSES,
    attention_relation_loss,
    cosine_diversity,
    forward_kl,
    hidden_loss,
    kl_hidden_loss,
    mse_loss,
    normalised_mse,
    relation_matrix,
    reverse_kl,
    rkd_loss,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _np_rkd(s: np.ndarray, t: np.ndarray, mask: np.ndarray) -> float:
    losses = []
    for b in range(s.shape[0]):
        idx = np.flatnonzero(mask[b])
        sn = s[b, idx] / np.linalg.norm(s[b, idx], axis=-1, keepdims=True)
        tn = t[b, idx] / np.linalg.norm(t[b, idx], axis=-1, keepdims=True)
        rows, cols = np.tril_indices(len(idx), k=-1)
        if len(rows) < 2:
            continue
        losses.append(1.0 - np.corrcoef((sn @ sn.T)[rows, cols], (tn @ tn.T)[rows, cols])[0, 1])
    return float(np.mean(losses))


def _semi_orthogonal(k: int, d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=_gen(seed), dtype=torch.float64))
    return q.T.float()  # [k, d], orthonormal rows


def test_relation_matrix():
    h = torch.randn(2, 5, 7, generator=_gen(0))
    rel = relation_matrix(h, torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]))
    ref = torch.nn.functional.cosine_similarity(h[:, :, None], h[:, None, :], dim=-1)
    torch.testing.assert_close(rel[0], ref[0])
    torch.testing.assert_close(rel[1, :3, :3], ref[1, :3, :3])
    assert rel[1, 3:].abs().sum() == 0 and rel[1, :, 3:].abs().sum() == 0
    assert torch.isfinite(relation_matrix(torch.zeros(1, 3, 4))).all()
    # the Gram-matrix form has the gradient of normalise-then-multiply (what it replaced)
    weights = torch.randn(2, 5, 5, generator=_gen(3))
    a, b = h.clone().requires_grad_(), h.clone().requires_grad_()
    (relation_matrix(a) * weights).sum().backward()
    z = torch.nn.functional.normalize(b, dim=-1)
    ((z @ z.transpose(1, 2)) * weights).sum().backward()
    torch.testing.assert_close(a.grad, b.grad)
    # its Gram matrix has a one-matmul backward, (g + g^T) @ h: checked against finite differences
    torch.autograd.gradcheck(relation_matrix, (h.double().requires_grad_(),))


def test_bf16_states_take_a_bf16_gram_matmul_and_fp32_after_it():
    """bf16 states (the search's bf16 replica) run the relation matrix's matmul in bf16, and the
    rest of the RKD in float32: relations, loss and gradient track the float32 computation."""
    s = torch.randn(2, 24, 32, generator=_gen(20))
    t = torch.randn(2, 24, 48, generator=_gen(21))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, 17:] = 0
    low = s.bfloat16().requires_grad_()
    rel = relation_matrix(low)
    assert rel.dtype == torch.float32
    torch.testing.assert_close(rel, relation_matrix(s), atol=2e-2, rtol=0)
    ref = rkd_loss(s, t, mask)
    loss = rkd_loss(low, t, mask)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(ref.item(), rel=1e-2)
    loss.backward()
    high = s.clone().requires_grad_()
    rkd_loss(high, t, mask).backward()
    assert low.grad.dtype == torch.bfloat16
    assert ((low.grad.float() - high.grad).norm() / high.grad.norm()).item() < 0.05


def test_rkd_matches_numpy_with_padding():
    s = torch.randn(3, 9, 6, generator=_gen(1))
    t = torch.randn(3, 9, 11, generator=_gen(2))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 4:] = 0
    got = rkd_loss(s, t, mask)
    assert float(got) == pytest.approx(
        _np_rkd(s.double().numpy(), t.double().numpy(), mask.numpy()), abs=1e-5
    )


def test_rkd_zero_for_same_relations():
    t = torch.randn(2, 10, 16, generator=_gen(3))
    assert float(rkd_loss(t, t)) == pytest.approx(0.0, abs=1e-5)
    # wider student: teacher @ semi-orthogonal map keeps all inner products
    assert float(rkd_loss(t @ _semi_orthogonal(16, 40, 4), t)) == pytest.approx(0.0, abs=1e-5)
    # narrower student: both are rank-4 codes z through different orthonormal maps, plus per-token scale
    z = torch.randn(2, 10, 4, generator=_gen(5))
    teacher = z @ _semi_orthogonal(4, 32, 6)
    student = (z @ _semi_orthogonal(4, 8, 7)) * torch.rand(2, 10, 1, generator=_gen(8)).add(0.5)
    assert float(rkd_loss(student, teacher)) == pytest.approx(0.0, abs=1e-5)


def test_rkd_positive_and_differentiable():
    s = torch.randn(2, 8, 6, generator=_gen(9), requires_grad=True)
    t = torch.randn(2, 8, 12, generator=_gen(10))
    loss = rkd_loss(s, t)
    assert 0.1 < loss.item() <= 2.0
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_rkd_padding_and_causal():
    s = torch.randn(2, 7, 5, generator=_gen(11))
    t = torch.randn(2, 7, 9, generator=_gen(12))
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    base = rkd_loss(s, t, mask)
    s2, t2 = s.clone(), t.clone()
    s2[1, 5:] = 100.0 * torch.randn(2, 5, generator=_gen(13))  # padding content is ignored
    t2[1, 5:] = -3.0
    assert float(rkd_loss(s2, t2, mask)) == pytest.approx(float(base), abs=1e-6)
    # cosine relations are symmetric: the causal pair set (j < i) is every unordered pair once
    assert float(rkd_loss(s, t, mask, causal=True)) == pytest.approx(float(base), abs=1e-6)
    # the loss of a causal prefix only uses that prefix's tokens
    prefix = torch.tensor([[1] * 4 + [0] * 3] * 2)
    assert float(rkd_loss(s, t, prefix, causal=True)) == pytest.approx(
        float(rkd_loss(s[:, :4], t[:, :4])), abs=1e-6
    )


def test_rkd_degenerate_sequences_finite():
    s = torch.randn(2, 4, 3, generator=_gen(14), requires_grad=True)
    t = torch.randn(2, 4, 5, generator=_gen(15))
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])  # 1 pair and 0 pairs: no sequence counts
    loss = rkd_loss(s, t, mask)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(s.grad).all()
    constant_teacher = torch.ones(1, 5, 4)  # all relations equal: correlation 0, loss 1, no NaN
    assert float(rkd_loss(torch.randn(1, 5, 3, generator=_gen(16)), constant_teacher)) == pytest.approx(1.0)


def test_mse_with_projection_and_mask():
    proj = nn.Linear(4, 6)
    s, t = torch.randn(2, 5, 4, generator=_gen(17)), torch.randn(2, 5, 6, generator=_gen(18))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    got = mse_loss(s, t, proj, mask)
    ref = ((proj(s) - t) ** 2)[mask].mean()
    torch.testing.assert_close(got, ref)
    with pytest.raises(ValueError, match="pass proj"):
        mse_loss(s, t)


def test_normalised_mse_matches_numpy_with_padding():
    s, t = torch.randn(2, 5, 6, generator=_gen(21)), torch.randn(2, 5, 6, generator=_gen(22))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    sn, tn, valid = s.numpy().astype(np.float64), t.numpy().astype(np.float64), mask.numpy().astype(bool)
    ref = ((sn - tn) ** 2).sum(-1)[valid].mean() / 2.5
    np.testing.assert_allclose(normalised_mse(s, t, 2.5, mask).item(), ref, rtol=1e-6)
    a = s.clone().requires_grad_()
    normalised_mse(a, t, 2.5, mask).backward()
    grad = 2 * (sn - tn) * valid[..., None] / (valid.sum() * 2.5)
    np.testing.assert_allclose(a.grad.numpy(), grad, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="share one basis"):
        normalised_mse(s, t[..., :4], 1.0)


def _np_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return (p * (np.log(p) - np.log(q))).sum(-1)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_forward_and_reverse_kl(temperature):
    s, t = torch.randn(2, 4, 10, generator=_gen(19)), torch.randn(2, 4, 10, generator=_gen(20))
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    valid = mask.bool()
    ps = Categorical(logits=s[valid] / temperature)
    pt = Categorical(logits=t[valid] / temperature)
    torch.testing.assert_close(forward_kl(s, t, mask, temperature), kl_divergence(pt, ps).mean())
    torch.testing.assert_close(reverse_kl(s, t, mask, temperature), kl_divergence(ps, pt).mean())
    p_s, p_t = _softmax(s.double().numpy() / temperature), _softmax(t.double().numpy() / temperature)
    ref = _np_kl(p_t, p_s)[mask.numpy().astype(bool)].mean()
    assert float(forward_kl(s, t, mask, temperature)) == pytest.approx(ref, rel=1e-5)
    assert float(forward_kl(t, t)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_forward_kl_gradient_is_softmax_minus_teacher_probabilities(temperature):
    """The frozen-teacher path (soft-target cross-entropy) has KL's closed-form gradient,
    (softmax(s / T) - softmax(t / T)) / (T * valid tokens) at valid tokens and 0 at padding; a teacher
    that requires grad still gets its own gradient (the explicit path)."""
    s = torch.randn(2, 4, 10, generator=_gen(23), dtype=torch.float64).requires_grad_()
    t = torch.randn(2, 4, 10, generator=_gen(24), dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    forward_kl(s, t, mask, temperature).backward()
    expected = (torch.softmax(s.detach() / temperature, -1) - torch.softmax(t / temperature, -1)) / temperature
    expected = expected * mask[..., None] / mask.sum()
    torch.testing.assert_close(s.grad, expected)
    t_grad = t.clone().requires_grad_()
    forward_kl(s.detach(), t_grad, mask, temperature).backward()
    assert t_grad.grad is not None and float(t_grad.grad.abs().sum()) > 0


def test_kl_hidden_is_feature_softmax_kl():
    proj = nn.Linear(3, 5)
    s, t = torch.randn(2, 4, 3, generator=_gen(21)), torch.randn(2, 4, 5, generator=_gen(22))
    ref = kl_divergence(
        Categorical(logits=t.reshape(-1, 5)), Categorical(logits=proj(s).reshape(-1, 5))
    ).mean()
    torch.testing.assert_close(kl_hidden_loss(s, t, proj), ref)


def test_attention_relation_loss():
    s_attn = torch.softmax(torch.randn(2, 3, 5, 5, generator=_gen(23)), -1)  # 3 student heads
    t_attn = torch.softmax(torch.randn(2, 4, 5, 5, generator=_gen(24)), -1)  # 4 teacher heads
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    p_s, p_t = s_attn.mean(1).double().numpy(), t_attn.mean(1).double().numpy()
    ref = _np_kl(p_t, p_s)[mask.numpy().astype(bool)].mean()
    assert float(attention_relation_loss(s_attn, t_attn, mask)) == pytest.approx(ref, rel=1e-5)
    assert float(attention_relation_loss(t_attn, t_attn)) == pytest.approx(0.0, abs=1e-6)
    causal = torch.softmax(torch.randn(1, 2, 4, 4).masked_fill(~torch.ones(4, 4).tril().bool(), -1e9), -1)
    assert torch.isfinite(attention_relation_loss(causal, causal.flip(1)))  # zero probabilities are fine


def test_cosine_diversity():
    a = torch.randn(2, 6, 8, generator=_gen(25))
    b = torch.randn(2, 6, 8, generator=_gen(26))
    assert cosine_diversity([a, a]) == pytest.approx(1.0, abs=1e-6)
    assert cosine_diversity([a, -a]) == pytest.approx(-1.0, abs=1e-6)
    mask = torch.tensor([[1] * 6, [1] * 2 + [0] * 4])
    an, bn = a.numpy()[mask.numpy() == 1], b.numpy()[mask.numpy() == 1]
    cos_ab = (an * bn).sum(-1) / np.linalg.norm(an, axis=-1) / np.linalg.norm(bn, axis=-1)
    expected = (cos_ab.mean() + 1.0 + cos_ab.mean()) / 3  # pairs (a, b), (a, a), (b, a)
    assert cosine_diversity([a, b], mask) == pytest.approx(cos_ab.mean(), abs=1e-6)
    assert cosine_diversity([a, a.clone(), b], mask) == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        cosine_diversity([a])
    with pytest.raises(ValueError, match="shape"):
        cosine_diversity([a, a[..., :4]])


def test_registry():
    """One table: each distill.loss name's own term, the teacher side it prepares once, its units."""
    assert list(HIDDEN_LOSSES) == ["rkd", "mse", "kl"]
    with pytest.raises(ValueError, match="distill.loss='cosine' is unknown; valid: rkd, mse, kl"):
        hidden_loss("cosine")
    s, t = torch.randn(2, 5, 4, generator=_gen(27)), torch.randn(2, 5, 4, generator=_gen(28))
    mask = torch.tensor([[1] * 5, [1, 1, 0, 0, 0]])
    rkd, mse, kl = (HIDDEN_LOSSES[k] for k in ("rkd", "mse", "kl"))
    torch.testing.assert_close(rkd.main(s, rkd.prepare(t, mask), mask), rkd_loss(s, t, mask))
    torch.testing.assert_close(kl.main(s, kl.prepare(t, mask), mask), kl_hidden_loss(s, t, attention_mask=mask))
    assert mse.main is None and mse.basis and kl.basis and not rkd.basis  # relations are width-free
    assert int(rkd.count(mask)) == 1 and int(kl.count(mask)) == 7  # sequences with >= 2 pairs; valid tokens
