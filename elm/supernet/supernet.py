"""The ELM supernet: embeddings + L layers, each holding candidate blocks side by side.

Two ways to run it:

* ``blockwise(teacher_hidden_states, mask)`` — search time. [project decision] Every candidate
  of student layer l reads the teacher's hidden state at mapped layer ``m[l]`` and is distilled
  towards the teacher's state ``m[l + 1]``, both in the one shared basis of the whole supernet,
  so the blocks chosen for different layers chain (why: :mod:`elm.supernet.basis`). ``chain``
  makes a layer read a candidate of the previous layer instead of the teacher (chained
  training), so blocks also learn to work on each other's outputs.
* ``forward(input_ids, mask)`` — the active path (one candidate per layer, chained from the
  student embeddings), which is exactly what ``extract()`` turns into a standalone model.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..blocks import family
from ..modeling import ElmConfig, modeling_elm
from ..modeling.modeling_elm import ElmEmbeddings, attention_bias
from ..space import ArchConfig, ArchError, SpaceConfig
from .basis import Basis
from .elastic import uniform_layer_map


class Supernet(nn.Module):
    def __init__(
        self,
        space: SpaceConfig,
        vocab_size: int,
        max_positions: int,
        teacher_hidden_size: int,
        teacher_layers: int,
        type_vocab_size: int = 2,
        pad_token_id: int = 0,
    ) -> None:
        super().__init__()
        self.space = space.validate()
        self.arch_base = dict(
            hidden_size=space.hidden_size,
            embedding_size=space.embedding_size,
            vocab_size=vocab_size,
            max_positions=max_positions,
            type_vocab_size=type_vocab_size,
            causal=space.causal,
        )
        self.embeddings = ElmEmbeddings(
            ElmConfig.from_arch_dict({**self.arch_base, "layers": []}, hidden_dropout_prob=space.dropout,
                                     pad_token_id=pad_token_id)  # fmt: skip
        )
        self.layers = nn.ModuleList(
            nn.ModuleList(self._candidate(block, share) for block, share in space.candidates())
            for _ in range(space.num_layers)
        )
        layer_map = list(space.layer_map) if space.layer_map else uniform_layer_map(space.num_layers, teacher_layers)
        if len(layer_map) != space.num_layers + 1 or not all(0 <= i <= teacher_layers for i in layer_map):
            raise ArchError(
                f"space.layer_map={layer_map} must list {space.num_layers + 1} teacher hidden-state "
                f"indices in [0, {teacher_layers}]"
            )
        self.layer_map = layer_map
        if space.hidden_size > teacher_hidden_size:
            raise ArchError(f"space.hidden_size={space.hidden_size} is wider than the teacher ({teacher_hidden_size})")
        # the shared teacher -> student basis (fixed; set by inheritance when the student is narrower)
        self.identity_basis = space.hidden_size == teacher_hidden_size
        self.register_buffer("basis_mean", torch.zeros(teacher_hidden_size))
        self.register_buffer("basis_proj", torch.eye(teacher_hidden_size, space.hidden_size))
        # variance of each layer's teacher target in the basis: the scale of the point-wise loss
        self.register_buffer("target_variance", torch.ones(space.num_layers + 1))
        self.active = [0] * space.num_layers
        self.pad_token_id = pad_token_id

    def _candidate(self, block: str, share: str):
        s, fields = self.space, self.space.layer_fields(block, share)
        return family(block).candidate(s.hidden_size, max_heads=s.heads_of(block), head_dim=fields["head_dim"],
                                       share=share, ffn_init=s.ffn_init, ffn_max=s.ffn_max, num_ffn=fields["num_ffn"],
                                       bottleneck_size=fields["bottleneck_size"], dropout=s.dropout,
                                       attention_dropout=s.attention_dropout)  # fmt: skip

    # ---- search-time path -----------------------------------------------------------------
    @classmethod
    def for_teacher(cls, space: SpaceConfig, teacher) -> Supernet:
        """The supernet of ``space`` for an ``elm.teacher.Teacher``: its vocabulary, positions, width,
        depth and pad token (what search and retrain both build, so the two always agree)."""
        return cls(space, vocab_size=len(teacher.tokenizer), max_positions=teacher.max_positions,
                   teacher_hidden_size=teacher.hidden_size, teacher_layers=teacher.num_layers,
                   type_vocab_size=0 if space.causal else 2, pad_token_id=teacher.tokenizer.pad_token_id or 0)  # fmt: skip

    def with_elastic(self, state_dict: dict, elastic: dict[str, dict[str, int]] | None) -> dict:
        """``state_dict`` with the active widths as module extra states. States written before the
        widths lived in the modules carry them as ``elastic`` ({candidate key: {"heads", "ffn"}})."""
        if elastic is None or any(k.endswith("_extra_state") for k in state_dict):
            return state_dict
        state = dict(state_dict)
        for li, ci, key, cand in self.candidates():
            if key not in elastic:
                raise ArchError(f"the saved state has no elastic widths for candidate {key}")
            state[f"layers.{li}.{ci}.attention._extra_state"] = {"active_heads": elastic[key]["heads"]}
            for j in range(len(cand.ffns)):
                state[f"layers.{li}.{ci}.ffns.{j}._extra_state"] = {"active_dim": elastic[key]["ffn"]}
        return state

    def candidates(self):
        """Yield ``(layer, index, key, block)`` for every candidate; key is e.g. ``L3.mobilebert.qv``."""
        for li, layer in enumerate(self.layers):
            for ci, cand in enumerate(layer):
                yield li, ci, f"L{li}.{cand.name}", cand

    @property
    def basis(self) -> Basis:
        return Basis(self.basis_mean, self.basis_proj)

    @torch.no_grad()
    def set_basis(self, basis: Basis, target_variance: torch.Tensor | None = None) -> None:
        """Install the shared basis (must be the identity when the widths agree) and the per-boundary
        variance of the teacher's states in it (``[num_layers + 1]``, boundary 0 = embeddings)."""
        if tuple(basis.proj.shape) != tuple(self.basis_proj.shape):
            raise ValueError(f"basis {tuple(basis.proj.shape)} does not fit {tuple(self.basis_proj.shape)}")
        if self.identity_basis and not basis.is_identity:
            raise ValueError("a student as wide as its teacher uses the identity basis")
        self.basis_mean.copy_(basis.mean)
        self.basis_proj.copy_(basis.proj)
        if target_variance is not None:
            self.target_variance.copy_(target_variance)

    def to_student(self, h: torch.Tensor) -> torch.Tensor:
        """Teacher states in the shared basis (no-op when the widths agree)."""
        if self.identity_basis:
            return h
        return (h - self.basis_mean.to(h.dtype)) @ self.basis_proj.to(h.dtype)

    def block_inputs(self, teacher_hidden_states, layer: int) -> torch.Tensor:
        return self.to_student(teacher_hidden_states[self.layer_map[layer]])

    def block_targets(self, teacher_hidden_states, layer: int) -> torch.Tensor:
        """The teacher's state a layer is distilled towards, in the teacher's coordinates (for RKD)."""
        return teacher_hidden_states[self.layer_map[layer + 1]]

    def blockwise(self, teacher_hidden_states, attention_mask=None, layers=None, chain=None,
                  common_dropout: bool = False):  # fmt: skip
        """Outputs of every candidate of every layer: list[list[Tensor]].

        By default every layer reads the teacher's mapped state (in the basis). ``chain[l]`` = a
        candidate index of layer l-1 makes layer l read that candidate's (detached) output of this
        same pass instead: chained training. ``layers`` restricts the pass (no chaining then).
        ``common_dropout``: a layer's candidates share their dropout masks (:class:`CommonDropout`)."""
        t = teacher_hidden_states[0].shape[1]
        mask = attention_bias(attention_mask, self.space.causal, t)
        outputs = []
        for li in layers if layers is not None else range(len(self.layers)):
            src = chain[li] if chain is not None and layers is None and li > 0 else None
            x = outputs[li - 1][src].detach() if src is not None else self.block_inputs(teacher_hidden_states, li)
            common = CommonDropout() if common_dropout and self.training else None
            outs = []
            for cand in self.layers[li]:
                with common.candidate() if common is not None else contextlib.nullcontext():
                    outs.append(cand(x, mask, self.space.causal)[0])
            outputs.append(outs)
        return outputs

    # ---- active path ----------------------------------------------------------------------
    def set_active(self, choice: list[int]) -> None:
        if len(choice) != len(self.layers) or any(not 0 <= c < len(self.layers[0]) for c in choice):
            raise ValueError(f"choice {choice} must pick one of {len(self.layers[0])} candidates per layer")
        self.active = list(choice)

    def kept_layers(self, choice: list[int] | None = None) -> list[int]:
        """The layers of a choice that are not identity candidates (the exported model's layers)."""
        choice = self.active if choice is None else choice
        return [li for li, ci in enumerate(choice) if not self.layers[li][ci].identity]

    def kept_boundaries(self, choice: list[int] | None = None) -> list[int]:
        """The supernet boundary (0 = embeddings) each state of the exported model of ``choice``
        stands for, ``[l_1, ..., l_n, L]`` for kept layers ``l_1 < ... < l_n``.

        Identity candidates pass a state on unchanged, so a state of the supernet's chain holds
        through a run of skipped layers; it stands for the *last* boundary of its run: the
        embeddings for boundary ``l_1``, the output of kept layer ``l_j`` for ``l_(j+1)`` (or ``L``).
        That is where the chain compares it with the teacher, and it makes the exported model's
        last state aim at the teacher state of the supernet's last boundary. Without skips this
        is ``[0, 1, ..., L]``; retraining distils towards ``layer_map`` at these boundaries."""
        return self.kept_layers(choice) + [len(self.layers)]

    def active_arch(self, choice: list[int] | None = None) -> ArchConfig:
        """The architecture of ``choice`` (default: the active one); identity candidates drop their layer."""
        choice = self.active if choice is None else choice
        layers = [self.layers[li][choice[li]].layer_config() for li in self.kept_layers(choice)]
        if not layers:
            raise ArchError(f"choice {list(choice)} skips every layer; an architecture needs at least one")
        return ArchConfig(**self.arch_base, layers=layers).validate()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        """Chain the active candidates from the student embeddings; returns the last hidden state."""
        x = self.embeddings(input_ids, token_type_ids)
        mask = attention_bias(attention_mask, self.space.causal, x.shape[1])
        for li, ci in enumerate(self.active):
            x, _ = self.layers[li][ci](x, mask, self.space.causal)
        return x

    def embedding_parameters(self) -> int:
        return ArchConfig(**self.arch_base, layers=[]).embedding_parameters()


class CommonDropout:
    """Common random numbers for one layer's candidates in one step: the k-th dropout of a given
    shape in each candidate multiplies by the same mask (masks within a candidate stay distinct).

    [project decision, issue #15] Each candidate still sees independent Bernoulli(1 - p) keeps in
    every dropout, so its own training is distributed as before; only the candidates' noise is
    shared (the classic variance reduction for comparing alternatives), and a layer's candidates
    draw their masks once (docs/search.md, "Common dropout masks"). CPU only: CUDA dropout is one
    fused kernel (``modeling_elm.apply_dropout``)."""

    def __init__(self) -> None:
        self.drawn: dict[tuple, list[torch.Tensor]] = {}
        self.used: dict[tuple, int] = {}

    def __call__(self, shape, p: float, device, dtype) -> torch.Tensor:
        key = (tuple(shape), p, device, dtype)
        k = self.used[key] = self.used.get(key, 0) + 1
        masks = self.drawn.setdefault(key, [])
        if k > len(masks):
            masks.append(modeling_elm.dropout_multiplier(shape, p, device, dtype))
        return masks[k - 1]

    @contextlib.contextmanager
    def candidate(self):
        """Run one candidate with the layer's masks (its k-th dropout of a shape takes mask k)."""
        self.used, outer = {}, modeling_elm.multiplier_source
        modeling_elm.multiplier_source = self
        try:
            yield
        finally:
            modeling_elm.multiplier_source = outer
