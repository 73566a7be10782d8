"""Every figure of ``elm.search.plots`` writes a readable, non-blank PNG (realistic, empty, NaN)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from elm.search import plots
from elm.space.arch import ArchConfig, LayerConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path, min_colours: int = 20) -> None:
    path = Path(path)
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    packed = (image[..., :3] * 255).astype(np.uint32) @ np.array([1 << 16, 1 << 8, 1], dtype=np.uint32)
    colours = np.unique(packed)
    assert len(colours) >= min_colours, f"{path.name} looks blank ({len(colours)} colours)"


def pca_history(epochs: int = 4) -> list[dict]:
    """3 layers x 2 blocks, PCA-like dynamics: score = used dims / width, the top 2 grow by 132."""
    used = {"L0.bert": 120, "L1.bert": 100, "L2.bert": 126, "L0.mobilebert": 110, "L1.mobilebert": 128}
    used["L2.mobilebert"] = 90
    ffn = dict.fromkeys(used, 132)
    history = []
    for epoch in range(epochs):
        pca = {key: round(min(1.0, k * (1 + 0.25 * epoch) / ffn[key]), 3) for key, k in used.items()}
        history.append({"epoch": epoch, "pca": pca, "ffn": dict(ffn)})
        for key in sorted(pca, key=pca.get)[-2:]:
            ffn[key] += 132
    return history


def small_arch() -> ArchConfig:
    return ArchConfig(
        hidden_size=528,
        layers=[
            LayerConfig("bert", num_heads=12, head_dim=44, ffn_dim=528),
            LayerConfig(
                "mobilebert",
                num_heads=4,
                head_dim=33,
                ffn_dim=264,
                num_ffn=4,
                bottleneck_size=132,
                share="qv",
            ),
            LayerConfig("bert", num_heads=8, head_dim=44, ffn_dim=792, share="kv"),
        ],
    ).validate()


def cka_matrix(heads: int = 6) -> np.ndarray:
    rng = np.random.default_rng(0)
    m = rng.uniform(0.1, 0.7, size=(heads, heads))
    m = (m + m.T) / 2
    m[1, 4] = m[4, 1] = 0.95
    np.fill_diagonal(m, 1.0)
    return m


def pareto_points() -> tuple[list[dict], list[dict]]:
    points = [
        {"params": p, "score": s} for p, s in [(4e6, 3.1), (6e6, 2.6), (9e6, 2.2), (12e6, 2.0), (16e6, 1.9)]
    ]
    chosen = [{"params": 6e6, "score": 2.6, "name": "micro"}, {"params": 12e6, "score": 2.0, "name": "tiny"}]
    return points, chosen


def realistic_cases(out: Path) -> list[Path]:
    points, chosen = pareto_points()
    return [
        plots.plot_pca_curves(pca_history(), out / "pca_curves.png"),
        plots.plot_cka_heatmap(cka_matrix(), out / "cka.png", title="Layer 2 heads", pruned=[4]),
        plots.plot_diversity({"rkd": [0.31, 0.42, 0.38], "mse": [0.71, 0.83, 0.79]}, out / "diversity.png"),
        plots.plot_architecture(small_arch(), out / "arch.png", title="ELM-Tiny"),
        plots.plot_pareto(points, chosen, out / "pareto.png"),
    ]


def test_realistic_inputs(tmp_path: Path) -> None:
    paths = realistic_cases(tmp_path / "nested")
    assert len({p.name for p in paths}) == 5
    for path in paths:
        assert_png(path)


def test_empty_inputs_say_no_data(tmp_path: Path) -> None:
    cases = [
        plots.plot_pca_curves([], tmp_path / "a.png"),
        plots.plot_cka_heatmap(np.zeros((0, 0)), tmp_path / "b.png"),
        plots.plot_diversity({}, tmp_path / "c.png"),
        plots.plot_architecture(ArchConfig(layers=[]), tmp_path / "d.png"),
        plots.plot_pareto([], [], tmp_path / "e.png"),
    ]
    for path in cases:
        assert_png(path, min_colours=5)


def test_nan_values_are_skipped(tmp_path: Path) -> None:
    nan = math.nan
    history = pca_history()
    history[1]["pca"]["L0.bert"] = nan
    history[2]["pca"]["L2.mobilebert"] = nan
    cka = cka_matrix()
    cka[0, 2] = cka[2, 0] = nan
    points, chosen = pareto_points()
    points.append({"params": 7e6, "score": nan})
    chosen.append({"params": nan, "score": 1.0, "name": "bad"})
    cases = [
        plots.plot_pca_curves(history, tmp_path / "a.png"),
        plots.plot_cka_heatmap(cka, tmp_path / "b.png", pruned=[1]),
        plots.plot_diversity({"rkd": [0.3, nan, 0.4], "mse": [nan, nan, nan]}, tmp_path / "c.png"),
        plots.plot_pareto(points, chosen, tmp_path / "d.png"),
        plots.plot_pca_curves([{"epoch": 0, "pca": {"L0.bert": nan}, "ffn": {}}], tmp_path / "e.png"),
        plots.plot_cka_heatmap(np.full((3, 3), nan), tmp_path / "f.png"),
    ]
    for path in cases:
        assert_png(path, min_colours=5)


def test_single_epoch_and_single_loss(tmp_path: Path) -> None:
    assert_png(plots.plot_pca_curves(pca_history(epochs=1), tmp_path / "one_epoch.png"))
    assert_png(plots.plot_diversity({"rkd": [0.3, 0.5]}, tmp_path / "one_loss.png"))


def test_cka_rejects_non_matrix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="2-D"):
        plots.plot_cka_heatmap(np.zeros(4), tmp_path / "x.png")


if __name__ == "__main__":  # render the realistic examples for a visual check
    for p in realistic_cases(Path("/tmp/elm_plots")):
        print(p)
