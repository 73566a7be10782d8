"""The search trainer (elm.search.trainer on the elm.train scaffold): it learns, its state round-trips
(widths included, also from the older layout), held-out teacher states are cached, skip candidates,
the NaN guard and bf16 master weights. Real teacher, real corpus rows; nothing is mocked."""

from __future__ import annotations

import math

import pytest
import torch

from elm.search.analysis import CKAConfig, PCAConfig
from elm.space import SpaceConfig


def make_space(mobilebert: dict, **kw) -> SpaceConfig:
    families = {"bert": {"heads": 4}, "mobilebert": {"heads": 3, "bottleneck_size": 12, "num_ffn": 2, **mobilebert}}
    base = dict(num_layers=2, embedding_size=12, head_dim=4, families=families, ffn_init=8, ffn_unit=8, ffn_max=40,
                dropout=0.0)  # fmt: skip
    return SpaceConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def corpus(teacher, tmp_path_factory):
    from elm.data import load_corpus

    return load_corpus("bbc", teacher.tokenizer, seq_len=32, val_fraction=0.2, max_docs=16,
                       cache_dir=str(tmp_path_factory.mktemp("corpus")))  # fmt: skip


def make_trainer(teacher, corpus, run_dir, space=None, **kw):
    """A small search trainer; ``kw`` are loop (``LoopConfig``) or ``SearchSettings`` fields."""
    from dataclasses import fields

    from elm.search.trainer import SearchSettings, SearchTrainer

    torch.manual_seed(0)
    space = space or make_space(hidden_size=32, mobilebert={"heads": 2, "bottleneck_size": 16}, shares=["none", "qv"])
    search_keys = {f.name for f in fields(SearchSettings)}
    loop = dict(epochs=3, steps_per_epoch=5, batch_size=4, lr=3e-3, warmup_steps=1, precision="fp32",
                run_dir=run_dir, progress=False)  # fmt: skip
    loop.update({k: v for k, v in kw.items() if k not in search_keys and k not in ("pca", "cka")})
    search = SearchSettings(**{"eval_batches": 1, "analysis_batch_size": 8,
                               **{k: v for k, v in kw.items() if k in search_keys}})  # fmt: skip
    return SearchTrainer(teacher, space, corpus["train"], corpus["validation"], SearchTrainer.default_loop(**loop),
                         search, pca=kw.get("pca", PCAConfig(unit=8)),
                         cka=kw.get("cka", CKAConfig(threshold=0.8, calibrate=False)))  # fmt: skip


def test_search_trainer_learns_and_state_round_trips(teacher, corpus, tmp_path) -> None:
    from elm.search.trainer import STATE_FILE

    trainer = make_trainer(teacher, corpus, tmp_path)
    start = trainer.validate()["loss"]
    history = trainer.fit()
    assert [r["epoch"] for r in history] == [1, 2, 3] and trainer.step == 15
    end = trainer.validate()["loss"]
    mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
    assert mean(end) < mean(start) - 0.02, (start, end)
    assert mean(history[-1]["train_loss"]) < mean(history[0]["train_loss"])
    grown = sum(len(r["growth"]) for r in history)
    assert grown == 4 and not history[-1]["growth"]  # one per layer after each epoch but the last
    assert any(r["pruning"] for r in history)  # threshold 0.8: some heads go, so the state has both kinds

    def widths(t):  # the elastic state pruning and growth changed
        return {key: (c.attention.active_heads, c.ffn_dim) for *_, key, c in t.supernet.candidates()}

    assert (tmp_path / STATE_FILE).is_file()
    fresh = make_trainer(teacher, corpus, tmp_path / "other")
    assert widths(fresh) != widths(trainer)
    fresh.load_state_dict(torch.load(tmp_path / STATE_FILE, weights_only=True))  # widths travel with the weights
    assert widths(fresh) == widths(trainer)
    assert (fresh.epoch, fresh.step, fresh.history) == (trainer.epoch, trainer.step, trainer.history)
    for (name, p), q in zip(trainer.supernet.state_dict().items(), fresh.supernet.state_dict().values()):
        assert torch.equal(p, q) if torch.is_tensor(p) else p == q, name

    # a state written before the widths lived in the modules: the old "elastic" dict restores them
    legacy = trainer.state_dict()
    legacy["supernet"] = {k: v for k, v in legacy["supernet"].items() if not k.endswith("_extra_state")}
    legacy["elastic"] = {k: {"heads": h, "ffn": f} for k, (h, f) in widths(trainer).items()}
    older = make_trainer(teacher, corpus, tmp_path / "older")
    older.load_state_dict(legacy)
    assert widths(older) == widths(trainer)
    batch = next(trainer.val_batches())
    hidden = trainer.teacher_states(batch)
    trainer.supernet.eval(), fresh.supernet.eval()
    for x, y in zip(trainer.supernet.blockwise(hidden, batch["attention_mask"]),
                    fresh.supernet.blockwise(hidden, batch["attention_mask"])):  # fmt: skip
        for a, b in zip(x, y):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    with pytest.raises(ValueError, match="another space or loss"):
        make_trainer(teacher, corpus, tmp_path / "mse", loss="mse").load_state_dict(trainer.state_dict())


def test_held_out_teacher_states_are_computed_once(teacher, corpus, tmp_path, monkeypatch) -> None:
    """The teacher is frozen and the validation / analysis rows are fixed: their teacher states
    are computed once (within the memory cap), and the scores do not change for it."""
    import elm.search.trainer as search_trainer

    trainer = make_trainer(teacher, corpus, tmp_path, eval_batches=2)
    calls = []
    real = trainer.teacher_states
    monkeypatch.setattr(trainer, "teacher_states", lambda batch, t=None: calls.append(1) or real(batch, t))
    first = trainer.validate()["loss"]
    trainer.analysis_batch(), trainer.analysis_batch()
    assert len(calls) == 3  # 2 validation batches + the analysis batch
    assert trainer.validate()["loss"] == first and len(calls) == 3
    monkeypatch.setattr(search_trainer, "HELD_OUT_CACHE_BYTES", 0)
    fresh = make_trainer(teacher, corpus, tmp_path / "uncached", eval_batches=2)
    monkeypatch.setattr(fresh, "teacher_states", lambda batch, t=None: calls.append(1) or real(batch, t))
    assert fresh.validate()["loss"] == first and fresh.validate()["loss"] == first
    assert len(calls) == 3 + 4 and not fresh.held_out_cache  # over the cap: recomputed every time


def test_search_trainer_with_skip_candidates(teacher, corpus, tmp_path) -> None:
    """A space with the identity family: every layer has a skip candidate, scored (the loss of passing
    the teacher's state on) but never analysed, grown or pruned; the epoch records say 0 heads/units."""
    space = make_space(hidden_size=32, mobilebert={"heads": 2, "bottleneck_size": 16}, shares=["none"],
                       blocks=["bert", "mobilebert", "skip"])  # fmt: skip
    trainer = make_trainer(teacher, corpus, tmp_path, space=space, epochs=2, steps_per_epoch=2, lr=5e-4,
                           warmup_steps=20, cka=CKAConfig())  # fmt: skip
    history = trainer.fit()
    skips = [key for *_, key, c in trainer.supernet.candidates() if c.identity]
    assert skips == ["L0.skip", "L1.skip"]
    first, last = history
    for key in skips:
        assert key not in first["pca"] and first["ffn"][key] == 0 and first["heads"][key] == 0
        assert math.isfinite(last["val_loss"][key])
    assert not any(e["candidate"] in skips for r in history for e in r["growth"] + r["pruning"])


def test_nan_loss_is_caught_named_and_the_last_good_checkpoint_kept(
    teacher, corpus, tmp_path, monkeypatch
) -> None:
    """A NaN injected into one candidate's loss at step 4 stops the search with the step and the
    candidate named; the checkpoint of step 3 (the last good one) stays on disk."""
    import elm.distill.losses as losses
    from elm.search.trainer import STATE_FILE

    trainer = make_trainer(teacher, corpus, tmp_path, checkpoint_every=1)
    real, calls = losses.rkd_loss, {"n": 0}
    poisoned = len(trainer.distiller.keys) * 3 + 1  # the second candidate of the 4th step

    def rkd_loss(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == poisoned + 1 else loss

    monkeypatch.setattr(losses, "rkd_loss", rkd_loss)  # what the registry's rkd entry calls
    with pytest.raises(FloatingPointError) as err:
        trainer.fit()
    message = str(err.value)
    assert "step 3" in message and trainer.distiller.keys[1] in message and STATE_FILE in message
    state = torch.load(tmp_path / STATE_FILE, map_location="cpu", weights_only=False)
    assert state["step"] == 3
    assert all(torch.isfinite(v).all() for v in state["supernet"].values() if torch.is_tensor(v) and v.is_floating_point())


def test_search_bf16_master_weights_match_fp32(teacher, corpus, tmp_path, monkeypatch) -> None:
    """precision=bf16 on a CPU with native bf16 (forced: ELM_CPU_BF16=1; emulated, so slow, where
    the CPU lacks it) trains on a bf16 replica with fp32 master weights across growth and pruning:
    the candidates' validation losses (fp32 scoring) are within 1% of an fp32 run's."""
    monkeypatch.setenv("ELM_CPU_BF16", "1")
    low = make_trainer(teacher, corpus, tmp_path / "bf16", precision="bf16")  # seeds 0: same init, same dropout
    assert low.prec.mode == "master" and low.master is not None
    history = {"bf16": low.fit()}
    monkeypatch.setenv("ELM_CPU_BF16", "0")
    ref = make_trainer(teacher, corpus, tmp_path / "fp32", precision="bf16")
    assert ref.prec.mode == "fp32" and ref.master is None
    history["fp32"] = ref.fit()
    assert [len(r["growth"]) for r in history["bf16"]] == [len(r["growth"]) for r in history["fp32"]]
    end = {k: t.validate()["loss"] for k, t in (("bf16", low), ("fp32", ref))}
    mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
    assert mean(end["bf16"]) == pytest.approx(mean(end["fp32"]), rel=0.01)
    assert end["bf16"] != end["fp32"]  # the bf16 run did compute in bf16
    assert all(p.dtype == torch.float32 for p in low.supernet.parameters())  # the master (saved, extracted) is fp32

