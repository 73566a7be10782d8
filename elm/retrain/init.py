"""Initialise a retrained student from a finished search: the supernet's weights for an ``arch.json``.

The :class:`~elm.supernet.Supernet` of a finished search (``DONE``) is rebuilt from
``search_state.pt`` exactly as the search built it, with its elastic state; the candidates matching
the architecture are copied into a standalone Hugging Face model (:func:`elm.supernet.extract`).

[project decision] A layer of an architecture is matched to the candidate with the same
``(block, share)`` pair: the candidates of a layer are exactly ``blocks x shares``, so the pair
names one candidate. Its other fields (heads, head_dim, FFN width, number of FFNs, bottleneck)
must equal that candidate's configuration after the search; otherwise the first mismatch is
named and nothing is initialised (an arch from another search, or edited by hand, would only
be partly covered by trained weights).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any

import torch

from ..space import ArchConfig, SpaceConfig
from ..supernet import Supernet, extract
from ..supernet.basis import Basis
from ..utils.hub import quiet_transformers
from ..utils.io import DONE_FILE, SEARCH_STATE_FILE, load_checkpoint


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
    state = load_checkpoint(path, "cpu", "search state", "supernet")  # tensors only: no code runs
    if missing := {"supernet", "space", "layer_map"} - set(state):
        raise InitError(f"{path} lacks {sorted(missing)}; it was not written by elm.search")
    return state


def supernet_from_state(state: dict[str, Any], teacher) -> Supernet:
    """Rebuild the searched supernet (``Supernet.for_teacher``, as the search built it) with its trained
    weights and active widths."""
    supernet = Supernet.for_teacher(SpaceConfig.from_dict(state["space"]), teacher)
    try:
        supernet.load_state_dict(supernet.with_elastic(state["supernet"], state.get("elastic")))
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise InitError(f"the search state does not fit a supernet for teacher {teacher.name!r} "
                        f"(searched with another teacher?): {first}") from None
    supernet.layer_map = list(state["layer_map"])
    return supernet


def match_choice(supernet: Supernet, arch: ArchConfig, recorded: list[list[int]] | None = None) -> list[int]:
    """Candidate index per layer for ``arch``; raises :class:`InitError` naming the first mismatch.

    An architecture shorter than the supernet came from a choice with identity (``skip``)
    candidates: its layers are matched to supernet layers in order, the others skipped. When
    several placements fit (equal layers in a row), the one among ``recorded`` (the search's own
    choices, ``pareto.json``) is taken."""
    skips = [next((ci for ci, c in enumerate(layer) if c.identity), None) for layer in supernet.layers]
    if arch.num_layers < len(supernet.layers) and any(ci is not None for ci in skips):
        return _match_with_skips(supernet, arch, skips, recorded or [])
    if arch.num_layers != len(supernet.layers):
        raise InitError(f"arch has {arch.num_layers} layers but the searched supernet has "
                        f"{len(supernet.layers)}")
    for name, value in supernet.arch_base.items():
        if getattr(arch, name) != value:
            raise InitError(f"arch.{name}={getattr(arch, name)!r} but the searched supernet has {value!r}")
    choice = []
    for li, (layer, cands) in enumerate(zip(arch.layers, supernet.layers)):
        found = [ci for ci, c in enumerate(cands) if (c.block, c.share) == (layer.block, layer.share)]
        if not found:
            raise InitError(f"layers[{li}] (block={layer.block}, share={layer.share}) is not a candidate "
                            f"of the searched space; candidates: {[c.name for c in cands]}")
        cand = cands[found[0]]
        active = cand.layer_config()
        for f in dataclasses.fields(layer):
            want, have = getattr(layer, f.name), getattr(active, f.name)
            if want != have:
                raise InitError(f"layers[{li}].{f.name}={want!r} but the searched candidate L{li}.{cand.name}"
                                f" has {f.name}={have!r}; this arch does not come from this search")
        choice.append(found[0])
    return choice


def _match_with_skips(supernet: Supernet, arch: ArchConfig, skips: list[int | None], recorded: list[list[int]]):
    fits = []
    for kept in itertools.combinations(range(len(supernet.layers)), arch.num_layers):
        if any(skips[li] is None for li in range(len(supernet.layers)) if li not in kept):
            continue
        choice = list(skips)
        for layer, li in zip(arch.layers, kept):
            found = [ci for ci, c in enumerate(supernet.layers[li]) if c.layer_config() == layer]
            if not found:
                break
            choice[li] = found[0]
        else:
            fits.append(choice)
    if not fits:
        raise InitError(f"no choice of the searched supernet ({len(supernet.layers)} layers, identity candidates "
                        f"where a layer may be skipped) gives this {arch.num_layers}-layer arch; "
                        "this arch does not come from this search")  # fmt: skip
    return next((c for c in fits if c in recorded), fits[0])


def recorded_choices(search_dir: str | Path) -> list[list[int]]:
    """The choices a search wrote for its budgets (``pareto.json``; empty if unreadable)."""
    try:
        chosen = json.loads((Path(search_dir) / "pareto.json").read_text()).get("chosen", {})
        return [list(point["choice"]) for point in chosen.values()]
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return []


def basis_from_state(state: dict[str, Any]) -> tuple[Basis, torch.Tensor]:
    """The search's shared teacher -> student basis and the variance of each mapped teacher state in
    it (the point-wise loss of retraining continues in the coordinates the blocks were trained in)."""
    net = state["supernet"]
    if "basis_proj" not in net:
        raise InitError("the search state has no shared basis (written by an elm before teacher inheritance); "
                        "run the search again")  # fmt: skip
    return Basis(net["basis_mean"].float().cpu(), net["basis_proj"].float().cpu()), net["target_variance"].float().cpu()


def init_from_search(
    search_dir: str | Path,
    arch: ArchConfig,
    teacher,
    model_cls: type,
    keep_embeddings: bool | None = None,
    state: dict[str, Any] | None = None,
    **config_kwargs: Any,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A ``model_cls`` for ``arch`` holding the trained supernet's layers and embeddings, and facts
    for the card (``state``: the already loaded ``search_state.pt``, to read it once).

    [project decision] The embeddings are the supernet's (inherited from the teacher and distilled
    during the search) unless the search left them untrained (neither inherited nor trained: searches
    before inheritance); then, or with ``keep_embeddings=False``, they get the Hugging Face model's
    own init (normal, std ``initializer_range``): untrained PyTorch-default ``N(0, 1)`` embeddings
    would start the tied LM head at an MLM loss of ~24 instead of ~ln(vocab). Embeddings the search
    trained but did not inherit (teachers other than BERT-family encoders) started at ``N(0, 1)``
    and keep that scale, which the LayerNorm after them hides from the layers but not from the
    tied LM head: a causal student's LM loss averaged 21 over its first 25 steps (ln(vocab) =
    8.3), and it ended its retraining at 9x the uniform baseline's perplexity. They are scaled
    down by :func:`rescale_embeddings`, which leaves the model's hidden states as they were. The
    LM / classifier heads keep their fresh init.
    """
    state = load_search_state(search_dir) if state is None else state
    inherited = bool((state.get("inherit") or {}).get("inherited"))
    keep = bool(state.get("train_embeddings") or inherited) if keep_embeddings is None else keep_embeddings
    supernet = supernet_from_state(state, teacher)
    choice = match_choice(supernet, arch, recorded_choices(search_dir))
    model = extract(supernet, model_cls, choice, **config_kwargs)
    embeddings = getattr(model, "elm", model).embeddings
    if not keep:  # [project decision] see the docstring
        embeddings.apply(model._init_weights)
    scale = None if not keep or inherited else rescale_embeddings(embeddings, model.config.initializer_range)
    boundaries = supernet.kept_boundaries(choice)
    info = {
        "search_dir": str(Path(search_dir).resolve()),
        "choice": choice,
        "candidates": [f"L{li}.{supernet.layers[li][ci].name}" for li, ci in enumerate(choice)],
        # the teacher state each state of the model stands for (identity candidates drop layers)
        "boundaries": boundaries,
        "layer_map": [supernet.layer_map[b] for b in boundaries],
        "search_epochs": state.get("epoch"),
        "search_steps": state.get("step"),
        "inherited_from_teacher": inherited,
        "embeddings": "fresh init" if not keep else "supernet" if scale is None else f"supernet, scaled by {scale:.3g}",
    }
    return model, info


@torch.no_grad()
def rescale_embeddings(embeddings: torch.nn.Module, std: float) -> float:
    """Scale an ``ElmEmbeddings``' tables (word, position, token type) and its projection's bias by
    one factor, so that the word rows have standard deviation ``std``; returns the factor.

    The LayerNorm after them sees the same vector times that factor, so the hidden states do not
    change (up to its eps); the tied LM head, which reads the word rows themselves, starts near
    ln(vocab) instead of far above it."""
    factor = std / float(embeddings.word.weight.float().std())
    for table in (embeddings.word, embeddings.position, embeddings.token_type):
        if table is not None:
            table.weight.mul_(factor)
    if embeddings.project is not None:
        embeddings.project.bias.mul_(factor)
    return factor


def init_from_model(path: str | Path, arch: ArchConfig, model_cls: type, **config_kwargs: Any):
    """A ``model_cls`` for ``arch`` starting from a saved elm model (e.g. a teacher slice written by
    ``elm.compare``); its architecture must be ``arch``. Heads it lacks keep their fresh init."""
    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise InitError(f"init_from={str(path)!r} is not a saved model dir (no config.json)")
    try:
        with quiet_transformers():  # a fresh LM head is expected
            model = model_cls.from_pretrained(str(path), **config_kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise InitError(f"init_from={str(path)!r} cannot be loaded as {model_cls.__name__}: {err}") from None
    saved = ArchConfig.from_dict(model.config.arch_dict())
    if saved.to_dict() != arch.to_dict():
        raise InitError(f"init_from={str(path)!r} holds another architecture than the one to retrain")
    return model, {"init_from": str(path.resolve()), "embeddings": "init_from"}


def fit_point_target(teacher, train, layer_map: list[int], width: int, seed: int = 0, batches: int = 4,
                     batch_size: int = 8) -> tuple[Basis, torch.Tensor]:  # fmt: skip
    """The shared basis (identity at the teacher's width) and per-boundary variances for a student
    that was not searched, from the teacher's states on ``batches`` seeded training batches."""
    from ..data.collate import sample_batches
    from ..supernet.inherit import fit_basis
    from ..supernet.teacher_weights import hidden_moments

    rows = sample_batches(train, seed, batches, batch_size, teacher.device)
    return fit_basis(hidden_moments(teacher, rows), list(layer_map), width)
