"""Standalone ELM models: any mix of BERT, MobileBERT and LLaMA-style blocks as a Hugging Face model.

Self-contained (only ``configuration_elm`` and ``modeling_elm_layouts`` beside it, the latter with
the layers of families that bring their own, e.g. ``modeling_elm_llama``) so an export can ship it for
``trust_remote_code=True``. The supernet's elastic blocks (``elm.supernet``) compute the same
function on sliced weights; ``elm.supernet.extract`` copies them here and the outputs agree.

Speed levers (small models are dominated by the vocabulary projection and by overheads):
one fused projection for Q/K/V (two when Q=V or K=V are shared), attention through
``scaled_dot_product_attention``, MLM logits only at the masked positions when labels
are given (``config.mlm_masked_only``), and on CPU dropout masks cut from 64-bit random
words (:func:`keep_mask`).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    MaskedLMOutput,
    SequenceClassifierOutput,
)

from .configuration_elm import ElmConfig

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}  # FFN activations by name (ElmConfig.block_activations)


def block_activation(config: ElmConfig, layer: dict) -> str:
    """The FFN activation of a layer: its family's, as the export recorded it. Exports written
    before ``block_activations`` existed had GELU in BERT blocks and ReLU in bottleneck blocks."""
    named = (getattr(config, "block_activations", None) or {}).get(layer["block"])
    return named or ("relu" if layer.get("bottleneck_size") is not None else "gelu")


# Auto classes an export loads with under ``trust_remote_code=True``. ``save_pretrained`` only
# writes the saved class into ``config.auto_map``; ElmPreTrainedModel.save_pretrained adds all of them.
AUTO_MAP = {
    "AutoModel": "ElmModel",
    "AutoModelForMaskedLM": "ElmForMaskedLM",
    "AutoModelForCausalLM": "ElmForCausalLM",  # causal architectures only
    "AutoModelForSequenceClassification": "ElmForSequenceClassification",
}


def _recording() -> bool:
    """Whether a graph is being recorded (compile, export or trace), not run eagerly."""
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)()  # torch >= 2.6
    return torch.compiler.is_compiling() or exporting or torch.jit.is_tracing()


def attention_bias(attention_mask: torch.Tensor | None, causal: bool, seq_len: int) -> torch.Tensor | None:
    """Boolean mask [B, 1, T, T] (True = may attend), or None when SDPA needs none.

    Every token may attend to itself, so rows of padding never become all-masked (NaN). The
    all-ones shortcut is skipped while anything records a graph (``torch.compile``,
    ``torch.export`` / the dynamo ONNX exporter, ``torch.jit.trace`` and the legacy ONNX exporter):
    a recorded branch would drop the mask input for every later, padded batch.
    """
    if attention_mask is None:
        return None
    if not _recording() and bool(attention_mask.all()):
        return None
    keep = attention_mask[:, None, None, :].bool()
    eye = torch.eye(seq_len, dtype=torch.bool, device=keep.device)
    if causal:
        keep = keep & torch.ones(seq_len, seq_len, dtype=torch.bool, device=keep.device).tril()
    return keep | eye


def cached_attention_bias(attention_mask: torch.Tensor | None, query_len: int, past_len: int,
                          batch: int, device) -> torch.Tensor | None:  # fmt: skip
    """Boolean mask [B, 1, q, past + q] of causal attention with ``past_len`` cached tokens: query i
    (absolute position past + i) sees the unpadded keys up to itself, and always itself."""
    keys = past_len + query_len
    if attention_mask is None and query_len == 1:
        return None  # one new token may see every cached one
    query_pos = past_len + torch.arange(query_len, device=device)[:, None]
    keep = torch.arange(keys, device=device)[None, :] <= query_pos  # [q, K]
    if attention_mask is not None:
        keep = keep[None, None] & attention_mask[:, None, None, -keys:].bool()
    else:
        keep = keep[None, None].expand(batch, 1, query_len, keys)
    return keep | (torch.arange(keys, device=device)[None, :] == query_pos)[None, None]


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """Boolean dropout keep-mask, each element kept with probability 1 - p (resolution 2^-16).

    [project decision, issue #15] CPU ``bernoulli_`` draws one random number per element: it was
    28% of a bf16 search step, and the whole ``F.dropout`` (forward + backward) costs 3x what this
    does. Here each full-range 64-bit draw of the global generator gives four 16-bit uniforms, so
    ``torch.manual_seed`` and saved RNG states govern the masks as before.
    """
    numel = math.prod(shape)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)
    return words.view(torch.int16)[:numel].view(shape) >= round(p * 65536) - 32768


def dropout_multiplier(shape: torch.Size, p: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """What CPU dropout multiplies by: 0 where dropped, 1 / (1 - p) where kept (:func:`keep_mask`)."""
    return keep_mask(shape, p, device).to(dtype).mul_(1.0 / (1.0 - p))


# Set while a search layer's candidates run (elm.supernet.supernet.CommonDropout): a callable with
# dropout_multiplier's signature that hands the candidates common masks. None everywhere else.
multiplier_source = None


def apply_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout`` with :func:`keep_mask` on CPU; elsewhere (CUDA's fused kernel) and while a graph
    is recorded, ``F.dropout`` itself."""
    if not training or p == 0:
        return x
    if x.device.type != "cpu" or not 0 < p < 1 or _recording():
        return F.dropout(x, p, training)
    return x * (multiplier_source or dropout_multiplier)(x.shape, p, x.device, x.dtype)


class Dropout(nn.Dropout):
    """``nn.Dropout`` through :func:`apply_dropout` (same attribute ``p``, same empty state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_dropout(x, self.p, self.training)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    dropout: float,
    need_probs: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scaled dot-product attention on [B, h, T, d]; the explicit path when probs are asked for, and
    for attention dropout on CPU (SDPA's own dropout falls back to its math path there, which also
    runs bf16 inputs in fp32). The softmax kernel accumulates in fp32 for bf16 inputs too."""
    if not need_probs and (dropout == 0 or q.device.type != "cpu" or _recording()):
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal and mask is None
        )
        return out, None
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # scaling q: [B, h, T, d] is T/d times smaller
    if mask is None and causal:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = scores.softmax(-1)
    out = apply_dropout(probs, dropout, training=dropout > 0) @ v
    return out, probs if need_probs else None


def split_qkv(qkv: torch.Tensor, share: str, num_heads: int, head_dim: int):
    """Fused projection output [B, T, n*A] -> q, k, v as [B, h, T, d] (shared ones are the same tensor)."""
    b, t, _ = qkv.shape
    parts = qkv.view(b, t, -1, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    return parts[0], parts[1], parts[{"qv": 0, "kv": 1}.get(share, 2)]


class ElmAttention(nn.Module):
    """Multi-head self-attention at width ``dim`` with post-LayerNorm residual."""

    def __init__(self, config: ElmConfig, dim: int, num_heads: int, head_dim: int, share: str) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.share = num_heads, head_dim, share
        projections = 3 if share == "none" else 2  # Q=V or K=V: one projection serves two roles
        self.qkv = nn.Linear(dim, projections * num_heads * head_dim)
        self.out = nn.Linear(num_heads * head_dim, dim)
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attn_dropout = config.attention_probs_dropout_prob
        self.dropout = Dropout(config.hidden_dropout_prob)
        self.config = config  # read at call time: set_attn_implementation("eager" | "sdpa") switches the kernel

    def forward(self, x, mask, causal: bool, output_attentions: bool = False, cache=None, layer_idx: int = 0):
        q, k, v = split_qkv(self.qkv(x), self.share, self.num_heads, self.head_dim)
        if cache is not None:  # keys/values of the earlier tokens (Q=V: the cached values are the past queries)
            k, v = cache.update(k, v, layer_idx)
        drop = self.attn_dropout if self.training else 0.0
        eager = getattr(self.config, "_attn_implementation", None) == "eager"
        ctx, probs = attend(q, k, v, mask, causal, drop, output_attentions or eager)
        probs = probs if output_attentions else None
        ctx = ctx.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        return self.norm(x + self.dropout(self.out(ctx))), probs


class ElmFFN(nn.Module):
    def __init__(self, config: ElmConfig, dim: int, ffn_dim: int, activation: str) -> None:
        super().__init__()
        self.up = nn.Linear(dim, ffn_dim)
        self.down = nn.Linear(ffn_dim, dim)
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)
        self.act = ACTIVATIONS[activation]

    def forward(self, x):
        return self.norm(x + self.dropout(self.down(self.act(self.up(x)))))


class ElmLayer(nn.Module):
    """A BERT block (attention + FFN at H) or a MobileBERT block (H -> B, attention and
    ``num_ffn`` FFNs at B, B -> H with the residual at H); a family with its own layout (llama)
    brings its attention and FFNs (``modeling_elm_layouts``)."""

    def __init__(self, config: ElmConfig, layer: dict) -> None:
        super().__init__()
        self.block = layer["block"]
        h = config.hidden_size
        # the structure follows the fields (a bottleneck size means H -> B ... B -> H) and the
        # activation the config, so this file needs no block registry (it ships alone as remote code)
        self.bottleneck = layer.get("bottleneck_size") is not None
        width = layer["bottleneck_size"] if self.bottleneck else h
        if self.bottleneck:
            self.bottleneck_in = nn.Linear(h, width)
            self.norm_in = nn.LayerNorm(width, eps=config.layer_norm_eps)
            self.bottleneck_out = nn.Linear(width, h)
            self.norm_out = nn.LayerNorm(h, eps=config.layer_norm_eps)
            self.dropout = Dropout(config.hidden_dropout_prob)
        # a family's own layer (modeling_elm_layouts imported on use: its layers import this file)
        from .modeling_elm_layouts import layer_parts

        own = layer_parts(config, layer["block"])
        if own is not None:
            self.attention, ffns = own(config, width, layer)
        else:
            self.attention = ElmAttention(config, width, layer["num_heads"], layer["head_dim"], layer["share"])
            act = block_activation(config, layer)
            ffns = [ElmFFN(config, width, layer["ffn_dim"], act) for _ in range(layer.get("num_ffn", 1))]
        self.ffns = nn.ModuleList(ffns)

    def forward(self, x, mask=None, causal: bool = False, output_attentions: bool = False, cache=None,
                layer_idx: int = 0):  # fmt: skip
        h = self.norm_in(self.bottleneck_in(x)) if self.bottleneck else x
        if cache is None:  # (the supernet's candidates share this function; their attention has no cache)
            h, probs = self.attention(h, mask, causal, output_attentions)
        else:
            h, probs = self.attention(h, mask, causal, output_attentions, cache, layer_idx)
        for ffn in self.ffns:
            h = ffn(h)
        if self.bottleneck:
            h = self.norm_out(x + self.dropout(self.bottleneck_out(h)))
        return h, probs


class ElmEmbeddings(nn.Module):
    """Word + position (+ token type) embeddings at E, projected to H when E != H, then LayerNorm."""

    def __init__(self, config: ElmConfig) -> None:
        super().__init__()
        e, h = config.embedding_size, config.hidden_size
        # a frozen padding row suits BERT's [PAD]; causal tokenizers pad with eos, which must train
        pad = None if config.causal else config.pad_token_id
        self.word = nn.Embedding(config.vocab_size, e, padding_idx=pad)
        self.position = nn.Embedding(config.max_position_embeddings, e)
        self.token_type = nn.Embedding(config.type_vocab_size, e) if config.type_vocab_size else None
        self.project = nn.Linear(e, h) if e != h else None
        self.norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids=None, position_ids=None):
        t = input_ids.shape[1]
        if t > self.position.num_embeddings:
            raise ValueError(
                f"sequence length {t} exceeds max_position_embeddings={self.position.num_embeddings}"
            )
        if position_ids is None:
            position_ids = torch.arange(t, device=input_ids.device)
        x = self.word(input_ids) + self.position(position_ids)
        if self.token_type is not None:
            x = x + (self.token_type.weight[0] if token_type_ids is None else self.token_type(token_type_ids))
        if self.project is not None:
            x = self.project(x)
        return self.dropout(self.norm(x))


class ElmPreTrainedModel(PreTrainedModel):
    config_class = ElmConfig
    config: ElmConfig
    base_model_prefix = "elm"
    supports_gradient_checkpointing = True  # ElmModel checkpoints each layer (gradient_checkpointing_enable())
    _supports_sdpa = True
    # Losses are batch means and ignore ``num_items_in_batch``; without this the Trainer (which sees
    # ``**kwargs`` in forward) would skip dividing by the gradient-accumulation steps.
    accepts_loss_kwargs = False

    def save_pretrained(self, save_directory, is_main_process: bool = True, *args, **kwargs):
        if getattr(self, "_auto_class", None) is not None:  # registered (import elm) or remote-code loaded
            module = type(self).__module__.rsplit(".", 1)[-1]
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            for auto, name in AUTO_MAP.items():
                if auto != "AutoModelForCausalLM" or self.config.causal:
                    auto_map[auto] = f"{module}.{name}"
            self.config.auto_map = auto_map
        saved = super().save_pretrained(save_directory, is_main_process, *args, **kwargs)
        if self.should_save_on_this_rank(is_main_process) and os.path.isdir(save_directory):
            self._write_layouts(save_directory)
        return saved

    def _upload_modified_files(self, working_dir, *args, **kwargs):
        """transformers' upload (``push_to_hub``, ``save_pretrained(push_to_hub=True)``) runs inside
        its ``save_pretrained``: the layouts go into the folder first, so they are uploaded too."""
        self._write_layouts(working_dir)
        return super()._upload_modified_files(working_dir, *args, **kwargs)

    def _write_layouts(self, directory) -> None:
        from .modeling_elm_layouts import write_export

        write_export(directory, self.config)

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, ElmLMHead):
            nn.init.zeros_(module.bias)

    def get_output_embeddings(self):
        """None: the LM head's decoder *is* the word-embedding matrix (``ElmLMHead`` reads it), so
        there is no second matrix to tie or resize."""
        return None

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        """transformers' resize of the word embeddings, plus the LM head's per-token bias (new
        tokens get bias 0), so the model stays whole at the new vocabulary size."""
        embeddings = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        head = getattr(self, "lm_head", None)
        if isinstance(head, ElmLMHead) and head.bias.shape[0] != embeddings.num_embeddings:
            old, n = head.bias.data, embeddings.num_embeddings
            bias = old.new_zeros(n)
            bias[: min(n, old.shape[0])] = old[:n]
            head.bias = nn.Parameter(bias)
        return embeddings


class ElmModel(ElmPreTrainedModel):
    """Embeddings + layers; returns the last hidden state (and all of them on request)."""

    def __init__(self, config: ElmConfig) -> None:
        super().__init__(config)
        self.embeddings = ElmEmbeddings(config)
        self.layers = nn.ModuleList(ElmLayer(config, layer) for layer in config.layers)
        self.gradient_checkpointing = False  # set by gradient_checkpointing_enable()
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word

    def set_input_embeddings(self, value):
        self.embeddings.word = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        output_hidden_states=None,
        output_attentions=None,
        return_dict=None,
        cache=None,
        use_cache=None,
        **kwargs,
    ):
        output_hidden_states = bool(output_hidden_states or self.config.output_hidden_states)
        output_attentions = bool(output_attentions or self.config.output_attentions)
        causal = self.config.causal
        cache = cache if cache is not None else kwargs.get("past_key_values")  # (the name before transformers 5.24)
        if use_cache and cache is None and causal:
            cache = DynamicCache()
        cache = cache if causal else None  # a KV cache only makes sense left to right
        if cache is not None and not isinstance(cache, DynamicCache):  # a static cache returns all its slots: the mask would not fit
            raise ValueError(f"ELM models take a DynamicCache (generate's default), got {type(cache).__name__}")
        past = cache.get_seq_length() if cache is not None else 0
        if past and past + input_ids.shape[1] > self.config.max_position_embeddings:  # (past 0: the embeddings check)
            raise ValueError(f"sequence length {past + input_ids.shape[1]} ({past} cached + {input_ids.shape[1]} new "
                             f"tokens) exceeds max_position_embeddings={self.config.max_position_embeddings}; "
                             "generate fewer tokens")  # fmt: skip
        if position_ids is None and past:
            position_ids = past + torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embeddings(input_ids, token_type_ids, position_ids)
        if past:  # the mask carries causality: SDPA's is_causal aligns top-left, wrong for q < k
            mask = cached_attention_bias(attention_mask, x.shape[1], past, x.shape[0], x.device)
            causal = False
        else:
            mask = attention_bias(attention_mask, causal, x.shape[1])
        hidden, attentions = (x,), ()
        checkpointed = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for index, layer in enumerate(self.layers):
            if checkpointed:  # activations recomputed in the backward: memory for compute
                x, probs = self._gradient_checkpointing_func(layer.__call__, x, mask, causal, output_attentions)
            else:
                x, probs = layer(x, mask, causal, output_attentions, cache, index)
            hidden += (x,)
            attentions += (probs,)
        out = BaseModelOutputWithPast(
            last_hidden_state=x,
            cache=cache if use_cache or past else None,
            hidden_states=hidden if output_hidden_states else None,
            attentions=attentions if output_attentions else None,
        )
        return out if return_dict is not False else out.to_tuple()


class ElmLMHead(nn.Module):
    """H -> E transform, then the decoder tied to the word embeddings (one parameter, no copy)."""

    def __init__(self, config: ElmConfig) -> None:
        super().__init__()
        self.transform = nn.Linear(config.hidden_size, config.embedding_size)
        self.norm = nn.LayerNorm(config.embedding_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, h, word_embeddings: torch.Tensor):
        return F.linear(self.norm(F.gelu(self.transform(h))), word_embeddings, self.bias)


class ElmForMaskedLM(ElmPreTrainedModel):
    """Masked LM. With ``labels`` and ``config.mlm_masked_only`` (default), vocabulary logits are
    computed only at the masked positions and ``logits`` has shape [num_masked, vocab]; pass
    ``return_full_logits=True`` for [B, T, vocab]."""

    def __init__(self, config: ElmConfig) -> None:
        super().__init__(config)
        self.elm = ElmModel(config)
        self.lm_head = ElmLMHead(config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                labels=None, output_hidden_states=None, output_attentions=None, return_dict=None,
                return_full_logits: bool = False, **kwargs):  # fmt: skip
        out = self.elm(input_ids, attention_mask, token_type_ids, position_ids,
                       output_hidden_states, output_attentions)  # fmt: skip
        h, loss = out.last_hidden_state, None
        word = self.elm.embeddings.word.weight
        if labels is not None and self.config.mlm_masked_only and not return_full_logits:
            selected = labels != -100
            logits = self.lm_head(h[selected], word)
            loss = F.cross_entropy(logits.float(), labels[selected])
        else:
            logits = self.lm_head(h, word)
            if labels is not None:
                loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        result = MaskedLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                attentions=out.attentions)  # fmt: skip
        return result if return_dict is not False else result.to_tuple()


class ElmForCausalLM(ElmPreTrainedModel, GenerationMixin):
    """Causal LM (needs ``config.causal=True``); labels are shifted inside, as in HF GPT-2."""

    def __init__(self, config: ElmConfig) -> None:
        super().__init__(config)
        if not config.causal:
            raise ValueError("ElmForCausalLM needs an architecture with causal=true")
        self.elm = ElmModel(config)
        self.lm_head = ElmLMHead(config)
        self.post_init()

    def prepare_inputs_for_generation(self, input_ids, cache=None, attention_mask=None, use_cache=True, **kwargs):
        """With a KV cache only the new tokens are encoded; positions count real tokens only, so
        left-padded batches match unpadded prompts (as in HF GPT-2)."""
        past = cache.get_seq_length() if cache is not None else 0
        new = kwargs.get("next_sequence_length") or input_ids.shape[1] - past  # the tokens not cached yet
        position_ids = None
        if attention_mask is not None and not bool(attention_mask.all()):
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -new:]
        inputs = {"input_ids": input_ids[:, -new:], "attention_mask": attention_mask, "position_ids": position_ids,
                  "cache": cache, "use_cache": use_cache}  # fmt: skip
        if kwargs.get("logits_to_keep") is not None:  # generate asks for the last position only
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return inputs

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                labels=None, output_hidden_states=None, output_attentions=None, return_dict=None,
                cache=None, use_cache=None, logits_to_keep: int = 0, **kwargs):  # fmt: skip
        """``cache`` / ``use_cache``: a transformers ``Cache`` of the earlier tokens' keys and
        values (``generate`` makes one); ``logits_to_keep`` > 0: vocabulary logits only for the last
        that many positions (generation needs one)."""
        out = self.elm(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states,
                       output_attentions, cache=cache, use_cache=use_cache, **kwargs)  # fmt: skip
        h = out.last_hidden_state
        if logits_to_keep and labels is None:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h, self.elm.embeddings.word.weight)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        result = CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache,
                                        hidden_states=out.hidden_states, attentions=out.attentions)  # fmt: skip
        return result if return_dict is not False else result.to_tuple()


class ElmForSequenceClassification(ElmPreTrainedModel):
    """Pooler (first token; last non-padding token for causal models) + linear classifier.
    ``num_labels == 1`` is regression (MSE), otherwise cross-entropy, as in HF BERT."""

    def __init__(self, config: ElmConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.elm = ElmModel(config)
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size)
        drop = config.classifier_dropout
        self.dropout = Dropout(drop if drop is not None else config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                labels=None, output_hidden_states=None, output_attentions=None, return_dict=None,
                **kwargs):  # fmt: skip
        out = self.elm(input_ids, attention_mask, token_type_ids, position_ids,
                       output_hidden_states, output_attentions)  # fmt: skip
        h = out.last_hidden_state
        if self.config.causal:  # last non-padding token, for right or left padding
            positions = torch.arange(h.shape[1], device=h.device)
            mask = attention_mask if attention_mask is not None else torch.ones_like(h[:, :, 0])
            last = (positions * mask.long()).argmax(-1)
            pooled = h[torch.arange(h.shape[0], device=h.device), last]
        else:
            pooled = h[:, 0]
        # [decision] the head runs in its weights' dtype even under autocast: bf16 logits would round a
        # regression score to 8 bits (constant predictions on a fresh head) for a few FLOPs saved
        with torch.autocast(h.device.type, enabled=False):
            pooled = pooled.to(self.pooler.weight.dtype)
            logits = self.classifier(self.dropout(torch.tanh(self.pooler(pooled))))
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())
            else:
                loss = F.cross_entropy(logits.float(), labels.view(-1))
        result = SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                          attentions=out.attentions)  # fmt: skip
        return result if return_dict is not False else result.to_tuple()
