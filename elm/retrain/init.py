"""Initialise a retrained student from a finished search: the supernet's weights for an ``arch.json``.

Steps: check the search dir (its ``DONE`` file says the search finished) -> load
``search_state.pt`` -> rebuild the :class:`~elm.supernet.Supernet` exactly as the search trainer
built it (same space, teacher dims and tokenizer) -> restore each candidate's elastic state
(active heads, FFN width) -> find, layer by layer, the candidate matching the architecture ->
:func:`elm.supernet.extract` copies the active slices into a standalone Hugging Face model.

[project decision] A layer of an architecture is matched to the candidate with the same
``(block, share)`` pair: the candidates of a layer are exactly ``blocks x shares``, so the pair
names one candidate. Its other fields (heads, head_dim, FFN width, number of FFNs, bottleneck)
must equal that candidate's configuration after the search; otherwise the first mismatch is
named and nothing is initialised (an arch from another search, or edited by hand, would only
be partly covered by trained weights).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ..search.trainer import STATE_FILE as SEARCH_STATE_FILE
from ..space import ArchConfig
from ..supernet import SpaceConfig, Supernet, extract

DONE_FILE = "DONE"  # the marker every stage writes last (elm.search.run.DONE_FILE; not imported: plots)


class InitError(ValueError):
    """A search dir or state that cannot initialise the requested architecture (one clear line)."""


def check_search_dir(search_dir: str | Path) -> Path:
    """The search run dir as a Path, if it exists, finished (``DONE``) and holds its state."""
    path = Path(search_dir).expanduser()
    if not path.is_dir():
        raise InitError(f"search_dir {str(path)!r} does not exist")
    if not (path / DONE_FILE).is_file():
        raise InitError(
            f"search_dir {str(path)!r} has no {DONE_FILE} file: that search has not finished, so there "
            f"are no trained weights to start from; finish it (python -m elm.search resume=true) or drop search_dir"
        )
    if not (path / SEARCH_STATE_FILE).is_file():
        raise InitError(f"search_dir {str(path)!r} has no {SEARCH_STATE_FILE}; it is not a search run dir")
    return path


def load_search_state(search_dir: str | Path) -> dict[str, Any]:
    """The ``search_state.pt`` dict of a finished search (on CPU)."""
    path = check_search_dir(search_dir) / SEARCH_STATE_FILE
    state = torch.load(path, map_location="cpu", weights_only=False)
    missing = {"supernet", "elastic", "space", "layer_map"} - set(state)
    if missing:
        raise InitError(f"{path} lacks {sorted(missing)}; it was not written by elm.search")
    return state


def restore_elastic(supernet: Supernet, elastic: dict[str, dict[str, int]]) -> None:
    """Set every candidate's active heads and FFN width from the search state's ``elastic`` dict."""
    for *_, key, cand in supernet.candidates():
        if key not in elastic:
            raise InitError(f"the search state has no elastic state for candidate {key}")
        cand.attention.active_heads = elastic[key]["heads"]
        for ffn in cand.ffns:
            ffn.active_dim = elastic[key]["ffn"]


def supernet_from_state(state: dict[str, Any], teacher) -> Supernet:
    """Rebuild the searched supernet (same arguments as ``SearchTrainer``) with its trained weights."""
    space = SpaceConfig(**state["space"])
    supernet = Supernet(
        space, vocab_size=len(teacher.tokenizer), max_positions=teacher.max_positions,
        teacher_hidden_size=teacher.hidden_size, teacher_layers=teacher.num_layers,
        type_vocab_size=0 if space.causal else 2, pad_token_id=teacher.tokenizer.pad_token_id or 0,
    )  # fmt: skip
    try:
        supernet.load_state_dict(state["supernet"])
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise InitError(
            f"the search state does not fit a supernet for teacher {teacher.name!r} "
            f"(searched with another teacher?): {first}"
        ) from None
    restore_elastic(supernet, state["elastic"])
    supernet.layer_map = list(state["layer_map"])
    return supernet


def match_choice(supernet: Supernet, arch: ArchConfig) -> list[int]:
    """Candidate index per layer for ``arch``; raises :class:`InitError` naming the first mismatch."""
    if arch.num_layers != len(supernet.layers):
        raise InitError(
            f"arch has {arch.num_layers} layers but the searched supernet has {len(supernet.layers)}"
        )
    for name, value in supernet.arch_base.items():
        if getattr(arch, name) != value:
            raise InitError(f"arch.{name}={getattr(arch, name)!r} but the searched supernet has {value!r}")
    choice = []
    for li, layer in enumerate(arch.layers):
        found = [
            ci for ci, c in enumerate(supernet.layers[li]) if (c.block, c.share) == (layer.block, layer.share)
        ]
        if not found:
            names = [c.name for c in supernet.layers[li]]
            raise InitError(
                f"layers[{li}] (block={layer.block}, share={layer.share}) is not a candidate of the "
                f"searched space; candidates: {names}"
            )
        cand = supernet.layers[li][found[0]]
        active = cand.layer_config()
        for f in dataclasses.fields(layer):
            want, have = getattr(layer, f.name), getattr(active, f.name)
            if want != have:
                raise InitError(
                    f"layers[{li}].{f.name}={want!r} but the searched candidate L{li}.{cand.name} has "
                    f"{f.name}={have!r}; this arch does not come from this search"
                )
        choice.append(found[0])
    return choice


def init_from_search(
    search_dir: str | Path,
    arch: ArchConfig,
    teacher,
    model_cls: type,
    keep_embeddings: bool = False,
    **config_kwargs: Any,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A ``model_cls`` for ``arch`` holding the trained supernet's layers, and facts for the card.

    [project decision] The embeddings get the Hugging Face model's own init (normal, std
    ``initializer_range``), not the supernet's: the block-wise search feeds every layer the
    teacher's (mapped) hidden states and never trains the student embeddings, so the supernet
    holds untrained PyTorch-default ``N(0, 1)`` embeddings whose tied LM head starts at an MLM
    loss of ~24 instead of ~ln(vocab). ``keep_embeddings=True`` copies them anyway. The LM /
    classifier heads keep their fresh init.
    """
    state = load_search_state(search_dir)
    supernet = supernet_from_state(state, teacher)
    choice = match_choice(supernet, arch)
    model = extract(supernet, model_cls, choice, **config_kwargs)
    if not keep_embeddings:  # [project decision] see the docstring
        backbone = getattr(model, "elm", model)
        backbone.embeddings.apply(model._init_weights)
    info = {
        "search_dir": str(Path(search_dir).resolve()),
        "choice": choice,
        "candidates": [f"L{li}.{supernet.layers[li][ci].name}" for li, ci in enumerate(choice)],
        "layer_map": list(state["layer_map"]),
        "search_epochs": state.get("epoch"),
        "search_steps": state.get("step"),
        "embeddings": "supernet" if keep_embeddings else "fresh init",
    }
    return model, info
