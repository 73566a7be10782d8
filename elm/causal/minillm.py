"""Distil a causal teacher into an exported causal student: MiniLLM, or token-level KL.

``python -m elm.causal.minillm student=<dir> teacher.name=<dir> [minillm.objective=...]``
(``configs/causal_minillm.yaml``); the result is saved with ``save_pretrained`` into a temporary
directory renamed to ``out_dir`` (default ``<run dir>/model``), with ``minillm_info.json``.

Objectives (``minillm.objective``):

* ``forward_kl`` / ``reverse_kl``: token-level KL(p_teacher || q_student) or KL(q || p) over the
  vocabulary at every scored position of *teacher-forced* data (``minillm.data``: ``prompts`` =
  prompt + reference response, the response tokens scored; ``corpus`` = packed corpus blocks,
  every token scored), at ``minillm.temperature`` (``elm.distill.losses``).
* ``minillm``: sequence-level reverse KL, KL(q_theta(y|x) || p(y|x)), minimised on responses *the
  student generates* (Gu et al., "MiniLLM", ICLR 2024), by the policy gradient

      grad L = -E_{y ~ q} sum_t (R_t) grad log q(y_t | y_<t, x),   r_t = log p(y_t|.) - log q(y_t|.),
      R_t = sum_{t' >= t} r_t'

  with the paper's three stabilisers, each switchable:

  - **single-step decomposition** (``single_step``): R_t = r_t + R_{t+1}; the r_t part is
    replaced by its exact expectation over the vocabulary, i.e. the token-level reverse KL
    KL(q(.|y_<t, x) || p(.|y_<t, x)) at every sampled prefix, differentiated directly; only
    R_{t+1} goes through the (high-variance) policy-gradient term;
  - **teacher-mixed sampling** (``mix_alpha`` = alpha, paper 0.2): rollouts sample from
    p~ = alpha p + (1 - alpha) q, and every per-step term is weighted by the per-token importance
    weight w_t = q(y_t|.) / p~(y_t|.) (the paper's per-token approximation of the sequence
    ratio; bounded by 1 / (1 - alpha), so it needs no clipping);
  - **length normalisation** (``length_norm``): the future reward is the mean, not the sum, of
    the rewards after t: R^norm_{t+1} = sum_{t' > t} r_t' / (number of generated tokens after t).

  Plus MiniLLM's pre-training term (``pt_coef``): ``pt_coef`` x next-token loss on corpus blocks.

  [project decision] Not implemented from the paper: the PPO machinery (clipped ratio, several
  updates per rollout; here every rollout is used for exactly one on-policy update, where the
  ratio is 1 and clipping would not act), reward baselines/advantage estimates, and the
  teacher-SFT initialisation (the student arrives already distilled by ``elm.retrain``).
  Rollouts sample at temperature 1 with dropout off (the estimator is for samples from q / p~
  exactly) and stop at eos (and, with ``prompts.response_end=newline``, at a token holding a
  newline once some text was generated: a BBC response is one paragraph) or after
  ``max_new_tokens``; teacher and student both keep a KV cache. The loss pass runs without dropout too.

Reported per step: the losses, ``rkl_token`` (importance-weighted mean of the exact per-step
reverse KL on sampled prefixes), ``rkl_seq`` (importance-weighted mean of log q/p on the sampled
tokens, a per-token estimate of the sequence-level reverse KL), response length. Before and
after training, on the validation prompts (teacher-forced on the references): forward KL,
reverse KL and the student's NLL of the reference responses.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from ..distill.losses import forward_kl, reverse_kl
from ..train import clip_and_step
from ..utils.cli import hydra_command
from ..utils.hub import max_positions
from ..utils.io import DONE_FILE, atomic_dir, atomic_write_json
from ..utils.optim import configure_optimizer
from ..utils.runtime import autocast
from ..utils.settings import check_choice
from .common import StepBudget, set_threads
from .prompts import encode_pair, encode_prompt, end_ids
from .rollout import logits, minillm_loss, newline_ids, sample_rollouts, teacher_forced_kl
from .settings import MINILLM_DATA, OBJECTIVES

INFO_FILE = "minillm_info.json"
log = logging.getLogger("elm.causal")


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def right_pad(rows: list[dict[str, list[int]]], pad_id: int, device) -> dict[str, torch.Tensor]:
    width = max(len(r["input_ids"]) for r in rows)
    rows = [{**r, "attention_mask": [1] * len(r["input_ids"])} for r in rows]
    fill = {"input_ids": pad_id, "score_mask": 0, "attention_mask": 0}
    return {k: torch.tensor([r[k] + [v] * (width - len(r[k])) for r in rows], dtype=torch.long, device=device)
            for k, v in fill.items()}


class Batches:
    """An endless, seeded, reshuffled-per-epoch stream of index batches over ``n`` examples."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        if n < 1:
            raise ValueError("no examples to train on")
        self.n, self.batch_size, self.seed, self.epoch, self.order = n, min(batch_size, n), seed, 0, []

    def next(self) -> list[int]:
        if len(self.order) < self.batch_size:
            g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
            self.order = torch.randperm(self.n, generator=g).tolist()
            self.epoch += 1
        out, self.order = self.order[: self.batch_size], self.order[self.batch_size :]
        return out


def encode_examples(rows, tokenizer, m: Any, response_end: str) -> list[dict[str, list[int]]]:
    end = end_ids(tokenizer, response_end)
    out = []
    for r in rows:
        enc = encode_pair(
            tokenizer, r["prompt"], r["response"], m.max_prompt_tokens, m.max_response_tokens, end
        )
        out.append({"input_ids": enc["input_ids"], "score_mask": enc["response_mask"]})
    return out


@torch.no_grad()
def validation_metrics(student, teacher, examples: list[dict[str, list[int]]], pad_id: int, batch_size: int,
                       device) -> dict[str, float]:  # fmt: skip
    """Teacher-forced on reference responses: forward KL, reverse KL, student NLL (token means)."""
    sums, count = {"forward_kl": 0.0, "reverse_kl": 0.0, "nll": 0.0}, 0
    for start in range(0, len(examples), batch_size):
        batch = right_pad(examples[start : start + batch_size], pad_id, device)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        s = logits(student, ids, mask)[:, :-1].float()
        t = logits(teacher, ids, mask)[:, :-1, : s.shape[-1]].float()
        scored = batch["score_mask"][:, 1:] * mask[:, 1:]
        k = int(scored.sum())
        sums["forward_kl"] += float(forward_kl(s, t, scored)) * k
        sums["reverse_kl"] += float(reverse_kl(s, t, scored)) * k
        nll = F.cross_entropy(s.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        sums["nll"] += float(nll[scored.flatten().bool()].sum())
        count += k
    out = {k: v / max(count, 1) for k, v in sums.items()}
    return {**out, "ppl": math.exp(min(out["nll"], 50.0)), "tokens": count}


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def distil(student, teacher, tokenizer, prompts, m: Any, *, corpus=None, response_end: str = "eos", seed: int = 0,
           device="cpu", precision: str = "bf16", progress: bool = True, logger=None) -> dict[str, Any]:  # fmt: skip
    """Train ``student`` towards ``teacher`` with ``m.objective`` (``m``: the ``minillm`` config node).

    ``prompts``: a ``DatasetDict`` of prompt/response rows (``elm.causal.prompts.load_prompts``);
    ``corpus``: packed blocks (``load_corpus``), needed for ``m.data=corpus`` or ``m.pt_coef > 0``.
    Returns the step budget record, per-step ``history`` and validation metrics before/after.
    """
    check_choice("minillm.objective", m.objective, OBJECTIVES)
    check_choice("minillm.data", m.data, MINILLM_DATA)
    on_corpus = m.objective != "minillm" and m.data == "corpus"
    if (m.pt_coef > 0 or on_corpus) and corpus is None:
        raise ValueError("minillm.pt_coef > 0 or minillm.data=corpus needs the corpus")
    device = torch.device(device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    longest = m.max_prompt_tokens + max(m.max_new_tokens, m.max_response_tokens)
    for model in (student, teacher):
        if (limit := max_positions(model.config)) is not None and longest > limit:
            raise ValueError(f"minillm.max_prompt_tokens + max_new_tokens/max_response_tokens = {longest} exceeds "
                             f"the {limit} positions of {type(model).__name__}")  # fmt: skip
    student.to(device).eval()  # dropout off throughout (see the module docstring)
    teacher.to(device).eval()
    train_rows = prompts["train"]
    val_rows = [prompts["validation"][i] for i in range(min(len(prompts["validation"]), m.val_examples))]
    val_examples = encode_examples(val_rows, tokenizer, m, response_end)
    before = validation_metrics(student, teacher, val_examples, pad_id, m.batch_size, device)

    optimizer = configure_optimizer(student, m.lr, m.weight_decay)  # decay on matrices, as every elm loop
    budget = StepBudget(m.steps, m.get("max_time_s"), warmup_steps=m.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, budget.lr_factor)
    generator = torch.Generator(device=device).manual_seed(seed)
    stream = Batches(len(corpus["train"]) if on_corpus else len(train_rows), m.batch_size, seed)
    pt_stream = Batches(len(corpus["train"]), m.pt_batch_size, seed + 1) if m.pt_coef > 0 else None
    stop_ids = end_ids(tokenizer, "eos")
    end_tokens = newline_ids(tokenizer) if response_end == "newline" else []
    history: list[dict[str, float]] = []
    sums: dict[str, float] = {}
    step, tokens = 0, 0
    bar = tqdm(total=budget.requested, desc=f"{m.objective}", disable=not progress, leave=False)
    while not budget.finished(step):
        idx = stream.next()
        with autocast(device, precision):
            if m.objective == "minillm":
                rows = [train_rows[i] for i in idx]
                prompt_ids = [encode_prompt(tokenizer, r["prompt"])[-m.max_prompt_tokens :] for r in rows]
                ro = sample_rollouts(student, teacher, prompt_ids, max_new_tokens=m.max_new_tokens,
                                     mix_alpha=m.mix_alpha, stop_ids=stop_ids, end_ids=end_tokens, pad_id=pad_id,
                                     generator=generator, device=device)  # fmt: skip
                terms = minillm_loss(student, teacher, ro, mix_alpha=m.mix_alpha, single_step=m.single_step,
                                     length_norm=m.length_norm)  # fmt: skip
                terms["response_len"] = ro.lengths.float().mean()
                tokens += int(ro.gen_mask.sum())
            else:
                if m.data == "corpus":
                    rows = [{"input_ids": list(corpus["train"][i]["input_ids"])} for i in idx]
                    rows = [{**r, "score_mask": [1] * len(r["input_ids"])} for r in rows]
                else:
                    rows = encode_examples([train_rows[i] for i in idx], tokenizer, m, response_end)
                batch = right_pad(rows, pad_id, device)
                loss = teacher_forced_kl(student, teacher, batch, m.objective, m.temperature)
                terms = {"kl": loss, "total": loss}
                tokens += int(batch["score_mask"].sum())
            if pt_stream is not None:
                blocks = torch.tensor(
                    [corpus["train"][i]["input_ids"] for i in pt_stream.next()], device=device
                )
                terms["pt"] = student(input_ids=blocks, labels=blocks).loss
                terms["total"] = terms["total"] + m.pt_coef * terms["pt"]
        if not torch.isfinite(terms["total"]):
            raise FloatingPointError(f"non-finite {m.objective} loss at step {step}; lower minillm.lr")
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        clip_and_step(student.parameters(), optimizer, scheduler, m.grad_clip)
        step += 1
        values = {k: float(v.detach()) for k, v in terms.items()}
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        bar.update(1)
        bar.set_postfix(loss=f"{values['total']:.3f}")
        if step % m.log_every == 0 or budget.finished(step):
            since = step - (history[-1]["step"] if history else 0)
            record = {"step": step, **{k: v / since for k, v in sums.items()}, "lr": scheduler.get_last_lr()[0],
                      "time_s": budget.elapsed()}  # fmt: skip
            history.append(record)
            sums = {}
            if logger is not None:
                logger.log(record, step=step)
    bar.close()
    train_time = budget.elapsed()
    after = validation_metrics(student, teacher, val_examples, pad_id, m.batch_size, device)
    return {**budget.record(step), "train_time_s": train_time, "trained_tokens": tokens, "history": history,
            "val_before": before, "val_after": after}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Export and the stage
# ---------------------------------------------------------------------------------------------


def export_student(model, tokenizer, out_dir: str | Path, info: dict[str, Any]) -> Path:
    """``save_pretrained`` (model + tokenizer + ``minillm_info.json``, ``arch.json`` for ELM models)
    into a temporary sibling directory, renamed to ``out_dir``; ``DONE`` last."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if getattr(model.config, "model_type", None) == "elm":
            from ..modeling import arch_from_config

            arch_from_config(model.config).to_json(tmp / "arch.json")
        atomic_write_json(tmp / INFO_FILE, info)
        (tmp / "README.md").write_text(student_card(info))
    atomic_write_json(out_dir / DONE_FILE, {"stage": "minillm", "objective": info.get("objective")})
    return out_dir


def student_card(info: dict[str, Any]) -> str:
    """README.md of a distilled causal student: front matter (text-generation, base model, model-index
    with the validation reverse KL and reference NLL after distillation) and before/after numbers."""
    import yaml

    from ..retrain.export import public_name

    teacher = public_name(info.get("teacher"))
    before, after = info.get("val_before") or {}, info.get("val_after") or {}
    meta: dict[str, Any] = {"library_name": "transformers", "license": "other", "pipeline_tag": "text-generation",
                            "tags": ["elm", "knowledge-distillation", "minillm", str(info.get("objective", "-"))]}  # fmt: skip
    if "/" in teacher and not teacher.startswith("local:"):
        meta["base_model"] = teacher
    metrics = [{"type": k, "value": round(float(after[k]), 4), "name": f"validation {k} (after)"}
               for k in ("reverse_kl", "forward_kl", "nll") if isinstance(after.get(k), int | float)]  # fmt: skip
    if metrics:
        meta["model-index"] = [{"name": "elm-causal-student", "results": [
            {"task": {"type": "text-generation"}, "dataset": {"name": "validation prompts", "type": "prompts"},
             "metrics": metrics}]}]  # fmt: skip
    rows = [f"| {k} | {before.get(k, float('nan')):.4f} | {after.get(k, float('nan')):.4f} |"
            for k in ("reverse_kl", "forward_kl", "nll") if k in after]  # fmt: skip
    return "\n".join(["---", *yaml.safe_dump(meta, sort_keys=False).strip().splitlines(), "---", "",
                      f"# ELM causal student distilled from `{teacher}` ({info.get('objective', '-')})", "",
                      f"{info.get('steps', '-')} steps of `elm.causal.minillm`; validation before and after:", "",
                      "| metric | before | after |", "|---|---:|---:|", *rows, ""])  # fmt: skip


def run_minillm(cfg: DictConfig, run_dir: str | Path, *, prompts=None, corpus=None) -> dict[str, Any]:
    """Load student and teacher, distil with ``cfg.minillm``, export; returns the info dict (+ ``model_dir``)."""
    from ..data.corpus import load_corpus_of
    from ..teacher import check_vocab, load_teacher
    from ..utils.logging import RunLogger
    from ..utils.runtime import resolve_device, seed_everything
    from .common import load_causal_lm
    from .prompts import load_prompts
    from .settings import check_minillm_settings

    check_minillm_settings(cfg)  # before a model loads
    run_dir = Path(run_dir)
    seed_everything(cfg.seed)
    set_threads(cfg.get("threads"))
    device = resolve_device(cfg.device)
    teacher = load_teacher(cfg.teacher.name, device=device)
    if not teacher.causal or not teacher.has_lm_head:
        raise ValueError(f"teacher {cfg.teacher.name!r} is not a causal LM with an LM head")
    student, _ = load_causal_lm(cfg.student, device)
    check_vocab(student.config.vocab_size, teacher.tokenizer, where="student")
    tokenizer = teacher.tokenizer
    m = cfg.minillm
    if prompts is None:
        prompts = load_prompts(cfg.prompts)
    if corpus is None and (m.pt_coef > 0 or (m.objective != "minillm" and m.data == "corpus")):
        corpus = load_corpus_of(cfg, tokenizer)
    logger = RunLogger.for_run(run_dir, cfg.logger, OmegaConf.to_container(m, resolve=True))
    try:
        result = distil(student, teacher.model, tokenizer, prompts, m, corpus=corpus,
                        response_end=cfg.prompts.get("response_end", "eos"), seed=cfg.seed, device=device,
                        precision=cfg.precision, progress=cfg.progress, logger=logger)  # fmt: skip
    finally:
        logger.finish()
    info = {"stage": "minillm", "objective": m.objective, "student": str(cfg.student), "teacher": str(cfg.teacher.name),
            "settings": OmegaConf.to_container(m, resolve=True), **result}  # fmt: skip
    out = Path(cfg.out_dir) if cfg.get("out_dir") else run_dir / "model"
    export_student(student.cpu(), tokenizer, out, info)
    atomic_write_json(run_dir / INFO_FILE, {**info, "model_dir": str(out)})
    return {**info, "model_dir": str(out)}


def _run(cfg: DictConfig, run_dir: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    return {**run_minillm(cfg, run_dir), "wall_s": time.perf_counter() - t0}


def _report(r, run_dir: str):
    b, a = r["val_before"], r["val_after"]
    yield (f"[elm.causal.minillm] {r['objective']}: {r['steps']} steps in {r['train_time_s']:.0f} s; validation "
           f"reverse KL {b['reverse_kl']:.4f} -> {a['reverse_kl']:.4f}, forward KL {b['forward_kl']:.4f} -> "
           f"{a['forward_kl']:.4f}, reference NLL {b['nll']:.4f} -> {a['nll']:.4f}")  # fmt: skip
    yield f"[elm.causal.minillm] model in {r['model_dir']} ({r['wall_s']:.0f} s)"
    log.debug(json.dumps(r["history"][-1:]))


cli = hydra_command("causal.minillm", __name__, _run, _report)

if __name__ == "__main__":
    cli()
