"""The shared training scaffold (elm.train.loop): plan checks, schedules, settings from a config
node, and a toy trainer's resume, NaN guard and accumulation through the scaffold alone."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from elm.train import SCHEDULES, LoopConfig, TrainLoop
from elm.utils.preempt import Preempted


class ToyLoop(TrainLoop):
    """Least squares on fixed random rows: the smallest trainer the scaffold runs."""

    stage, state_file = "toy", "toy_state.pt"

    def __init__(self, loop: LoopConfig, rows: int = 32, poison_at: int | None = None,
                 preempt_at: int | None = None) -> None:  # fmt: skip
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(rows, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(rows, generator=g)
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.1), nn.Linear(8, 1))
        self.poison_at, self.preempt_at = poison_at, preempt_at
        super().__init__(self.net, rows, loop)

    def batches(self, epoch, first):
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(epoch))
        for step in range(first, self.steps_per_epoch):
            idx = order[step * self.batch_size : (step + 1) * self.batch_size]
            micro = [{"x": self.x[idx[a : a + self.micro_batch]], "y": self.y[idx[a : a + self.micro_batch]]}
                     for a in range(0, self.batch_size, self.micro_batch)]  # fmt: skip
            yield micro, len(idx), None

    def train_step(self, micro, extra=None):
        def forward(i, batch):  # noqa: ARG001
            loss = ((self.net(batch["x"]).squeeze(-1) - batch["y"]) ** 2).mean()
            if self.step == self.poison_at:
                loss = loss * float("nan")
            if not torch.isfinite(loss):
                raise self.nonfinite(["mse"])
            return loss / len(micro), loss.detach() / len(micro)

        value = sum(self.accumulate(micro, forward))
        self.optimizer_step()
        if self.step == self.preempt_at:
            self.preemption.requested = True  # what the SIGTERM handler sets
        return {"mse": float(value)}

    def epoch_record(self, train):
        return {"epoch": self.epoch + 1, "step": self.step, "train_loss": train}

    def extra_state(self):
        return {"net": self.net.state_dict()}

    def load_extra_state(self, state):
        self.net.load_state_dict(state["net"])


def loop(tmp_path, **kw) -> LoopConfig:
    return LoopConfig(**{"epochs": 3, "batch_size": 8, "lr": 0.1, "warmup_steps": 2, "precision": "fp32",
                         "run_dir": tmp_path, "progress": False, **kw})  # fmt: skip


def test_settings_from_a_config_node_and_plan_checks(tmp_path) -> None:
    node = OmegaConf.create({"epochs": 2, "batch_size": 4, "lr": 1e-3, "strategy": "dp", "log_every": 5})
    cfg = LoopConfig.from_config(node, seed=3, device="cpu", run_dir=tmp_path, unrelated=1)
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.log_every, cfg.seed) == (2, 4, 1e-3, 5, 3)
    assert cfg.grad_accum == 1 and cfg.schedule == "linear"  # not in the node: the defaults
    assert ToyLoop.plan_steps(loop(tmp_path), 33) == 4 and ToyLoop.plan_steps(loop(tmp_path, steps_per_epoch=2), 33) == 2
    with pytest.raises(ValueError, match=r"toy.schedule='step' is unknown; valid: linear, cosine, ramped_cosine"):
        ToyLoop(loop(tmp_path, schedule="step"))
    with pytest.raises(ValueError, match=r"toy.batch_size=8 must be divisible by world size x grad_accum \(1 x 3\)"):
        ToyLoop(loop(tmp_path, grad_accum=3))
    with pytest.raises(ValueError, match="the training split has 4 blocks, fewer than one batch of 8"):
        ToyLoop(loop(tmp_path), rows=4)


def test_ramped_cosine_is_the_ramp_times_a_cosine_over_all_steps() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = SCHEDULES["ramped_cosine"](opt, 4, 10)
    seen = []
    for _ in range(12):
        seen.append(opt.param_groups[0]["lr"])
        opt.step(), sched.step()
    want = [min(1, (s + 1) / 4) * 0.5 * (1 + math.cos(math.pi * min(s, 10) / 10)) for s in range(12)]
    assert seen == pytest.approx(want, abs=1e-12)


def test_toy_trainer_learns_and_a_preempted_run_resumes_to_the_same_weights(tmp_path) -> None:
    full = ToyLoop(loop(tmp_path / "full"))
    history = full.fit()
    assert [r["step"] for r in history] == [4, 8, 12] and full.train_time_s > 0
    assert history[-1]["train_loss"]["mse"] < 0.5 * history[0]["train_loss"]["mse"]
    assert torch.load(tmp_path / "full" / "toy_state.pt", weights_only=False)["step"] == 12  # landed before fit returned

    cut = ToyLoop(loop(tmp_path / "cut"), preempt_at=6)  # SIGTERM in the middle of epoch 2
    with pytest.raises(Preempted) as stop:
        cut.fit()
    assert stop.value.code == 143 and stop.value.message.startswith("preempted at step 6: checkpoint in")
    state = torch.load(tmp_path / "cut" / "toy_state.pt", weights_only=False)
    assert (state["step"], state["epoch"], len(state["history"])) == (6, 1, 1) and state["epoch_sums"]["mse"] > 0
    resumed = ToyLoop(loop(tmp_path / "cut"))
    resumed.load_state_dict(state)
    assert [r["step"] for r in resumed.fit()] == [4, 8, 12]
    for a, b in zip(full.net.state_dict().values(), resumed.net.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # same batches, dropout masks and schedule
    assert [r["train_loss"]["mse"] for r in resumed.history] == pytest.approx([r["train_loss"]["mse"] for r in history])


def test_accumulation_gives_the_one_batch_gradient(tmp_path) -> None:
    one, two = ToyLoop(loop(tmp_path / "a", epochs=1)), ToyLoop(loop(tmp_path / "b", epochs=1, grad_accum=2))
    one.net.eval(), two.net.eval()  # no dropout: the two splits see the same function
    micro, _, _ = next(iter(one.batches(0, 0)))
    halves = [{k: v[a : a + 4] for k, v in micro[0].items()} for a in (0, 4)]
    for trainer, batches in ((one, micro), (two, halves)):
        n = len(batches)
        trainer.accumulate(batches, lambda i, b, t=trainer, n=n: (((t.net(b["x"]).squeeze(-1) - b["y"]) ** 2).mean() / n, None))
    for p, q in zip(one.net.parameters(), two.net.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_nan_guard_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path) -> None:
    trainer = ToyLoop(loop(tmp_path, checkpoint_every=1), poison_at=5)
    with pytest.raises(FloatingPointError) as err:
        trainer.fit()
    assert str(err.value) == (f"non-finite toy loss at step 5 (epoch 2) in ['mse']; the last good checkpoint is kept "
                              f"in {tmp_path / 'toy_state.pt'}")  # fmt: skip
    assert torch.load(tmp_path / "toy_state.pt", weights_only=False)["step"] == 5
