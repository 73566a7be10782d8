"""Evaluate a causal LM: held-out perplexity, ROUGE-L of greedy responses, sampling demo.

``python -m elm.causal.evaluate model=<dir> [hydra overrides]`` (``configs/causal_eval.yaml``)
writes ``results.json`` into the run dir (or ``out_dir``). ``model`` is any causal model
``AutoModelForCausalLM`` loads: an ELM export (``import elm`` registers it), the local GPT-2
teacher, or a hub name when online.

* **Perplexity** [project decision]: exp of the mean next-token NLL over the validation blocks of
  ``elm.data.corpus.load_corpus`` (the same document split the teacher and students were trained
  without), non-overlapping ``data.seq_len`` windows, the first token of a block unscored. All
  models compared must share the tokenizer, otherwise their perplexities are not comparable.
* **ROUGE-L**: the ``rouge_score`` library's ``rougeL`` F-measure (stemming on), averaged over
  the validation prompts of ``elm.causal.prompts``; responses come from Hugging Face
  ``generate`` (greedy), cut at eos and, with ``eval.stop_at_newline``, at the first newline after
  some text (the references are single paragraphs; leading newlines are skipped).
* **Samples**: a few responses with sampling (``temperature``, ``top_k``, ``top_p``), for reading.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..data.collate import CLMCollator, make_loader
from ..utils.cli import hydra_command

ROUGE_KEY = "rougeL"


@torch.no_grad()
def perplexity(
    model, dataset, tokenizer, *, batch_size: int = 16, max_batches: int | None = None, device="cpu"
) -> dict[str, float]:
    """Token-weighted mean NLL of next-token predictions over ``dataset`` blocks, and exp of it.

    Rows are ``input_ids`` (+ ``attention_mask``); position t's logits score token t+1, padding
    is never a target. Returns ``{"loss", "ppl", "tokens", "blocks"}``.
    """
    was_training = model.training
    model.eval()
    loader = make_loader(dataset, CLMCollator(tokenizer), batch_size)
    total, count, blocks = 0.0, 0, 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i == max_batches:
            break
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        nll = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        valid = mask[:, 1:].flatten().bool()
        total += float(nll[valid].sum())
        count += int(valid.sum())
        blocks += ids.shape[0]
    model.train(was_training)
    if count == 0:
        raise ValueError("perplexity: no tokens to score (empty dataset or max_batches=0)")
    loss = total / count
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count, "blocks": blocks}


def rouge_l(predictions: list[str], references: list[str], use_stemmer: bool = True) -> dict[str, Any]:
    """Mean ROUGE-L precision / recall / F-measure of ``rouge_score`` (fractions in [0, 1])."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("rouge_l needs at least one prediction")
    scorer = rouge_scorer.RougeScorer([ROUGE_KEY], use_stemmer=use_stemmer)
    scores = [scorer.score(ref, pred)[ROUGE_KEY] for pred, ref in zip(predictions, references, strict=True)]
    n = len(scores)
    return {
        "precision": sum(s.precision for s in scores) / n,
        "recall": sum(s.recall for s in scores) / n,
        "f": sum(s.fmeasure for s in scores) / n,
        "per_example": [s.fmeasure for s in scores],
    }


class _NewlineStop:
    """Stopping criterion: every sequence's new text holds a newline after some text (or eos)."""

    def __init__(self, tokenizer, prompt_len: int) -> None:
        self.tokenizer, self.prompt_len = tokenizer, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        new = input_ids[:, self.prompt_len :]
        eos = self.tokenizer.eos_token_id
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=False)
        done = [
            ("\n" in t.lstrip()) or (eos is not None and bool((row == eos).any()))
            for t, row in zip(texts, new)
        ]
        return torch.tensor(done, device=input_ids.device)


def clean_response(text: str, eos_token: str | None, stop_at_newline: bool) -> str:
    """The generated text up to eos (and the first newline when asked), stripped."""
    if eos_token:
        text = text.split(eos_token, 1)[0]
    if stop_at_newline:
        text = text.lstrip().split("\n", 1)[0]
    return text.strip()


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int = 48,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    batch_size: int = 16,
    max_prompt_tokens: int | None = None,
    stop_at_newline: bool = True,
    seed: int = 0,
    device="cpu",
) -> list[str]:
    """Responses of ``model.generate`` (greedy, or sampling) to ``prompts``, left-padded in batches.

    Prompts longer than ``max_prompt_tokens`` keep their last tokens; prompt + response must fit
    the model's positions (checked).
    """
    from transformers import StoppingCriteriaList

    from ..utils.hub import max_positions
    from .prompts import encode_prompt
    from .rollout import left_pad

    limit = max_positions(model.config)
    was_training = model.training
    model.eval()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    out: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            rows = [encode_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
            if max_prompt_tokens is not None:
                rows = [r[-max_prompt_tokens:] for r in rows]
            if not all(rows):
                raise ValueError("a prompt tokenises to nothing; every prompt needs at least one token")
            ids, mask = left_pad(rows, tokenizer.pad_token_id, device)
            if limit is not None and ids.shape[1] + max_new_tokens > limit:
                raise ValueError(
                    f"prompt ({ids.shape[1]} tokens) + max_new_tokens={max_new_tokens} exceeds the model's "
                    f"{limit} positions; lower eval.max_new_tokens or set a smaller max_prompt_tokens"
                )
            kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample,
                                      "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}  # fmt: skip
            if do_sample:
                kwargs.update(temperature=temperature, top_k=top_k or None, top_p=top_p)
            else:  # explicit, so a generation_config with sampling defaults cannot switch greedy off
                kwargs.update(temperature=None, top_k=None, top_p=None)
            if stop_at_newline:
                kwargs["stopping_criteria"] = StoppingCriteriaList([_NewlineStop(tokenizer, ids.shape[1])])
            seqs = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
            texts = tokenizer.batch_decode(seqs[:, ids.shape[1] :], skip_special_tokens=False)
            out += [clean_response(t, tokenizer.eos_token, stop_at_newline) for t in texts]
    finally:
        torch.random.set_rng_state(generator_state)
        model.train(was_training)
    return out


def evaluate_model(model, tokenizer, cfg, *, corpus=None, prompts=None, device="cpu") -> dict[str, Any]:
    """Perplexity + ROUGE-L + samples for a loaded model under ``cfg`` (``configs/causal_eval.yaml``).

    ``corpus`` (a ``DatasetDict`` from ``load_corpus``) and ``prompts`` (from
    ``elm.causal.prompts.load_prompts``) may be passed in to share them between models.
    """
    from ..data.corpus import load_corpus_of
    from .common import num_parameters
    from .prompts import load_prompts

    e = cfg.eval
    t0 = time.perf_counter()
    if corpus is None:
        corpus = load_corpus_of(cfg, tokenizer)
    ppl = perplexity(model, corpus["validation"], tokenizer, batch_size=e.batch_size,
                     max_batches=e.get("ppl_batches"), device=device)  # fmt: skip
    t1 = time.perf_counter()
    if prompts is None:
        prompts = load_prompts(cfg.prompts)
    val = prompts["validation"]
    n = len(val) if e.get("rouge_examples") is None else min(len(val), int(e.rouge_examples))
    rows = [val[i] for i in range(n)]
    gen_kw = dict(max_new_tokens=e.max_new_tokens, batch_size=e.gen_batch_size, max_prompt_tokens=e.get("max_prompt_tokens"),
                  stop_at_newline=e.stop_at_newline, seed=cfg.seed, device=device)  # fmt: skip
    greedy = generate(model, tokenizer, [r["prompt"] for r in rows], **gen_kw)
    rouge = rouge_l(greedy, [r["response"] for r in rows])
    t2 = time.perf_counter()
    k = min(int(e.samples), n)
    sampled = generate(model, tokenizer, [r["prompt"] for r in rows[:k]], do_sample=True, temperature=e.temperature,
                       top_k=e.top_k, top_p=e.top_p, **gen_kw)  # fmt: skip
    return {
        "params": num_parameters(model),
        "perplexity": ppl,
        "rouge_l": {key: rouge[key] for key in ("precision", "recall", "f")} | {"examples": n},
        "greedy": [
            {"prompt": r["prompt"], "reference": r["response"], "response": g}
            for r, g in zip(rows[: max(k, 5)], greedy[: max(k, 5)])
        ],  # fmt: skip
        "samples": [{"prompt": r["prompt"], "response": s} for r, s in zip(rows[:k], sampled)],
        "time_s": {"perplexity": t1 - t0, "rouge": t2 - t1, "total": time.perf_counter() - t0},
    }


def run_evaluate(cfg, run_dir: str | Path) -> dict[str, Any]:
    from ..utils.io import atomic_write_json
    from ..utils.runtime import resolve_device, seed_everything
    from .common import load_causal_lm, set_threads
    from .settings import check_evaluate_settings

    check_evaluate_settings(cfg)  # before the model loads
    seed_everything(cfg.seed)
    set_threads(cfg.get("threads"))
    device = resolve_device(cfg.device)
    model, tokenizer = load_causal_lm(cfg.model, device)
    result = {"model": str(cfg.model), **evaluate_model(model, tokenizer, cfg, device=device)}
    out = Path(cfg.get("out_dir") or run_dir)
    atomic_write_json(out / "results.json", result)
    result["results_path"] = str(out / "results.json")
    return result


def _report(r, run_dir: str):
    yield (f"[elm.causal.evaluate] perplexity {r['perplexity']['ppl']:.2f} ({r['perplexity']['tokens']} tokens), "
           f"ROUGE-L {100 * r['rouge_l']['f']:.2f} ({r['rouge_l']['examples']} prompts); {r['results_path']}")  # fmt: skip
    yield json.dumps(r["samples"][:2], indent=1)


cli = hydra_command("causal.evaluate", __name__, run_evaluate, _report)

if __name__ == "__main__":
    cli()
