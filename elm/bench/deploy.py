"""Bench case of the deployable student: the ONNX export (``elm.retrain.onnx``) run by
onnxruntime vs the same model in PyTorch eager, batch 1 and 32, the inference case's shape."""

from __future__ import annotations

import tempfile

import torch

from ..modeling import ElmModel, config_from_arch
from .cases import Result, bert_arch, mlm_batch, time_pair

_EXPORTS: dict[tuple[int, int, int], tuple] = {}  # one export per shape and run: (model, session)


def onnx_vs_eager(batch: int, layers: int = 4, hidden: int = 256, heads: int = 4, seq: int = 128,
                  repeats: int = 7, warmup: int = 2) -> Result | str:  # fmt: skip
    """onnxruntime (CPU provider) / PyTorch eager latency of one forward (``ratio < 1``: ONNX faster)."""
    from ..retrain.onnx import ONNX_PACKAGES, check_packages, export_onnx

    try:
        check_packages()
    except ValueError:
        return f"{'ONNX vs eager b' + str(batch):<34} skipped: pip install {' '.join(ONNX_PACKAGES)}"
    import onnxruntime as ort

    key = (layers, hidden, heads)
    if key not in _EXPORTS:
        torch.manual_seed(0)
        model = ElmModel(config_from_arch(bert_arch(layers, hidden, heads, seq=seq))).eval()
        with tempfile.TemporaryDirectory(prefix="elm-bench-onnx-") as out:  # the session keeps the graph
            model.save_pretrained(out)
            path = export_onnx(out)["path"]
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()  # the same cores as PyTorch
            _EXPORTS[key] = (model, ort.InferenceSession(path, options, providers=["CPUExecutionProvider"]))
    model, session = _EXPORTS[key]
    ids, mask, _ = mlm_batch(model.config.vocab_size, batch, seq, torch.device("cpu"))
    mask[batch // 2 :, seq // 2 :] = 0  # half the rows padded: the mask is a real input
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}

    def eager() -> None:
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask)

    a, b = time_pair(lambda: session.run(None, feed), eager, repeats, warmup, torch.device("cpu"))
    return Result(f"ONNX vs eager b{batch}x{seq}", "onnxruntime", "PyTorch", a, b, "< 1.0x (ONNX / eager)")


def generation_cache(layers: int = 4, hidden: int = 256, heads: int = 4, new_tokens: int = 128, prompt: int = 16,
                     repeats: int = 3) -> Result:  # fmt: skip
    """Greedy ``generate`` of ``new_tokens`` tokens by a causal ``ElmForCausalLM`` with the KV cache
    vs without it (ratio = cached / uncached: < 1 is the cache's speed-up)."""
    from ..modeling import ElmForCausalLM

    arch = bert_arch(layers, hidden, heads, seq=prompt + new_tokens)
    arch.causal, arch.type_vocab_size = True, 0
    torch.manual_seed(0)
    model = ElmForCausalLM(config_from_arch(arch.validate(), pad_token_id=0)).eval()
    ids = torch.randint(1, arch.vocab_size, (1, prompt))
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    def run(cache: bool):
        return lambda: model.generate(input_ids=ids, use_cache=cache, **kw)

    a, b = time_pair(run(True), run(False), repeats, 1, torch.device("cpu"))
    return Result(f"generate {new_tokens} tokens ({layers}L/{hidden}H)", "KV cache", "no cache", a, b,
                  "< 1.0x (cached / uncached)")  # fmt: skip
