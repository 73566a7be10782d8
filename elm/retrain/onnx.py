"""ONNX export of an exported student (``python -m elm.retrain.onnx <model dir> [--out F]``).

``torch.onnx.export(..., dynamo=True)``, batch and sequence length dynamic, the attention mask a
real graph input (the legacy tracer froze the all-ones shortcut of
``elm.modeling.modeling_elm.attention_bias`` into the graph and dropped the mask). A classifier
gives ``logits``, an LM export the encoder's ``last_hidden_state``; the file is checked against
PyTorch eager with onnxruntime on padded batches (docs/retrain.md, "ONNX export").
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path
from typing import Any

import torch

from ..utils.hub import classifier_head

ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


def check_packages() -> None:
    missing = [p for p in ONNX_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise ValueError(f"ONNX export needs {', '.join(missing)}: pip install {' '.join(ONNX_PACKAGES)}")


def load_for_export(model_dir: str | Path) -> tuple[torch.nn.Module, str]:
    """The model to export (eval mode, fp32) and the name of its output."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    import elm  # noqa: F401 - registers the ELM classes with the Auto factories

    config = Path(model_dir) / "config.json"
    if not config.is_file():
        raise ValueError(f"{model_dir} is not an exported model dir (no config.json)")
    if classifier_head(json.loads(config.read_text()).get("architectures")):
        return AutoModelForSequenceClassification.from_pretrained(model_dir).eval(), "logits"
    return AutoModel.from_pretrained(model_dir).eval(), "last_hidden_state"


class _Output(torch.nn.Module):
    """``model(input_ids, attention_mask).<output>`` as a plain tensor function."""

    def __init__(self, model: torch.nn.Module, output: str) -> None:
        super().__init__()
        self.model, self.output = model, output

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(input_ids=input_ids, attention_mask=attention_mask), self.output)


def padded_batch(vocab_size: int, batch: int = 3, seq_len: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids with rows of decreasing length (the padding the mask must hide)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab_size, (batch, seq_len), generator=g)
    mask = torch.ones_like(ids)
    for row in range(1, batch):
        mask[row, max(1, seq_len - row * seq_len // (batch + 1)) :] = 0
    return ids, mask


def max_difference(session: Any, module: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> float:
    """Largest |onnxruntime - PyTorch| on the batch, at the positions the mask keeps."""
    got = torch.from_numpy(session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0])
    with torch.no_grad():
        want = module(ids, mask)
    if want.dim() == 3:  # [B, T, H]: padded positions carry no meaning
        keep = mask.bool()
        got, want = got[keep], want[keep]
    return float((got - want).abs().max())


def export_onnx(model_dir: str | Path, out: str | Path | None = None, *, tolerance: float = 1e-4,
                opset: int = 18) -> dict[str, Any]:  # fmt: skip
    """Export ``model_dir`` to ``out`` (default ``<model_dir>/model.onnx``) and check it."""
    check_packages()
    import onnxruntime as ort

    model, output = load_for_export(model_dir)
    module = _Output(model, output).eval()
    out = Path(out) if out is not None else Path(model_dir) / "model.onnx"
    ids, mask = padded_batch(model.config.vocab_size)
    dynamic = {0: "batch", 1: "sequence"}
    program = torch.onnx.export(module, (ids, mask), dynamo=True, opset_version=opset, verbose=False,
                                input_names=["input_ids", "attention_mask"], output_names=[output],
                                dynamic_shapes=(dynamic, dynamic))  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(out))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    checks = {f"{b}x{t}": max_difference(session, module, *padded_batch(model.config.vocab_size, b, t, seed=b))
              for b, t in ((3, 32), (5, 17), (1, 9))}  # fmt: skip
    worst = max(checks.values())
    if not worst <= tolerance:
        out.unlink(missing_ok=True)
        raise ValueError(f"the ONNX export differs from PyTorch by {worst:.2e} (> tolerance {tolerance:g}); "
                         f"per batch: {checks}; nothing was kept")  # fmt: skip
    return {"path": str(out), "output": output, "opset": opset, "max_difference": checks}


def main(argv: list[str] | None = None) -> None:
    from ..utils.cli import fail_cleanly

    parser = argparse.ArgumentParser(prog="python -m elm.retrain.onnx", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="an exported model dir (elm.retrain export, or a fine-tuned one)")
    parser.add_argument("--out", default=None, help="the .onnx file (default <model_dir>/model.onnx)")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--opset", type=int, default=18)
    args = parser.parse_args(argv)
    with fail_cleanly("retrain.onnx"):
        result = export_onnx(args.model_dir, args.out, tolerance=args.tolerance, opset=args.opset)
        worst = max(result["max_difference"].values())
        print(f"[elm.retrain.onnx] {result['output']} -> {result['path']} (opset {result['opset']}; "
              f"max |onnxruntime - PyTorch| {worst:.1e} on padded batches)")  # fmt: skip


if __name__ == "__main__":
    main()
