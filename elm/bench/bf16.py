"""bf16 against fp32, side by side, where bf16 is native (``elm.utils.precision``): the real search
step, the real retrain step, and the MLM train step on a bf16 replica with fp32 master weights
(:class:`elm.utils.master.Bf16Master`, what search and retrain run) against HF ``BertForMaskedLM``
in fp32. On hardware without native bf16 each case prints ``skipped``.

Steps are interleaved (fp32, bf16, fp32, ...), so load drifts hit both columns alike.
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import tempfile

import torch

from ..modeling import ElmForMaskedLM, config_from_arch
from ..utils.master import Bf16Master
from ..utils.precision import resolve_precision
from .cases import Result, bert_arch, hf_bert, mlm_batch, random_rows, time_pair, train_step_fn
from .search_step import epoch_seconds, search_trainer


def _skip(name: str, device) -> str | None:
    if resolve_precision("bf16", device, master=True, stage="bench").bf16:
        return None
    return f"{name:<34} skipped: no native bf16 on this {device.type} (bf16 runs as fp32)"


def _step_seconds(trainer, steps: int) -> float:
    """Seconds per step without the once-per-epoch work (the search's bf16 replica is rebuilt at
    each epoch start, once per 30+ steps in a real run): an epoch of ``steps + 1`` minus one of 1."""
    return (epoch_seconds(trainer, steps + 1) - epoch_seconds(trainer, 1)) / steps


def _interleaved(make, steps: int, repeats: int) -> tuple[float, float]:
    """Median seconds per step of ``make("fp32")`` and ``make("bf16")`` trainers, interleaved."""
    fp32, bf16 = make("fp32"), make("bf16")
    a, b = [], []
    try:
        epoch_seconds(fp32, 1), epoch_seconds(bf16, 1)  # warm-up: allocator, oneDNN kernels
        for _ in range(repeats):
            a.append(_step_seconds(fp32, steps))
            b.append(_step_seconds(bf16, steps))
    finally:
        for trainer in (fp32, bf16):
            shutil.rmtree(trainer.run_dir, ignore_errors=True)
    return statistics.median(a), statistics.median(b)


def retrain_trainer(
    device, precision: str, *, batch: int = 16, seq: int = 128, teacher_name: str | None = None
):
    """A ``RetrainTrainer`` of a 4-layer, 256-wide student on random rows: the default distillation,
    LM + RKD on every layer + logit KD through a teacher MLM head (unfitted here: the same shapes
    and cost as a fitted one)."""
    from ..retrain.teacher_head import FittedTeacherHead, new_head
    from ..retrain.trainer import RetrainSettings, RetrainTrainer
    from ..supernet import uniform_layer_map
    from ..teacher import load_teacher
    from ..train import LoopConfig

    teacher = load_teacher(teacher_name, device=device)
    train, held_out = random_rows(len(teacher.tokenizer), 8 * batch, 32, seq)
    arch = bert_arch(4, 256, 4, vocab=len(teacher.tokenizer), seq=seq)
    torch.manual_seed(0)
    model = ElmForMaskedLM(config_from_arch(arch)).to(device)
    loop = LoopConfig(epochs=2, batch_size=batch, warmup_steps=30, device=device, precision=precision, progress=False,
                      run_dir=tempfile.mkdtemp(prefix="elm-bench-"))  # fmt: skip
    kd = RetrainSettings(layer_map=uniform_layer_map(arch.num_layers, teacher.num_layers),
                         weights={"lm": 1.0, "hidden": 1.0, "point": 0.0, "kd": 1.0}, eval_batches=1)  # fmt: skip
    head = FittedTeacherHead(new_head(teacher).to(device), teacher, {})
    return RetrainTrainer(model, teacher, train, held_out, loop, kd, teacher_head=head)


STEPS = {"search": search_trainer, "retrain": retrain_trainer}  # what each real step's trainer is built by


def step_bf16_vs_fp32(
    kind: str, device, steps: int = 3, repeats: int = 2, teacher_name: str | None = None
) -> Result | str:
    """The real ``kind`` step (search: teacher + every candidate; retrain: student + teacher, LM + RKD)
    as ``precision=bf16`` runs it (CPU: bf16 compute on fp32 master weights; CUDA: autocast) against
    the same step in fp32."""
    if skip := _skip(f"{kind} step bf16 vs fp32", device):
        return skip
    make = STEPS[kind]
    a, b = _interleaved(lambda p: make(device, p, teacher_name=teacher_name), steps, repeats)
    mode = "bf16 replica + fp32 master" if device.type == "cpu" else "autocast"
    return Result(f"{kind} step ({mode})", "fp32", "bf16", 1e3 * a, 1e3 * b, ">= 1.7x (fp32 / bf16)")


def master_step_fn(model, batch, device):
    """One MLM train step as search and retrain run it in bf16: replica forward/backward, fp32 AdamW."""
    model.to(device).train()
    master = Bf16Master(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids, mask, labels = batch

    def step():
        master.compute(input_ids=ids, attention_mask=mask, labels=labels).loss.float().backward()
        master.gradients_to_master()
        opt.step()
        opt.zero_grad(set_to_none=True)
        master.refresh()

    return step


def mlm_bf16_vs_hf_fp32(
    device, layers=4, hidden=256, heads=4, batch=32, seq=128, repeats=5, warmup=2
) -> Result | str:
    """ELM's MLM step in bf16 (replica + fp32 master) vs HF ``BertForMaskedLM`` in fp32."""
    name = f"MLM step bf16 vs HF fp32 {layers}L/{hidden}H"
    if skip := _skip(name, device):
        return skip
    arch = bert_arch(layers, hidden, heads, seq=seq)
    data = mlm_batch(arch.vocab_size, batch, seq, device)
    torch.manual_seed(0)
    elm_model = ElmForMaskedLM(config_from_arch(arch, hidden_dropout_prob=0.1))
    prec = resolve_precision("bf16", device, master=True, stage="bench")
    fa = (master_step_fn(elm_model, data, device) if prec.mode == "master"  # CPU: replica + fp32 master
          else train_step_fn(elm_model, data, device, prec.autocast))  # CUDA: autocast, as the stages run there
    fb = train_step_fn(hf_bert(arch, masked_lm=True), data, device, contextlib.nullcontext)
    a, b = time_pair(fa, fb, repeats, warmup, device)
    return Result(
        f"{name} b{batch}x{seq}", "BertForMaskedLM fp32", "ElmForMaskedLM bf16", b, a, ">= 4.5x (HF / ELM)"
    )
