"""``python -m elm.bench [--quick] [--device cpu|cuda] [--only NAME ...]``: print every ratio.

Cases: ELM vs HF BERT MLM train step, supernet active path vs standalone, exported model vs HF
inference (batch 1 and 32), PCA+CKA analysis share of an epoch, achieved FLOP/s vs matmul peak
(MLM step and the real search step), the HF fine-tuning step with elm's CPU dropout vs stock,
the search step in bf16 vs fp32 where bf16 is native, and the ONNX export under onnxruntime vs PyTorch eager (batch 1 and 32, CPU), and causal generation
with the KV cache vs without.
"""

from __future__ import annotations

import argparse
import platform

import torch

from ..utils.cli import fail_cleanly
from ..utils.precision import resolve_precision
from ..utils.runtime import keep_freed_memory, resolve_device
from . import bf16, cases, deploy, search_step

CASES = ("mlm", "finetune", "inference", "supernet", "analysis", "search", "bf16", "onnx", "generate")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m elm.bench", description=__doc__)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--teacher", help="teacher for the analysis case (default: packaged MiniLM)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke test)")
    parser.add_argument("--only", nargs="*", default=None, help=f"subset of: {' '.join(CASES)}")
    args = parser.parse_args(argv)  # argparse: a bad flag is one usage line and exit 2
    unknown = sorted(set(args.only or []) - set(CASES))
    if unknown:
        parser.error(f"--only {' '.join(unknown)}: unknown case(s); valid: {' '.join(CASES)}")
    with fail_cleanly("bench"):
        run(args)


def _print(result: cases.Result | str) -> None:
    print(result if isinstance(result, str) else result.line(), flush=True)


def run(args: argparse.Namespace) -> None:
    keep_freed_memory()  # as the stage commands do
    device = resolve_device(args.device)
    reps = 2 if args.quick else 5
    prec = resolve_precision(args.precision, device, master=True, stage="bench")
    ctx = prec.autocast  # the HF-vs-ELM cases: autocast on CUDA, else the precision's dtype as is
    want = set(args.only or CASES)
    print(f"# elm.bench on {device_name(device)}, torch {torch.__version__}, precision {args.precision} "
          f"(runs as {prec.mode})")  # fmt: skip
    if "mlm" in want:
        mlm = cases.mlm_step_vs_hf(device, ctx, repeats=reps)
        _print(mlm)
        _print(cases.flops_utilisation(device, ctx, mlm))
    if "finetune" in want:
        trainer_ctx = (lambda: torch.autocast("cpu", torch.bfloat16)) if prec.bf16 and device.type == "cpu" else ctx
        for padded in (False, True):  # autocast, as the HF Trainer
            _print(cases.finetune_dropout(device, trainer_ctx, padded, repeats=reps))
    if "supernet" in want:
        _print(cases.supernet_vs_standalone(device, ctx, repeats=reps))
    if "inference" in want:
        for batch in (1, 32):
            _print(cases.inference_vs_hf(device, ctx, batch, repeats=reps + 2))
    if "analysis" in want:
        _print(cases.analysis_share(device, ctx, repeats=max(2, reps - 2), teacher_name=args.teacher))
    if "search" in want:
        _print(search_step.search_step_utilisation(device, prec, repeats=max(1, reps - 3),
                                                   teacher_name=args.teacher))
    if "bf16" in want:
        _print(bf16.mlm_bf16_vs_hf_fp32(device, repeats=reps))
        for kind in bf16.STEPS:
            _print(bf16.step_bf16_vs_fp32(kind, device, repeats=reps, teacher_name=args.teacher))  # noisy: a median of 5
    if "generate" in want and device.type == "cpu":
        _print(deploy.generation_cache(repeats=max(1, reps - 2)))
    if "onnx" in want and device.type == "cpu":  # onnxruntime's CPU provider
        for batch in (1, 32):
            _print(deploy.onnx_vs_eager(batch, repeats=reps + 2))


if __name__ == "__main__":
    main()
