"""ONNX export of exported students (elm.retrain.onnx): dynamo exporter, the attention mask a
real input, onnxruntime matches PyTorch to 1e-4 on padded batches of other shapes."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnxruntime as ort  # the dev extra installs it (and onnx, onnxscript)
import torch

from elm import ArchConfig, LayerConfig
from elm.modeling import ElmForMaskedLM, ElmForSequenceClassification, config_from_arch
from elm.retrain.onnx import export_onnx, padded_batch


def _save(tmp_path, cls, **config):
    arch = ArchConfig(hidden_size=32, embedding_size=16, vocab_size=120, max_positions=64, layers=[
        LayerConfig("bert", num_heads=2, head_dim=16, ffn_dim=48, share="qv"),
        LayerConfig("mobilebert", num_heads=2, head_dim=8, ffn_dim=24, num_ffn=2, bottleneck_size=16),
        LayerConfig("llama", num_heads=4, head_dim=8, ffn_dim=24, share="gqa2")]).validate()  # fmt: skip
    torch.manual_seed(0)
    model = cls(config_from_arch(arch, **config)).eval()
    model.save_pretrained(tmp_path)
    return model


def test_masked_lm_export_keeps_the_mask_and_matches_pytorch(tmp_path):
    model = _save(tmp_path / "mlm", ElmForMaskedLM)
    result = export_onnx(tmp_path / "mlm", tmp_path / "mlm.onnx")
    assert result["output"] == "last_hidden_state" and max(result["max_difference"].values()) <= 1e-4
    session = ort.InferenceSession(result["path"], providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    ids, mask = padded_batch(120, batch=4, seq_len=20, seed=3)  # a shape the export never saw
    got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    with torch.no_grad():
        want = model.elm(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    keep = mask.bool().numpy()
    assert np.abs(got[keep] - want[keep]).max() <= 1e-4
    ones = session.run(None, {"input_ids": ids.numpy(), "attention_mask": np.ones_like(mask.numpy())})[0]
    assert np.abs(ones[3] - got[3]).max() > 1e-3  # the padded row changes with the mask: it is not frozen


def test_classifier_export_gives_logits_and_cli_refuses_a_non_model(tmp_path):
    _save(tmp_path / "clf", ElmForSequenceClassification, num_labels=3)
    result = export_onnx(tmp_path / "clf")
    assert result["output"] == "logits" and result["path"].endswith("clf/model.onnx")
    session = ort.InferenceSession(result["path"], providers=["CPUExecutionProvider"])
    ids, mask = padded_batch(120, batch=2, seq_len=12)
    assert session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0].shape == (2, 3)
    proc = subprocess.run([sys.executable, "-m", "elm.retrain.onnx", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"[elm.retrain.onnx] error: {tmp_path} is not an exported model dir (no config.json)"]  # fmt: skip
