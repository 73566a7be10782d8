"""Figures of the search (method doc, sections 3-6; the paper's Figs. 2, 3a, 3b, 5).

Every function draws on a fresh :class:`matplotlib.figure.Figure` (no pyplot, no global
state, no display needed), saves one PNG (parent folders are created) and returns its path.
NaN values are skipped; an input with nothing to draw gives a figure that says "no data".

* :func:`plot_pca_curves` - PCA score per candidate block per epoch, growth events marked.
* :func:`plot_cka_heatmap` - head-head linear CKA of one block, pruned heads marked.
* :func:`plot_diversity` - mean pairwise cosine similarity of candidates per layer, per loss.
* :func:`plot_architecture` - the chosen model, one box per layer, width ~ parameters.
* :func:`plot_pareto` - validation distillation loss vs parameters, chosen points labelled.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from elm.blocks import BLOCKS
from elm.space.arch import ArchConfig

DPI = 120
_LABEL_BOX = {"boxstyle": "round,pad=0.15", "facecolor": "white", "alpha": 0.7, "linewidth": 0}
_GROWTH_LABEL = {"textcoords": "offset points", "fontsize": 7, "bbox": _LABEL_BOX}
_KEY = re.compile(r"^L(\d+)\.(\w+)(?:\.(\w+))?$")  # L{layer}.{block}[.{share}]
_SHARE_STYLE = {"none": "-", "qv": "--", "kv": ":"}


def _finite(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def save_figure(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def _no_data(path: str | Path, title: str) -> Path:
    fig = Figure(figsize=(5, 3.5), layout="constrained")
    ax = fig.add_subplot()
    ax.text(0.5, 0.5, "no data", ha="center", va="center", fontsize=16, color="0.4")
    ax.set(title=title, xticks=[], yticks=[])
    return save_figure(fig, path)


def plot_pca_curves(history: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Fig. 2: PCA score of every candidate block per epoch, BERT and MobileBERT side by side.

    ``history`` holds one record per epoch: ``{"epoch": int, "pca": {"L0.bert": float, ...},
    "ffn": {"L0.bert": int, ...}}``. One line per layer (colour = layer); an epoch at which a
    block's FFN width grew from the previous record is marked with a triangle labelled with
    the new width.
    """
    title = "PCA score per candidate block"
    # series[block][(layer, share)] = list of (epoch, score, ffn width or None)
    series: dict[str, dict[tuple[int, str], list[tuple[float, float, int | None]]]] = {}
    for i, record in enumerate(history):
        epoch = record.get("epoch", i)
        ffn = record.get("ffn") or {}
        for key, score in (record.get("pca") or {}).items():
            match = _KEY.match(str(key))
            if match is None or not _finite(score) or not _finite(epoch):
                continue
            width = ffn.get(key)
            point = (float(epoch), float(score), int(width) if _finite(width) else None)
            line = (int(match.group(1)), match.group(3) or "none")
            series.setdefault(match.group(2), {}).setdefault(line, []).append(point)
    if not series:
        return _no_data(path, title)
    blocks = [*(b for b in BLOCKS if b in series), *sorted(set(series) - set(BLOCKS))]
    num_layers = 1 + max(layer for per_layer in series.values() for layer, _ in per_layer)
    shares = sorted({share for per_layer in series.values() for _, share in per_layer})
    epochs = [p[0] for per_layer in series.values() for pts in per_layer.values() for p in pts]
    any_growth = False
    cmap = colormaps["viridis"]
    fig = Figure(figsize=(6 * len(blocks), 4.8), layout="constrained")
    axes = fig.subplots(1, len(blocks), sharex=True, sharey=True, squeeze=False)[0]
    axes[0].set_xlim(min(epochs) - 0.3, max(epochs) + 0.3)
    for ax, block in zip(axes, blocks):
        ax.set(title=f"{_label(block)} blocks", xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)
        per_layer = series.get(block, {})
        if not per_layer:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="0.4")
            continue
        for layer, share in sorted(per_layer):
            points = sorted(per_layer[(layer, share)], key=lambda p: p[0])
            colour = cmap(layer / max(num_layers - 1, 1) * 0.9)
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            style = _SHARE_STYLE.get(share, "-.")
            ax.plot(xs, ys, style, marker="o", color=colour, markersize=3.5, label=f"layer {layer}")
            grown = [c for p, c in zip(points, points[1:]) if None not in (p[2], c[2]) and c[2] > p[2]]
            any_growth = any_growth or bool(grown)
            for x, y, width in grown:
                ax.plot(x, y, "^", color=colour, markersize=10, markeredgecolor="black")
                ax.annotate(str(width), (x, y), xytext=(0, 8), ha="center", **_GROWTH_LABEL)
        ax.margins(y=0.08)
    axes[0].set_ylabel("PCA score")
    # colours mean the same layer in every panel: one shared legend below the panels
    by_label = {label: h for ax in axes for h, label in zip(*ax.get_legend_handles_labels())}
    by_label = dict(sorted(by_label.items(), key=lambda item: int(item[0].split()[-1])))
    if len(shares) > 1:  # line style = attention sharing mode
        for share in shares:
            by_label[f"share {share}"] = axes[0].plot([], [], _SHARE_STYLE.get(share, "-."), color="0.3")[0]
    if any_growth:
        by_label["FFN grew (new width)"] = axes[0].plot([], [], "^", color="white", mec="black", ms=9)[0]
    fig.legend(by_label.values(), by_label.keys(), loc="outside lower center", ncol=min(len(by_label), 7),
               fontsize=8)
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_cka_heatmap(cka: Any, path: str | Path, title: str = "",
                     pruned: Sequence[int] | None = None) -> Path:
    """Fig. 3a: linear CKA between the heads of one block (``cka``: array ``[H, H]``).

    Values are written in the cells when ``H <= 16``; heads in ``pruned`` get red tick labels
    with a cross. NaN cells are drawn grey.
    """
    title = title or "Head-head linear CKA"
    matrix = np.asarray(cka, dtype=float)
    if matrix.ndim != 2:
        raise ValueError(f"cka must be a 2-D [H, H] array, got shape {matrix.shape}")
    if matrix.size == 0 or not np.isfinite(matrix).any():
        return _no_data(path, title)
    rows, cols = matrix.shape
    side = min(2.5 + 0.45 * max(rows, cols), 10)
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.add_subplot()
    cmap = colormaps["viridis"].with_extremes(bad="0.85")
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="linear CKA", shrink=0.85)
    if max(rows, cols) <= 16:
        for (i, j), value in np.ndenumerate(matrix):
            if np.isfinite(value):
                colour = "white" if value < 0.6 else "black"
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color=colour)
    marked = {int(h) for h in (pruned or [])}
    for axis, n, setter in ((ax.xaxis, cols, ax.set_xticks), (ax.yaxis, rows, ax.set_yticks)):
        setter(range(n), [f"{h} ✗" if h in marked else str(h) for h in range(n)])
        for h, label in enumerate(axis.get_ticklabels()):
            if h in marked:
                label.set_color("red")
                label.set_fontweight("bold")
    ax.tick_params(axis="x", labelrotation=90 if cols > 16 else 0)
    ax.set(xlabel="head" + ("   (red ✗ = pruned)" if marked else ""), ylabel="head", title=title)
    return save_figure(fig, path)


def plot_diversity(diversity: Mapping[str, Sequence[float]], path: str | Path) -> Path:
    """Fig. 3b: mean pairwise cosine similarity between candidate blocks' outputs, per layer.

    ``diversity`` maps a loss name ("rkd", "mse", ...) to one value per layer; one bar per
    loss in each layer's group (lower = more diverse candidates). NaN bars are left out.
    """
    title = "Candidate diversity per layer (lower = more diverse)"
    names = [n for n, v in diversity.items() if any(_finite(x) for x in v)]
    if not names:
        return _no_data(path, title)
    num_layers = max(len(diversity[n]) for n in names)
    width = 0.8 / len(names)
    fig_width = min(max(6.0, 1.0 + 0.5 * num_layers * max(len(names), 1.5)), 14.0)
    fig = Figure(figsize=(fig_width, 4.5), layout="constrained")
    ax = fig.add_subplot()
    label_bars = num_layers * len(names) <= 24
    for k, name in enumerate(names):
        layers = [i for i, v in enumerate(diversity[name]) if _finite(v)]
        values = [float(diversity[name][i]) for i in layers]
        offsets = np.asarray(layers, dtype=float) + (k - (len(names) - 1) / 2) * width
        bars = ax.bar(offsets, values, width, label=name.upper(), edgecolor="black", linewidth=0.5)
        if label_bars:
            ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
    ax.set_xticks(range(num_layers), [f"L{i}" for i in range(num_layers)])
    ax.set(xlabel="layer", ylabel="mean pairwise cosine similarity", title=title)
    ax.margins(y=0.12)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(title="distillation loss")
    return save_figure(fig, path)


def _label(block: str) -> str:
    """A block family's plot label (``elm.blocks``); an unregistered name as it is."""
    return BLOCKS[block].label if block in BLOCKS else block


def _colour(block: str) -> str:
    return BLOCKS[block].colour if block in BLOCKS else "0.8"


def _layer_text(layer: Any) -> str:
    parts = [_label(layer.block), f"{layer.num_heads}×{layer.head_dim} heads"]
    ffn = f"FFN {layer.ffn_dim}"
    if layer.block in BLOCKS and BLOCKS[layer.block].stacked_ffns:
        ffn += f"×{layer.num_ffn}"
    parts.append(ffn)
    if layer.bottleneck_size is not None:
        parts.append(f"bottleneck {layer.bottleneck_size}")
    parts.append(f"share {layer.share}")
    return "  |  ".join(parts)


def plot_architecture(arch: ArchConfig, path: str | Path, title: str = "") -> Path:
    """Fig. 5: the chosen model, one box per layer (layer 0 at the bottom).

    A box's length is the layer's parameter count, its colour the block type; its text gives
    heads x head_dim, FFN width (x number of FFNs for MobileBERT), bottleneck and sharing.
    """
    base = title or "Searched architecture"
    if not arch.layers:
        return _no_data(path, base)
    params = [layer.num_parameters(arch.hidden_size) / 1e6 for layer in arch.layers]
    n = len(arch.layers)
    fig = Figure(figsize=(10, 1.4 + 0.42 * n), layout="constrained")
    ax = fig.add_subplot()
    colours = [_colour(layer.block) for layer in arch.layers]
    ax.barh(range(n), params, height=0.8, color=colours, edgecolor="black", linewidth=0.7)
    for i, (layer, p) in enumerate(zip(arch.layers, params)):
        text = f"{_layer_text(layer)}  ({p:.2f}M)"
        ax.text(max(params) * 0.01, i, text, va="center", fontsize=8, bbox=_LABEL_BOX)
    ax.set_yticks(range(n), [f"L{i}" for i in range(n)])
    ax.set(ylim=(-0.6, n - 0.4), xlim=(0, max(params) * 1.05), xlabel="layer parameters (M)", ylabel="layer")
    total = arch.num_parameters() / 1e6
    ax.set_title(f"{base}: {total:.2f}M params (hidden {arch.hidden_size}, layers {sum(params):.2f}M)")
    used = dict.fromkeys(layer.block for layer in arch.layers)
    handles = [Patch(facecolor=_colour(b), edgecolor="black", label=_label(b)) for b in used]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles))
    return save_figure(fig, path)


def _params_m(point: Mapping[str, Any]) -> float:
    if "params_m" in point:
        return float(point["params_m"])
    return float(point.get("params", float("nan"))) / 1e6


def plot_pareto(points: Sequence[Mapping[str, Any]], chosen: Sequence[Mapping[str, Any]],
                path: str | Path) -> Path:
    """Pareto front of validation distillation loss (lower = better) vs parameters.

    Each point is ``{"params": int (count), "score": float}`` (or ``"params_m"`` in millions);
    ``chosen`` points are highlighted and labelled with their ``"name"`` (budget name).
    """
    title = "Pareto front: score vs parameters"
    def usable(ps: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        return [p for p in ps if _finite(_params_m(p)) and _finite(p.get("score"))]

    front = sorted((_params_m(p), float(p["score"])) for p in usable(points))
    picks = [(_params_m(p), float(p["score"]), str(p.get("name", p.get("budget", ""))))
             for p in usable(chosen)]
    if not front and not picks:
        return _no_data(path, title)
    fig = Figure(figsize=(7, 4.8), layout="constrained")
    ax = fig.add_subplot()
    if front:
        # steps-post: the best score reachable within a parameter budget x
        ax.plot(*zip(*front), "-o", color="tab:blue", ms=4, drawstyle="steps-post", label="Pareto front")
    for k, (x, y, name) in enumerate(picks):
        ax.plot(x, y, "*", color="tab:red", ms=15, mec="black", label="chosen" if k == 0 else None, zorder=3)
        ax.annotate(name, (x, y), xytext=(8, 8), textcoords="offset points", fontweight="bold",
                    color="tab:red")
    ax.set(xlabel="parameters (M)", ylabel="validation distillation loss (lower = better)", title=title)
    ax.grid(alpha=0.3)
    ax.margins(0.08)
    ax.legend()
    return save_figure(fig, path)
