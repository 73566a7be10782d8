"""The README.md model card of a saved fine-tuned classifier (``train.save_model=true``): Hugging
Face front matter (license, base model, task, model-index with this seed's validation metrics)
and the numbers behind it; no local machine paths (``elm.retrain.export.public_name``)."""

from __future__ import annotations

from typing import Any

import yaml

from ..retrain.export import public_name


def classifier_card(base_model: str, task: Any, seed: int, scores: dict[str, float], steps: int) -> str:
    base = public_name(base_model)
    task_name = public_name(task.name)
    labels = task.label_names or [f"LABEL_{i}" for i in range(task.num_labels)]
    meta: dict[str, Any] = {
        "library_name": "transformers",
        "license": "other",  # the base model's and the task data's terms apply
        "pipeline_tag": "text-classification",
        "tags": ["elm", "knowledge-distillation", "text-classification"],
        "model-index": [{"name": "elm-classifier", "results": [{
            "task": {"type": "text-classification"},
            "dataset": {"name": task_name, "type": task_name, "split": "validation"},
            "metrics": [{"type": k, "value": round(float(v), 4), "name": f"validation {k}"} for k, v in scores.items()],
        }]}],
    }  # fmt: skip
    if "/" in base and not base.startswith("local:"):
        meta["base_model"] = base
    lines = [
        "---", *yaml.safe_dump(meta, sort_keys=False).strip().splitlines(), "---", "",
        f"# {task_name} classifier fine-tuned from `{base}`", "",
        f"Fine-tuned by `elm.finetune` (seed {seed}, {steps} steps) on the training split of `{task_name}`; "
        f"labels: {', '.join(map(str, labels))}.", "",
        "| validation metric | value |", "|---|---:|",
        *(f"| {k} | {float(v):.4f} |" for k, v in scores.items()), "",
        "```python",
        "import elm  # registers the ELM classes (or pass trust_remote_code=True)",
        "from transformers import pipeline",
        'classify = pipeline("text-classification", model="path/to/this/dir")',
        "```", "",
    ]  # fmt: skip
    return "\n".join(lines)
