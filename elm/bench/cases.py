"""Benchmark cases. Each times two things side by side in one process and reports a ratio.

Timings are medians over ``repeats`` after ``warmup`` untimed runs, with the two contenders
interleaved (A, B, A, B, ...) so drifts in machine load hit both alike.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..modeling import ElmForMaskedLM, ElmModel, config_from_arch
from ..space import ArchConfig, LayerConfig, SpaceConfig
from ..supernet import Supernet, extract


@dataclass
class Result:
    name: str
    a: str
    b: str
    a_ms: float
    b_ms: float
    target: str

    @property
    def ratio(self) -> float:
        return self.a_ms / self.b_ms

    def line(self) -> str:
        return (f"{self.name:<34} {self.a}: {self.a_ms:8.1f} ms  {self.b}: {self.b_ms:8.1f} ms  "
                f"ratio {self.ratio:5.2f}  (target {self.target})")  # fmt: skip


def _timed_ms(f: Callable[[], object], device: torch.device) -> float:
    """Wall milliseconds of one ``f()``, CUDA synchronised before and after."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    t0 = time.perf_counter()
    f()
    sync()
    return (time.perf_counter() - t0) * 1e3


def time_pair(
    fa: Callable[[], object], fb: Callable[[], object], repeats: int, warmup: int, device
) -> tuple[float, float]:
    for _ in range(warmup):
        fa(), fb()
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(_timed_ms(fa, device))
        tb.append(_timed_ms(fb, device))
    return statistics.median(ta), statistics.median(tb)


def bert_arch(layers: int, hidden: int, heads: int, vocab: int = 30522, seq: int = 128) -> ArchConfig:
    """A BERT-shaped architecture (E = H, FFN = 4H) expressible both as ELM and as HF BERT."""
    return ArchConfig(hidden_size=hidden, embedding_size=hidden, vocab_size=vocab, max_positions=max(512, seq),
                      layers=[LayerConfig("bert", heads, hidden // heads, 4 * hidden) for _ in range(layers)])  # fmt: skip


def hf_bert(arch: ArchConfig, masked_lm: bool):
    from transformers import BertConfig, BertForMaskedLM, BertModel

    layer = arch.layers[0]
    cfg = BertConfig(vocab_size=arch.vocab_size, hidden_size=arch.hidden_size, num_hidden_layers=arch.num_layers,
                     num_attention_heads=layer.num_heads, intermediate_size=layer.ffn_dim,
                     max_position_embeddings=arch.max_positions, attn_implementation="sdpa")  # fmt: skip
    return BertForMaskedLM(cfg) if masked_lm else BertModel(cfg, add_pooling_layer=False)


def random_rows(vocab: int, train: int, held_out: int, seq: int):
    """``(train, held-out)`` datasets of unpadded random token rows (ids from 1000 on: no special tokens)."""
    from datasets import Dataset

    ids = torch.randint(1000, vocab, (train + held_out, seq), generator=torch.Generator().manual_seed(0))
    rows = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    return rows.select(range(train)), rows.select(range(train, len(rows)))


def mlm_batch(vocab: int, batch: int, seq: int, device, p: float = 0.15, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (batch, seq), generator=g)
    labels = torch.where(torch.rand(batch, seq, generator=g) < p, ids, torch.full_like(ids, -100))
    ids = torch.where(labels != -100, torch.full_like(ids, 103), ids)
    return ids.to(device), torch.ones_like(ids).to(device), labels.to(device)


def train_step_fn(model: nn.Module, batch, device, precision_ctx) -> Callable[[], None]:
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids, mask, labels = batch

    def step():
        with precision_ctx():
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def mlm_step_vs_hf(
    device, precision_ctx, layers=4, hidden=256, heads=4, batch=32, seq=128, repeats=5, warmup=2
):
    arch = bert_arch(layers, hidden, heads, seq=seq)
    data = mlm_batch(arch.vocab_size, batch, seq, device)
    elm_model = ElmForMaskedLM(config_from_arch(arch, hidden_dropout_prob=0.1))
    fa = train_step_fn(elm_model, data, device, precision_ctx)
    fb = train_step_fn(hf_bert(arch, masked_lm=True), data, device, precision_ctx)
    a, b = time_pair(fa, fb, repeats, warmup, device)
    return Result(f"MLM train step {layers}L/{hidden}H b{batch}x{seq}", "BertForMaskedLM", "ElmForMaskedLM",
                  b, a, ">= 2.5x (HF / ELM)")  # fmt: skip


def finetune_dropout(device, precision_ctx, padded: bool, layers=6, hidden=384, heads=12, batch=32, seq=128,
                     repeats=5, warmup=2):  # fmt: skip
    """HF ``BertForSequenceClassification`` fine-tuning step (the teacher's shape), stock vs
    :func:`elm.utils.cpu_dropout.use_cpu_dropout` (same init, same batch). ``padded``: every
    fourth row ends at 3/4 of ``seq`` (the attention mask's path)."""
    from transformers import BertConfig, BertForSequenceClassification

    from ..utils.cpu_dropout import use_cpu_dropout

    cfg = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=4 * hidden, num_labels=5, attn_implementation="sdpa")  # fmt: skip
    ids, mask, _ = mlm_batch(cfg.vocab_size, batch, seq, device)
    if padded:
        mask[::4, 3 * seq // 4 :] = 0
    labels = torch.arange(batch, device=device) % 5
    torch.manual_seed(0)
    stock = BertForSequenceClassification(cfg)
    fast = use_cpu_dropout(BertForSequenceClassification(copy.deepcopy(cfg)))  # its own attention setting
    fa, fb = (train_step_fn(m, (ids, mask, labels), device, precision_ctx) for m in (stock, fast))
    a, b = time_pair(fa, fb, repeats, warmup, device)
    name = f"HF fine-tune step{' padded' if padded else ''} {layers}L/{hidden}H b{batch}"
    return Result(name, "stock dropout", "elm CPU dropout", a, b, "> 1 on CPU (stock / elm)")


def inference_vs_hf(
    device, precision_ctx, batch: int, layers=4, hidden=256, heads=4, seq=128, repeats=7, warmup=2
):
    arch = bert_arch(layers, hidden, heads, seq=seq)
    ids, mask, _ = mlm_batch(arch.vocab_size, batch, seq, device)
    ours = ElmModel(config_from_arch(arch)).to(device).eval()
    hf = hf_bert(arch, masked_lm=False).to(device).eval()

    def run(model):
        def f():
            with torch.inference_mode(), precision_ctx():
                model(input_ids=ids, attention_mask=mask)

        return f

    a, b = time_pair(run(ours), run(hf), repeats, warmup, device)
    return Result(f"inference b{batch}x{seq}", "ElmModel", "BertModel", a, b, "<= 1.0x (ELM / HF)")


def default_supernet(device, space: SpaceConfig | None = None) -> Supernet:
    space = space or SpaceConfig().resolve(384)  # the default space under the MiniLM teacher
    return Supernet(space, vocab_size=30522, max_positions=512, teacher_hidden_size=384,
                    teacher_layers=6).to(device)


def supernet_vs_standalone(device, precision_ctx, batch=16, seq=128, repeats=5, warmup=2):
    """Active-path train step of the supernet (sliced weights) vs the extracted standalone model."""
    net = default_supernet(device)
    for layer in net.layers:  # a mixed subnet after some growth
        for cand in layer:
            cand.grow_ffn(264)
    net.set_active([i % len(net.layers[0]) for i in range(len(net.layers))])
    standalone = extract(net).to(device)
    ids, mask, _ = mlm_batch(30522, batch, seq, device)

    def step_fn(model, forward):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step():
            with precision_ctx():
                h = forward(ids, mask)
            h.float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    net.train(), standalone.train()
    fa = step_fn(net, lambda i, m: net(i, m))
    fb = step_fn(standalone, lambda i, m: standalone(input_ids=i, attention_mask=m).last_hidden_state)
    a, b = time_pair(fa, fb, repeats, warmup, device)
    return Result(f"supernet active path b{batch}x{seq}", "Supernet", "standalone", a, b, "<= 1.2x")


def analysis_share(device, precision_ctx, steps_per_epoch: int = 30, batch: int = 8, seq: int = 128,
                   repeats: int = 3, teacher_name: str | None = None, analysis_batch: int = 16):
    """PCA + CKA + diversity analysis time as a share of a default search epoch (target <= 5%)."""
    from ..search.analysis import PCAConfig, analyse
    from ..teacher import load_teacher

    teacher = load_teacher(teacher_name, device=device)
    net = default_supernet(device)
    params = [p for n, p in net.named_parameters() if not n.startswith("embeddings.")]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids, mask, _ = mlm_batch(len(teacher.tokenizer), batch, seq, device)
    held_out = mlm_batch(len(teacher.tokenizer), analysis_batch, seq, device, seed=1)[:2]
    from ..distill.losses import rkd_loss

    def hidden_states(ids, mask):  # the teacher may be stored in half precision
        return tuple(h.float() for h in teacher(ids, mask).hidden_states)

    def step():
        hidden = hidden_states(ids, mask)
        with precision_ctx():
            outs = net.blockwise(hidden, mask)
        loss = sum(rkd_loss(o.float(), net.block_targets(hidden, li), mask)
                   for li, row in enumerate(outs) for o in row)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def analysis():
        analyse(net, hidden_states(*held_out), held_out[1], PCAConfig())

    a, s = time_pair(analysis, step, repeats, 1, device)
    epoch = s * steps_per_epoch
    return Result(f"PCA+CKA analysis vs epoch ({steps_per_epoch} steps)", "analysis", "epoch", a, epoch + a,
                  "<= 5% of an epoch")  # fmt: skip


def matmul_peak(device, n: int = 2048, repeats: int = 5, dtype: torch.dtype | None = None) -> float:
    """Measured dense matmul throughput (FLOP/s) on this device in ``dtype`` (default: bf16 on
    CUDA, fp32 elsewhere)."""
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def four_matmuls() -> None:
        for _ in range(4):
            a @ b

    seconds = [_timed_ms(four_matmuls, device) / 4e3 for _ in range(repeats + 1)]  # the first: warm-up
    return 2 * n**3 / statistics.median(seconds[1:])


def mlm_step_flops(arch: ArchConfig, batch: int, seq: int, mask_p: float = 0.15) -> float:
    """FLOPs of one MLM train step (forward + backward = 3x forward) with masked-only logits."""
    tokens = batch * seq
    layer_params = sum(layer.num_parameters(arch.hidden_size) for layer in arch.layers)
    attention = sum(4 * batch * seq * seq * layer.attention_size for layer in arch.layers)
    embedding, hidden = arch.embedding_size, arch.hidden_size
    head = mask_p * tokens * 2 * (hidden * embedding + embedding * arch.vocab_size)
    return 3 * (2 * tokens * layer_params + attention + head)


def flops_utilisation(device, precision_ctx, result: Result, layers=4, hidden=256, batch=32, seq=128) -> str:
    """Achieved FLOP/s of the ELM MLM step vs measured matmul peak, and the FLOP ratio HF/ELM:
    the speed-up that masked-only logits can give at most when both run at the same FLOP/s."""
    peak = matmul_peak(device)
    arch = bert_arch(layers, hidden, 4, seq=seq)
    ours = mlm_step_flops(arch, batch, seq)
    achieved = ours / (result.b_ms / 1e3)
    bound = mlm_step_flops(arch, batch, seq, mask_p=1.0) / ours
    return (f"{'MLM train step FLOP/s':<34} achieved {achieved / 1e9:8.1f} GFLOP/s  matmul peak {peak / 1e9:8.1f} "
            f"GFLOP/s  fraction {achieved / peak:5.2f}  (FLOP ratio HF/ELM {bound:4.2f}: the speed-up from FLOPs alone)")  # fmt: skip
