"""Inheritance from the teacher, the shared basis and chained (whole-model) scores.

The references are independent: the teacher's own forward (real MiniLM weights), numpy /
scikit-learn statistics, scipy's t distribution, and hand-built layers whose answer is known.
The composition test fails if the chosen blocks stop working on each other's outputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from elm.modeling import ElmModel, config_from_arch
from elm.modeling.modeling_elm import attention_bias
from elm.search.score import ChainScorer, paired_intervals
from elm.supernet import CandidateBlock, SpaceConfig, Supernet, extract
from elm.supernet.basis import Basis, Moments, principal_directions
from elm.supernet.inherit import (
    LayerSource,
    inherit_candidate,
    inherit_supernet,
    moments_in_basis,
    rankings,
)
from elm.supernet.teacher_weights import (
    InheritError,
    TeacherLayer,
    collect_stats,
    layer_forward,
    read_teacher,
)


@pytest.fixture(scope="module")
def batches(teacher, tmp_path_factory):
    from elm.data import load_corpus
    from elm.data.collate import sample_batches

    data = load_corpus("bbc", teacher.tokenizer, seq_len=32, val_fraction=0.2, max_docs=24,
                       cache_dir=str(tmp_path_factory.mktemp("corpus")))  # fmt: skip
    rows = sample_batches(data["train"], 0, 3, 4)
    rows[0]["attention_mask"][1, 20:] = 0  # padding must be ignored everywhere
    return rows


@pytest.fixture(scope="module")
def read(teacher, batches):
    embeddings, layers = read_teacher(teacher)
    return embeddings, layers, collect_stats(teacher, embeddings, layers, batches)


# ---- basis and moments ------------------------------------------------------------------------


def test_moments_and_pca_basis_match_numpy_and_sklearn() -> None:
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 12)) @ rng.normal(size=(12, 12)) + rng.normal(size=12)
    m = Moments.zeros(12)
    m.add(torch.tensor(x[:150]))
    m.add(torch.tensor(x[150:]))
    np.testing.assert_allclose(m.mean.numpy(), x.mean(0), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(m.covariance.numpy(), np.cov(x.T, ddof=0), rtol=1e-9, atol=1e-9)
    # the top directions span sklearn's principal subspace
    p = principal_directions(m, 4).numpy()
    ref = PCA(4).fit(x).components_.T
    np.testing.assert_allclose(p @ p.T, ref @ ref.T, atol=1e-8)
    # a basis from moments: orthonormal, orthogonal to the ones direction, maps like (x - mean) @ P
    basis = Basis.pca(m, 4)
    proj = basis.proj.double()
    np.testing.assert_allclose((proj.T @ proj).numpy(), np.eye(4), atol=1e-6)
    assert float((torch.ones(12, dtype=torch.float64) @ proj).abs().max()) < 1e-6
    xs = basis.to_student(torch.tensor(x, dtype=torch.float32))
    torch.testing.assert_close(xs, (torch.tensor(x, dtype=torch.float32) - basis.mean) @ basis.proj)
    # the moments of the mapped data, from the moments alone
    mapped = moments_in_basis(m, basis)
    np.testing.assert_allclose(mapped.covariance.numpy(), np.cov(xs.double().numpy().T, ddof=0), rtol=1e-4, atol=1e-6)
    assert Basis.pca(m, 12).is_identity and not basis.is_identity
    with pytest.raises(ValueError, match="wider than the teacher"):
        Basis.pca(m, 13)


def test_paired_intervals_match_scipy() -> None:
    from scipy import stats

    rng = np.random.default_rng(1)
    losses = torch.tensor(rng.normal(1.0, 0.1, size=(8, 5)))
    losses[:, 1] -= 0.2  # the best of group [0, 1, 2]
    out = paired_intervals(losses, [[0, 1, 2], [3, 4]])
    diff = (losses[:, 0] - losses[:, 1]).numpy()
    low, high = stats.t.interval(0.95, 7, loc=diff.mean(), scale=stats.sem(diff))
    assert out[0]["best"] == 1 and out[0]["diff"] == pytest.approx(diff.mean())
    assert (out[0]["low"], out[0]["high"]) == pytest.approx((low, high))
    assert out[1]["diff"] == 0.0 and out[3]["best"] in (3, 4)
    single = paired_intervals(losses[:1], [[0, 1, 2]])
    assert single[0]["low"] is None and single[0]["high"] is None  # one batch: no interval


# ---- the teacher's weights ---------------------------------------------------------------------


def test_layer_forward_recomputes_the_teacher(teacher, batches, read) -> None:
    _, layers, stats = read
    batch = batches[0]
    hidden = teacher(batch["input_ids"], batch["attention_mask"]).hidden_states
    valid = batch["attention_mask"].bool()
    for t, layer in enumerate(layers):
        out = layer_forward(layer, hidden[t].float(), batch["attention_mask"])["out"]
        torch.testing.assert_close(out[valid], hidden[t + 1][valid].float(), atol=2e-5, rtol=1e-5)
    assert stats.tokens == int(sum(b["attention_mask"].sum() for b in batches))
    assert all(v.shape == (12,) and bool((v > 0).all()) for v in stats.head_importance)


def test_a_full_size_candidate_and_student_are_the_teacher(teacher, batches, read) -> None:
    """Every head and neuron stored and active, embeddings at the teacher's width: the inherited
    supernet's extracted model computes the teacher's hidden states exactly."""
    space = SpaceConfig(num_layers=6, hidden_size=384, embedding_size=384, blocks=["bert"], shares=["none"],
                        head_dim=32, families={"bert": {"heads": 12}}, ffn_init=1536, ffn_unit=1, ffn_max=1536, dropout=0.0).validate()  # fmt: skip
    net = Supernet(space, vocab_size=len(teacher.tokenizer), max_positions=teacher.max_positions,
                   teacher_hidden_size=384, teacher_layers=6)  # fmt: skip
    report = inherit_supernet(net, teacher, batches)
    assert report["basis"] == "identity" and report["attention_inherited"] == 6
    model = extract(net, ElmModel, [0] * 6).eval()
    batch = batches[0]
    want = teacher(batch["input_ids"], batch["attention_mask"]).hidden_states
    got = model(**batch, output_hidden_states=True).hidden_states
    valid = batch["attention_mask"].bool()
    for t in range(7):
        torch.testing.assert_close(got[t][valid], want[t][valid].float(), atol=5e-5, rtol=1e-5)


def _toy_layer(hidden: int = 8, heads: int = 2, ffn: int = 6, seed: int = 0, value_from: str | None = None):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    a = heads * 4
    layer = TeacherLayer(q_w=r(a, hidden), q_b=r(a), k_w=r(a, hidden), k_b=r(a), v_w=r(a, hidden), v_b=r(a),
                         o_w=r(hidden, a), o_b=r(hidden), ln1_w=1 + r(hidden), ln1_b=r(hidden), up_w=r(ffn, hidden),
                         up_b=r(ffn), down_w=r(hidden, ffn), down_b=r(hidden), ln2_w=1 + r(hidden), ln2_b=r(hidden),
                         num_heads=heads)  # fmt: skip
    if value_from is not None:  # V = (shared projection) M + c per head, exactly: the fit must find it
        src_w, src_b = getattr(layer, f"{value_from}_w"), getattr(layer, f"{value_from}_b")
        for h in range(heads):
            rows = slice(h * 4, (h + 1) * 4)
            m, c = r(4, 4) + torch.eye(4), r(4)
            layer.v_w[rows] = m.T @ src_w[rows]
            layer.v_b[rows] = src_b[rows] @ m + c
    return layer


@pytest.mark.parametrize("share", ["qv", "kv"])
def test_shared_attention_refits_the_value_exactly_when_it_can(share: str) -> None:
    layer = _toy_layer(value_from="q" if share == "qv" else "k")
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(4))
    inputs = Moments.zeros(8)
    inputs.add(x.reshape(-1, 8))
    cand = CandidateBlock("bert", 8, max_heads=2, head_dim=4, share=share, ffn_init=6, ffn_max=6, dropout=0.0).eval()
    heads, neurons = torch.arange(2), torch.arange(6)
    src = LayerSource(layer, heads, neurons, torch.zeros(2, 8), torch.zeros(6), inputs)
    inherit_candidate(cand, src)
    want = layer_forward(layer, x)["out"]
    torch.testing.assert_close(cand(x, None, False)[0], want, atol=1e-4, rtol=1e-4)


def test_ffn_mean_compensation_and_growth_activate_inherited_neurons() -> None:
    layer = _toy_layer(ffn=6)
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(5))
    inputs = Moments.zeros(8)
    inputs.add(x.reshape(-1, 8))
    parts = layer_forward(layer, x)
    mean = parts["ffn"].reshape(-1, 6).mean(0)
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    src = LayerSource(layer, torch.arange(2), order, torch.zeros(2, 8), mean, inputs)
    cand = CandidateBlock("bert", 8, max_heads=2, head_dim=4, share="none", ffn_init=2, ffn_max=4, dropout=0.0).eval()
    inherit_candidate(cand, src)
    ffn = cand.ffns[0]
    # active: neurons 3, 0; stored for growth: 5, 1; the four idle ones' mean output is in the bias
    idle = order[2:]
    torch.testing.assert_close(ffn.down.bias, layer.down_b + layer.down_w[:, idle] @ mean[idle])
    torch.testing.assert_close(ffn.up.weight[:4], layer.up_w[order[:4]])
    ffn.grow(4)  # the next two teacher neurons, as inherited, and their mean leaves the bias
    full = CandidateBlock("bert", 8, max_heads=2, head_dim=4, share="none", ffn_init=4, ffn_max=4, dropout=0.0).eval()
    inherit_candidate(full, src)
    torch.testing.assert_close(cand(x, None, False)[0], full(x, None, False)[0], atol=1e-5, rtol=1e-5)


def test_non_bert_teachers_are_refused_in_one_line() -> None:
    from types import SimpleNamespace

    model = torch.nn.Linear(2, 2)
    model.config = SimpleNamespace(model_type="gpt2")
    fake = SimpleNamespace(model=model, causal=True, name="tiny-gpt2")
    with pytest.raises(InheritError, match="tiny-gpt2.*gpt2.*inherit.enabled=false"):
        read_teacher(fake)


# ---- composition: the chosen blocks chain ----------------------------------------------------


@pytest.mark.parametrize("hidden", [384, 192])
def test_inherited_blocks_compose_far_better_than_random_init(teacher, batches, hidden: int) -> None:
    """The extracted model, chained from its own embeddings, stays close to the teacher (RKD at the
    last layer at most half a random init's), in the identity basis and in a narrower PCA basis;
    any choice of blocks does, because all of them read and write one basis."""
    space = SpaceConfig(num_layers=3, hidden_size=hidden, embedding_size=128, head_dim=32,
                        families={"bert": {"heads": 4}, "mobilebert": {"heads": 4, "bottleneck_size": 96}}, ffn_init=132, ffn_unit=132, ffn_max=264,
                        dropout=0.0).validate()  # fmt: skip
    torch.manual_seed(0)
    net = Supernet(space, vocab_size=len(teacher.tokenizer), max_positions=teacher.max_positions,
                   teacher_hidden_size=384, teacher_layers=6)  # fmt: skip
    inherit_supernet(net, teacher, batches)
    scored = [(b["input_ids"], b["attention_mask"], teacher(b["input_ids"], b["attention_mask"]).hidden_states)
              for b in batches]  # fmt: skip
    scorer = ChainScorer(net, scored, point=1.0)
    for choice in ([0, 0, 0], [0, 4, 2]):
        arch = net.active_arch(choice)
        random = ElmModel(config_from_arch(arch, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
        mine, theirs = scorer.of_choice(choice), scorer.of_model(random)
        assert mine["rkd"][-1] < 0.5 * theirs["rkd"][-1], (choice, mine["rkd"], theirs["rkd"])
        # the whole-model score is what the extracted model computes
        model = extract(net, ElmModel, choice).eval()
        torch.testing.assert_close(torch.tensor(scorer.of_model(model)["rkd"]), torch.tensor(mine["rkd"]))
    # and the blocks themselves read the teacher's states in that one basis
    x = net.block_inputs(scored[1][2], 1)
    mask = attention_bias(scored[1][1], False, x.shape[1])
    if hidden == 384:
        assert x is scored[1][2][net.layer_map[1]]
    torch.testing.assert_close(net.blockwise(scored[1][2], scored[1][1])[1][0], net.layers[1][0](x, mask, False)[0])


def test_rankings_put_the_most_important_first(read) -> None:
    _, _, stats = read
    heads, neurons = rankings(stats, 2)
    imp = stats.head_importance[2]
    assert bool((imp[heads][:-1] >= imp[heads][1:]).all()) and sorted(heads.tolist()) == list(range(12))
    assert F.relu(stats.neuron_importance[2][neurons][1:] - stats.neuron_importance[2][neurons][:-1]).max() == 0
