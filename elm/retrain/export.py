"""Export a retrained student as a self-contained Hugging Face model directory.

``export_model(model, tokenizer, out_dir, info)`` writes, into a temporary sibling directory that
is then renamed into place (``elm.utils.io.replace_dir``), so ``out_dir`` is complete or absent:

* ``config.json`` (with ``auto_map``), ``model.safetensors``, ``configuration_elm.py`` and
  ``modeling_elm.py`` (``ElmPreTrainedModel.save_pretrained``): loadable with ``import elm`` or
  ``trust_remote_code=True``, also as ``AutoModelForSequenceClassification(num_labels=k)``;
* the tokenizer files, ``arch.json`` (the :class:`~elm.space.ArchConfig`), and ``README.md``,
  a model card whose every number is computed from the model or from ``info``;
* ``DONE`` last (after the rename), as every elm stage does.

``info`` (all keys optional): ``teacher`` {name, num_layers, hidden_size, layer_map},
``init`` (``elm.retrain.init.init_from_search`` facts, or None for a random init), ``data``
{source, seq_len, train_blocks, val_blocks}, ``training`` {epochs, steps, batch_size, lr,
schedule, warmup_steps, weights, temperature, tokens_seen, train_time_s, teacher_head},
``eval`` {val_loss, val_ppl, val_tokens}, ``history`` (per-epoch records).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..modeling import arch_from_config
from ..space import ArchConfig
from ..utils.io import DONE_FILE, atomic_dir, atomic_write_json


def parameter_counts(model) -> dict[str, int]:
    """Parameters of the whole model (tied weights once) and of its backbone (no LM head)."""
    backbone = getattr(model, "elm", model)
    return {"backbone": sum(p.numel() for p in backbone.parameters()),
            "total": sum(p.numel() for p in model.parameters())}  # fmt: skip


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return "-" if value is None else str(value)


def architecture_table(arch: ArchConfig) -> list[str]:
    return ["| layer | block | heads x head dim | FFN width | FFNs | bottleneck | shared Q/K/V | params |",
            "|---:|---|---|---:|---:|---:|---|---:|",
            *(f"| {i} | {layer.block} | {layer.num_heads} x {layer.head_dim} | {layer.ffn_dim} | "
              f"{layer.num_ffn} | {_fmt(layer.bottleneck_size)} | {layer.share} | "
              f"{layer.num_parameters(arch.hidden_size):,} |" for i, layer in enumerate(arch.layers))]


MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what the packaged default teacher is


def public_name(name: Any) -> str:
    """A name fit for a published card: hub ids and built-in sources as they are, a local path
    reduced to its last part (``local:<name>``), so no machine's paths leak into a card."""
    text = str(name or "-")
    if text in ("-", "bbc", MINILM_HUB_ID) or text.startswith("hf:"):
        return text
    is_path = text.startswith(("/", ".", "~")) or "\\" in text or text.count("/") > 1 or Path(text).exists()
    return f"local:{Path(text).name}" if is_path else text


def front_matter(arch: ArchConfig, info: dict[str, Any]) -> list[str]:
    """Hugging Face model-card metadata: license, base model, datasets, task, tags, model-index."""
    import yaml

    teacher = public_name((info.get("teacher") or {}).get("name"))
    source = public_name((info.get("data") or {}).get("source"))
    task = "text-generation" if arch.causal else "fill-mask"
    meta: dict[str, Any] = {
        "library_name": "transformers",
        # a student distilled from the teacher inherits its terms: known for the packaged MiniLM
        "license": "apache-2.0" if teacher == MINILM_HUB_ID else "other",
        "pipeline_tag": task,
        "tags": ["elm", "neural-architecture-search", "knowledge-distillation"],
    }
    if "/" in teacher and not teacher.startswith("local:"):
        meta["base_model"] = teacher
    if source.startswith("hf:"):
        meta["datasets"] = [source[3:].split(":")[0]]
    scores = info.get("eval") or {}
    if isinstance(scores.get("val_ppl"), int | float):
        dataset = {"name": "BBC News" if source == "bbc" else source, "type": source, "split": "validation"}
        metric = {"type": "perplexity", "value": round(float(scores["val_ppl"]), 4), "name": "validation perplexity"}
        meta["model-index"] = [{"name": "elm-student", "results": [{"task": {"type": task}, "dataset": dataset,
                                                                   "metrics": [metric]}]}]  # fmt: skip
    return ["---", *yaml.safe_dump(meta, sort_keys=False).strip().splitlines(), "---"]


def model_card(model, info: dict[str, Any]) -> str:
    """The README.md of an export (Markdown with Hugging Face front matter, no local paths)."""
    arch = arch_from_config(model.config)
    counts = parameter_counts(model)
    kind = "causal LM" if arch.causal else "masked LM"
    teacher, init = info.get("teacher") or {}, info.get("init")
    data, training, scores = info.get("data") or {}, info.get("training") or {}, info.get("eval") or {}
    layers = sum(layer.num_parameters(arch.hidden_size) for layer in arch.layers)
    lines = [
        *front_matter(arch, info),
        "",
        f"# ELM {kind}: {arch.num_layers} layers, {counts['backbone'] / 1e6:.2f}M parameters",
        "",
        "A compact language model found by Elastic Architecture Search (ELM, arXiv 2510.27037) and "
        "retrained by whole-model distillation. Every number below was computed by `elm.retrain`.",
        "",
        "## Architecture",
        "",
        f"hidden size {arch.hidden_size}, embedding size {arch.embedding_size}, vocabulary "
        f"{arch.vocab_size:,}, max positions {arch.max_positions}, "
        f"{'causal' if arch.causal else 'bidirectional'} attention.",
        "",
        *architecture_table(arch),
        "",
        "| parameters | count |",
        "|---|---:|",
        f"| embeddings | {arch.embedding_parameters():,} |",
        f"| layers | {layers:,} |",
        f"| backbone (embeddings + layers) | {counts['backbone']:,} |",
        f"| with the LM head (decoder tied to the embeddings) | {counts['total']:,} |",
        "",
        "## Training",
        "",
        f"- Teacher: `{public_name(teacher.get('name'))}` ({_fmt(teacher.get('num_layers'))} layers, hidden "
        f"{_fmt(teacher.get('hidden_size'))}); student layer l is distilled towards teacher hidden state "
        f"`layer_map[l + 1]`, layer_map = {teacher.get('layer_map', '-')}.",
    ]
    if init:
        lines.append(f"- Initialised from the trained supernet of search run `{public_name(init.get('search_dir'))}` "
                     f"(candidates {', '.join(init.get('candidates', []))}).")  # fmt: skip
    else:
        lines.append("- Initialised at random (no search state given).")
    lines += [
        f"- Data: `{public_name(data.get('source'))}`, blocks of {_fmt(data.get('seq_len'))} tokens, "
        f"{_fmt(data.get('train_blocks'))} training / {_fmt(data.get('val_blocks'))} validation blocks.",
        f"- Objective: weights {training.get('weights', '-')} (LM loss, hidden-state KD by "
        f"`{training.get('loss', 'rkd')}`, point-wise NMSE in the shared basis; a weight of 0 is off, "
        + (f"logit KD at temperature {_fmt(training.get('temperature'), 2)})."
           if training.get("logit_kd", True) else "logit KD off: the teacher has no LM head and none was fitted)."),
    ]  # fmt: skip
    if head := training.get("teacher_head"):
        lines.append(f"- Teacher MLM head fitted on the frozen encoder: {head.get('steps')} steps, "
                     f"final MLM loss {_fmt(head.get('final_loss'))}.")  # fmt: skip
    tokens = training.get("tokens_seen")
    lines += [
        f"- Optimiser: AdamW, lr {_fmt(training.get('lr'))}, {training.get('schedule', '-')} schedule with "
        f"{_fmt(training.get('warmup_steps'))} warm-up steps; {_fmt(training.get('epochs'))} epochs, "
        f"{_fmt(training.get('steps'))} steps of batch {_fmt(training.get('batch_size'))}"
        + (f" ({tokens:,} tokens)" if isinstance(tokens, int) else "")
        + f", {_fmt(training.get('train_time_s'), 1)} s.",
        "",
        "## Evaluation (validation split)",
        "",
        "| metric | value |",
        "|---|---:|",
        f"| {'CLM' if arch.causal else 'MLM'} loss | {_fmt(scores.get('val_loss'))} |",
        f"| perplexity | {_fmt(scores.get('val_ppl'), 2)} |",
        f"| scored tokens | {_fmt(scores.get('val_tokens'))} |",
        "",
    ]
    if history := info.get("history"):
        lines += ["| epoch | step | train loss | val loss | val perplexity |", "|---:|---:|---:|---:|---:|",
                  *(f"| {r['epoch']} | {r['step']} | {_fmt(r['train_loss'].get('total'))} | "
                    f"{_fmt(r['val_loss'])} | {_fmt(r['val_ppl'], 2)} |" for r in history), ""]
    auto = "AutoModelForCausalLM" if arch.causal else "AutoModelForMaskedLM"
    lines += [
        "## Usage",
        "",
        "```python",
        "import elm  # registers the ELM classes; without elm pass trust_remote_code=True to every from_pretrained",
        f"from transformers import AutoTokenizer, {auto}, AutoModelForSequenceClassification",
        "",
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/dir")',
        f'model = {auto}.from_pretrained("path/to/this/dir")',
        'classifier = AutoModelForSequenceClassification.from_pretrained("path/to/this/dir", num_labels=2)',
        "```",
        "",
    ]
    return "\n".join(lines)


def export_model(model, tokenizer, out_dir: str | Path, info: dict[str, Any] | None = None) -> Path:
    """Write the export (see the module docstring) atomically; returns ``out_dir``."""
    out_dir, info = Path(out_dir), info or {}
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        arch_from_config(model.config).to_json(tmp / "arch.json")
        (tmp / "README.md").write_text(model_card(model, info))
    counts = parameter_counts(model)
    atomic_write_json(out_dir / DONE_FILE, {"stage": "export", "params": counts["backbone"],
                                            "params_with_lm_head": counts["total"], "eval": info.get("eval")})  # fmt: skip
    return out_dir
