"""Fast CPU dropout for stock Hugging Face models (the teacher, any hub model elm fine-tunes).

elm's own models draw CPU dropout masks with :func:`elm.modeling.modeling_elm.keep_mask` (four
16-bit uniforms per 64-bit draw instead of one ``bernoulli_`` number per element).
:func:`use_cpu_dropout` gives a model elm did not write the same masks:

* every ``nn.Dropout`` module becomes :class:`elm.modeling.modeling_elm.Dropout` (same ``p``, same
  train/eval mode, no state);
* attention-probability dropout, when the model takes a registered attention function (Hugging Face
  ``AttentionInterface``; BERT, GPT-2, LLaMA and most v5 models do), runs through
  :data:`ATTENTION`: explicit scores, softmax and :func:`~elm.modeling.modeling_elm.apply_dropout`
  while training with dropout on CPU, ``transformers``' own SDPA function otherwise (eval, CUDA,
  sliding windows, soft-capping, attention sinks, grouped K/V heads).

[project decision, issue #15] The MiniLM teacher's bf16 fine-tuning step (batch 32 x 128 tokens)
spent a third of its time drawing dropout masks (``bernoulli_``), and with dropout on, CPU SDPA
leaves its fused kernel for the math path. With this the step takes 0.56 s instead of 0.93 s
(``python -m elm.bench --only finetune``: 1.66x) and a BBC fine-tuning seed of the teacher trains
in 42.5 s instead of 70.8 s at the same accuracy. Eval outputs are unchanged bit for bit, and so
are the state dict and the saved ``config.json`` (the attention choice is not serialised): stock
``transformers`` loads the result as before. The masks are other draws of the same
Bernoulli(1 - p) keeps (resolution 2^-16), seeded by the global generator.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..modeling import modeling_elm

log = logging.getLogger("elm.cpu_dropout")

ATTENTION = "elm_cpu_dropout"
_SDPA_ONLY = ("sliding_window", "softcap", "s_aux", "sinks")  # features the explicit path does not do


def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
              **kwargs: Any) -> tuple[torch.Tensor, None]:  # fmt: skip
    """A Hugging Face attention function (``[B, h, T, d]`` in, ``[B, T, h, d]`` out): explicit with
    :func:`~elm.modeling.modeling_elm.apply_dropout` when dropout is on, on CPU; SDPA otherwise."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (dropout == 0 or query.device.type != "cpu" or key.shape[1] != query.shape[1]
            or any(kwargs.get(name) is not None for name in _SDPA_ONLY)):  # fmt: skip
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)  # fmt: skip
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = (query * scaling) @ key.transpose(-1, -2)
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", False) if causal is None else causal
    if attention_mask is None and causal and query.shape[-2] > 1:  # SDPA's is_causal shortcut
        attention_mask = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    elif attention_mask is not None:  # an additive float mask
        scores = scores + attention_mask
    out = modeling_elm.apply_dropout(scores.softmax(-1), dropout) @ value
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # boolean masks, as for "sdpa"


def use_cpu_dropout(model: nn.Module) -> nn.Module:
    """Route ``model``'s dropouts through elm's CPU masks (module docstring); returns ``model``.

    The attention function is switched only from ``"sdpa"`` or ``"eager"`` and only in models that
    take registered ones (``_supports_attention_backend``); elm's own models, already on these
    masks, are left as they are.
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, modeling_elm.Dropout(child.p, child.inplace).train(child.training))
    config = getattr(model, "config", None)
    if getattr(model, "_supports_attention_backend", False) and config._attn_implementation in ("sdpa", "eager"):
        _register()
        try:
            model.set_attn_implementation(ATTENTION)
        except (ValueError, NotImplementedError) as err:  # a sub-model with its own attention code
            log.debug("attention dropout left to %s: %s", config._attn_implementation, err)
    return model
