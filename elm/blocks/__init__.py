"""Block families: what a BERT block and a MobileBERT block are, said once (issue #17).

A :class:`BlockFamily` holds what the space, the supernet, extraction, inheritance, the analysis,
the plots and the baselines used to ask with ``block == "mobilebert"``: its structure (a
bottleneck around the block or not, a fixed FFN count), which :class:`~elm.space.SpaceConfig`
fields give its heads, head width and stacked FFNs, how its :class:`~elm.space.LayerConfig` is
built and validated, its extra parameters, its PCA threshold and its plot colour and label, and
its own space settings with their defaults (``space.families.<name>.<key>``, e.g.
``space.families.mobilebert.heads=2``), so a new family brings its settings without a new
``SpaceConfig`` field.

Everything outside this package asks the registry (:func:`family`) rather than comparing names.
One exception by design: ``elm/modeling/modeling_elm.py`` ships inside every export as remote code
(``trust_remote_code=True``), so it must not import ``elm``; its layer reads the structure from the
exported layer fields (``bottleneck_size``) and the config (``block_activations``, ``block_layouts``:
written from this registry by ``elm.modeling.config_from_arch``). A family with its own layer
(``layout``) keeps it here too, as ``<layout>_layer.py``; exports ship it beside the remote code
(``elm.modeling.modeling_elm_layouts``).

This package imports nothing from ``elm`` (``elm.space`` imports it), so it works on any object
with the fields of a ``LayerConfig`` / ``SpaceConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class ArchError(ValueError):
    """An architecture description that cannot be built (the message names the bad value).

    Defined here, where the families validate layers; ``elm.space`` re-exports it."""


@dataclass(frozen=True)
class BlockFamily:
    """One block family of the search space.

    Attributes:
        name: the ``LayerConfig.block`` / ``space.blocks`` name.
        label, colour: how plots name and colour it.
        bottleneck: the block works at ``bottleneck_size`` behind H -> B and B -> H projections
            (each with a LayerNorm; the residual stays at H). False: it works at the hidden size.
        stacked_ffns: the block may stack ``num_ffn`` FFNs (False: exactly one).
        defaults: its space settings and their defaults, as ``(key, value)`` pairs; a space sets
            them under ``space.families.<name>``. Keys the models read: ``heads`` (stored heads),
            ``head_dim`` (None: ``space.head_dim``), ``num_ffn`` (stacked FFNs; absent: 1) and
            ``bottleneck_size`` (a bottleneck family's width B).
        pca_threshold_field: a ``PCAConfig`` field overriding ``pca.threshold`` for it (None: none).
        activation: its FFN activation, a name of ``elm.modeling.modeling_elm.ACTIVATIONS``; exports
            carry it per family in ``ElmConfig.block_activations``.
        identity: the block is the identity (no attention, no FFN, no parameters): choosing it for a
            layer removes the layer, so the search trades depth for width (see :data:`SKIP`).
        layout: the exported layer's layout (``ElmConfig.block_layouts``, read by the remote code):
            ``post_ln`` (BERT / MobileBERT, ``modeling_elm``) or a name ``<n>`` whose layer is the
            module ``elm.blocks.<n>_layer`` (``layer_parts(config, width, layer)``; standalone but for
            ``modeling_elm``, as it ships in exports): ``llama`` (:mod:`elm.blocks.llama_layer`).

    A family whose blocks are built differently subclasses this and overrides the methods below
    (:meth:`share_modes`, :meth:`parameters`, :meth:`candidate`, ...): ``elm.blocks.llama`` does.
    """

    name: str
    label: str
    colour: str
    bottleneck: bool
    stacked_ffns: bool
    defaults: tuple[tuple[str, Any], ...] = ()
    pca_threshold_field: str | None = None
    activation: str = "gelu"
    identity: bool = False
    layout: str = "post_ln"

    # ---- the space's settings for this family ---------------------------------------------
    def settings(self, space: Any) -> dict[str, Any]:
        """Its settings in ``space``: ``space.families[name]`` over :attr:`defaults` (an unknown key is
        an error naming the valid ones)."""
        own, given = dict(self.defaults), dict((getattr(space, "families", None) or {}).get(self.name) or {})
        unknown = sorted(set(given) - set(own))
        if unknown:
            raise ArchError(f"space.families.{self.name} has unknown key(s) {unknown}; valid: {sorted(own) or 'none'}")
        return {**own, **given}

    def check_settings(self, space: Any) -> None:
        """Every setting a positive integer (``head_dim`` may be None: the space's)."""
        for key, value in self.settings(space).items():
            if value is None and key == "head_dim":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ArchError(f"space.families.{self.name}.{key} must be a positive integer, got {value!r}")

    def heads(self, space: Any) -> int:
        return 0 if self.identity else self.settings(space)["heads"]

    def head_dim(self, space: Any) -> int:
        return 0 if self.identity else (self.settings(space).get("head_dim") or space.head_dim)

    def num_ffn(self, space: Any) -> int:
        return 0 if self.identity else self.settings(space).get("num_ffn", 1)

    def bottleneck_size(self, space: Any) -> int | None:
        return self.settings(space)["bottleneck_size"] if self.bottleneck else None

    def shares(self, space: Any) -> list[str]:
        """The sharing modes its candidates take in ``space``: the space's ``shares`` (an identity
        block has no attention)."""
        return ["none"] if self.identity else list(space.shares)

    def share_modes(self) -> tuple[str, ...]:
        """The sharing modes a layer of this family may have (``LayerConfig.share``)."""
        return ("none",) if self.identity else SHARE_MODES

    def head_step(self, share: str) -> int:  # noqa: ARG002 (a family with head groups reads it)
        """Heads a layer of this family gains or loses at a time (1; grouped-query attention: the group)."""
        return 1

    def check_share(self, share: Any, where: str) -> None:
        if share not in self.share_modes():
            raise ArchError(f"{where}.share={share!r} is unknown for block={self.name!r}; valid: "
                            f"{', '.join(self.share_modes())}")  # fmt: skip

    def layer_fields(self, space: Any, share: str) -> dict[str, Any]:
        """``LayerConfig`` fields of this family's candidates in ``space`` (all but heads and FFN width)."""
        return dict(block=self.name, head_dim=self.head_dim(space), share="none" if self.identity else share,
                    num_ffn=self.num_ffn(space), bottleneck_size=self.bottleneck_size(space))  # fmt: skip

    def layer_config_fields(self, space: Any, share: str, num_heads: int, ffn_dim: int) -> dict[str, Any]:
        """All ``LayerConfig`` fields of one of its candidates (an identity block: no heads, no FFN)."""
        if self.identity:
            num_heads = ffn_dim = 0
        return dict(self.layer_fields(space, share), num_heads=num_heads, ffn_dim=ffn_dim)

    def pca_threshold(self, pca: Any) -> float:
        own = getattr(pca, self.pca_threshold_field) if self.pca_threshold_field else None
        return own or pca.threshold

    # ---- a layer of this family --------------------------------------------------------------
    def width(self, layer: Any, hidden_size: int) -> int:
        """Width the attention and FFNs work at (B behind a bottleneck, else H)."""
        return layer.bottleneck_size if self.bottleneck else hidden_size

    def validate(self, layer: Any, where: str) -> None:
        if self.identity:
            for name in ("num_heads", "head_dim", "ffn_dim", "num_ffn"):
                if getattr(layer, name) != 0:
                    raise ArchError(f"{where}.{name}={getattr(layer, name)!r}: a {self.name!r} block has none (0)")
            if layer.share != "none" or layer.bottleneck_size is not None:
                raise ArchError(f"{where}: a {self.name!r} block has share='none' and no bottleneck_size")
            return
        if self.bottleneck and layer.bottleneck_size is None:
            raise ArchError(f"{where}.bottleneck_size is required for block={self.name!r}")
        if not self.bottleneck and layer.bottleneck_size is not None:
            with_one = " or ".join(f"block={n!r}" for n, f in BLOCKS.items() if f.bottleneck)
            raise ArchError(f"{where}.bottleneck_size={layer.bottleneck_size} is only valid for {with_one}")
        if not self.stacked_ffns and layer.num_ffn != 1:
            raise ArchError(f"{where}.num_ffn={layer.num_ffn}: a {self.name!r} block has exactly 1 FFN")

    def parameters(self, layer: Any, hidden_size: int) -> int:
        """Exact parameter count of one layer of this family, from its description alone."""
        if self.identity:
            return 0
        w, h, a = self.width(layer, hidden_size), hidden_size, layer.num_heads * layer.head_dim
        projections = 3 if layer.share == "none" else 2  # Q=V or K=V: one projection serves two roles
        n = projections * (w * a + a) + a * w + w + 2 * w  # Q/K/V, O, LayerNorm
        n += layer.num_ffn * (2 * w * layer.ffn_dim + layer.ffn_dim + w + 2 * w)  # up, down, LayerNorm
        if self.bottleneck:  # H -> B and B -> H projections, each with its LayerNorm
            n += (h * w + w + 2 * w) + (w * h + h + 2 * h)
        return n

    # ---- its elastic candidate in a supernet --------------------------------------------------
    def candidate(self, hidden_size: int, max_heads: int, head_dim: int, share: str, ffn_init: int, ffn_max: int,
                  num_ffn: int = 1, bottleneck_size: int | None = None, dropout: float = 0.1,
                  attention_dropout: float | None = None):  # fmt: skip
        """A supernet candidate of this family (``elm.supernet.elastic``; imported here on use)."""
        from ..supernet.elastic import CandidateBlock, IdentityCandidate

        if self.identity:
            return IdentityCandidate(self.name, hidden_size)
        return CandidateBlock(self.name, hidden_size, max_heads, head_dim, share, ffn_init, ffn_max, num_ffn=num_ffn,
                              bottleneck_size=bottleneck_size, dropout=dropout, attention_dropout=attention_dropout)  # fmt: skip


SHARE_MODES = ("none", "qv", "kv")  # the attention sharing modes of the BERT families [paper]


BERT = BlockFamily("bert", "BERT", "#8ecae6", bottleneck=False, stacked_ffns=False, defaults=(("heads", 8),))
# W-PCA: 4 heads behind a bottleneck (head width: the space's unless set, e.g. 4 x 33 in ELM-Small) and
# stacked FFNs, as in MobileBERT; [project decision] ReLU in MobileBERT FFNs
MOBILEBERT = BlockFamily("mobilebert", "MobileBERT", "#ffb703", bottleneck=True, stacked_ffns=True,
                         defaults=(("heads", 4), ("head_dim", None), ("num_ffn", 2), ("bottleneck_size", 128)),
                         pca_threshold_field="threshold_mobilebert", activation="relu")  # fmt: skip

# [project decision, issue #17] The identity candidate (AutoTinyBERT / DynaBERT search depth too):
# zero parameters, so under a budget the DP can drop a layer and spend its parameters on wider
# ones. Its block-wise score is the loss of passing the teacher's state on unchanged. A chosen
# architecture lists only the other layers, so the exported model simply has fewer layers, and
# each kept layer keeps the teacher state it was distilled towards (Supernet.kept_boundaries).
SKIP = BlockFamily("skip", "skip", "#d9d9d9", bottleneck=False, stacked_ffns=False, identity=True)

from .llama import LLAMA  # noqa: E402 (a family subclass: needs BlockFamily above)

BLOCKS: dict[str, BlockFamily] = {f.name: f for f in (BERT, MOBILEBERT, SKIP, LLAMA)}
DEFAULT_BLOCKS = (BERT.name, MOBILEBERT.name)  # SpaceConfig.blocks when none are given
# space settings that were flat ``SpaceConfig`` fields before they moved under ``space.families``:
# states and run dirs written then still load (``SpaceConfig.from_dict``)
FLAT_SPACE_FIELDS = {"bert_heads": ("bert", "heads"), "mobilebert_heads": ("mobilebert", "heads"),
                     "mobilebert_head_dim": ("mobilebert", "head_dim"), "bottleneck_size": ("mobilebert", "bottleneck_size"),
                     "mobilebert_num_ffn": ("mobilebert", "num_ffn")}  # fmt: skip


def register(new: BlockFamily) -> BlockFamily:
    """Add a family to the registry (its name must be new, its activation one the models know)."""
    if new.name in BLOCKS:
        raise ArchError(f"block family {new.name!r} is already registered")
    from ..modeling.modeling_elm import ACTIVATIONS  # here: this package imports nothing of elm at load

    if new.activation not in ACTIVATIONS:
        raise ArchError(f"block family {new.name!r} has activation={new.activation!r}; valid: {', '.join(ACTIVATIONS)}")
    BLOCKS[new.name] = new
    return new


def family(name: str) -> BlockFamily:
    """The registered family called ``name`` (a clear error naming the valid ones otherwise)."""
    try:
        return BLOCKS[name]
    except (KeyError, TypeError):
        raise ArchError(f"block {name!r} is unknown; valid: {', '.join(BLOCKS)}") from None
