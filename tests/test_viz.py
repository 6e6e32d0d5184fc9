"""Plot helpers: they write PNGs, and say which extra to install when matplotlib is missing."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from relattn import viz
from relattn.pe import T5Bias

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TOKENS = ["The", "quick", "brown", "fox"]


def _inputs(heads: int = 2):
    n = len(TOKENS)
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    pe = torch.randn(heads, n, n)
    scores = torch.randn(heads, n, n).masked_fill(~mask, float("-inf"))
    return mask, pe, torch.softmax(scores, -1)


@pytest.mark.parametrize("with_pe", [True, False])
def test_plot_explain_writes_png(tmp_path, with_pe):
    mask, pe, weights = _inputs()
    path = tmp_path / "explain.png"
    viz.plot_explain(TOKENS, mask, pe if with_pe else None, weights, path, title="test")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_plot_explain_accepts_lists_and_checks_shapes(tmp_path):
    mask, pe, weights = _inputs(heads=1)
    viz.plot_explain(TOKENS, mask.tolist(), pe.tolist(), weights.tolist(), tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="weights"):
        viz.plot_explain(TOKENS[:3], mask, pe, weights, tmp_path / "b.png")


@pytest.mark.parametrize("with_buckets", [True, False])
def test_plot_table_writes_png(tmp_path, with_buckets):
    t5 = T5Bias(3, 32, 128)
    offsets = torch.arange(0, 150)
    buckets = t5.buckets(offsets) if with_buckets else None
    path = tmp_path / "table.png"
    viz.plot_table(t5.table(0, 149), offsets, path, buckets, title="t5")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_unwritable_path_raises_oserror(tmp_path):
    mask, pe, weights = _inputs()
    with pytest.raises(OSError):
        viz.plot_explain(TOKENS, mask, pe, weights, tmp_path / "missing" / "x.png")


def test_missing_matplotlib_names_the_plot_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    mask, pe, weights = _inputs()
    with pytest.raises(viz.PlotUnavailable, match=r"pip install relattn\[plot\]"):
        viz.plot_explain(TOKENS, mask, pe, weights, tmp_path / "x.png")
    with pytest.raises(ImportError, match=r"relattn\[plot\]"):
        viz.plot_table([[0.0, 1.0]], [0, 1], tmp_path / "y.png")
    assert not (tmp_path / "x.png").exists()


def test_masked_cells_are_distinct_from_zero_weight_on_a_linear_scale():
    """The heatmaps' colour scale is linear from 0 to 1, and a masked cell's colour is one no
    weight can take."""
    import matplotlib as mpl
    from matplotlib.colors import Normalize, to_rgba
    from matplotlib.figure import Figure

    ax = Figure().add_subplot()
    values = [[0.0, float("nan")], [0.25, 0.75]]
    image = viz._heatmap(ax, np.array(values), "Blues", 0.0, 1.0)
    assert type(image.norm) is Normalize and (image.norm.vmin, image.norm.vmax) == (0.0, 1.0)
    masked = to_rgba(viz.MASKED)
    assert image.cmap.get_bad() == pytest.approx(masked)
    cmap = mpl.colormaps["Blues"]
    distances = [np.abs(np.array(cmap(x)) - masked).max() for x in np.linspace(0, 1, 257)]
    assert min(distances) > 0.05


def test_demo_figures_write_pngs(tmp_path):
    evals = {
        "a": [{"length": 8, "ppl": 3.0}, {"length": 16, "ppl": 3.5}],
        "b+c": [{"length": 8, "ppl": 2.0}, {"length": 16, "ppl": 2.2}],
    }
    viz.plot_perplexity(evals, 8, tmp_path / "p.png")
    viz.plot_loss({"a": [[0, 5.0], [10, 3.0]], "b+c": [[0, 5.5], [10, 2.5]]}, tmp_path / "l.png")
    weights = torch.softmax(
        torch.randn(2, 3, 5, 5).masked_fill(
            torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf")
        ),
        -1,
    )
    viz.plot_attention_heads(list("abcde"), weights, tmp_path / "a.png", title="t")
    assert viz.plot_learned_tables({}, 8, tmp_path / "none.png") is None
    viz.plot_learned_tables({"a": [np.random.rand(2, 20)]}, 8, tmp_path / "t.png")
    for name in ("p", "l", "a", "t"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="weights"):
        viz.plot_attention_heads(list("abc"), weights, tmp_path / "x.png")


def test_explain_figure_labels_its_heads(tmp_path):
    mask, pe, weights = _inputs(heads=2)
    viz.plot_explain(TOKENS, mask, pe, weights, tmp_path / "h.png", heads=[3, 5])
    assert (tmp_path / "h.png").read_bytes()[:8] == PNG_MAGIC


def test_the_mask_panel_draws_masked_cells_as_the_other_panels_do(monkeypatch, tmp_path):
    """Masked cells are hatched grey in every panel, the mask's too (it once drew the visible
    cells grey and the masked ones white, the other way round from the PE and weight panels)."""
    from matplotlib.colors import to_rgba

    figures = []
    make = viz._figure

    def keep(*args, **kwargs):
        figures.append(make(*args, **kwargs))
        return figures[-1]

    monkeypatch.setattr(viz, "_figure", keep)
    mask, pe, weights = _inputs(heads=1)
    viz.plot_explain(TOKENS, mask, pe, weights, tmp_path / "m.png")
    mask_ax, pe_ax = figures[0].axes[:2]
    assert mask_ax.get_title().startswith("causal mask")
    n = len(TOKENS)
    for ax in (mask_ax, pe_ax):
        image = ax.images[0]
        rgba = image.to_rgba(image.get_array())
        for i in range(n):
            for j in range(n):
                is_grey = np.allclose(rgba[i, j], to_rgba(viz.MASKED), atol=1 / 255)
                assert is_grey == (j > i), (ax.get_title(), i, j, rgba[i, j])
        hatched = sorted((p.get_x(), p.get_y(), p.get_width()) for p in ax.patches if p.get_hatch())
        assert hatched == [(i + 0.5, i - 0.5, n - 1 - i) for i in range(n - 1)], ax.get_title()
    visible = mask_ax.images[0].to_rgba(mask_ax.images[0].get_array())[n - 1, 0]
    assert np.allclose(visible, to_rgba("white"), atol=1 / 255)


@pytest.mark.parametrize(
    "x, fmt, text",
    [
        (-0.004, "+.2f", "-0.004"),  # once "+0.00": a negative PE printed as positive
        (-0.0004, "+.3f", "-0.0004"),
        (-1e-12, "+.2f", "-0.00"),  # too small for three more digits: the sign stays right
        (0.004, ".2f", "0.004"),
        (0.0, "+.3f", "+0.000"),
        (-0.0, "+.3f", "+0.000"),  # an exact zero is never "-0.000"
        (-0.25, "+.2f", "-0.25"),
        (0.125, "+.3f", "+0.125"),
    ],
)
def test_numbers_keep_their_sign(x, fmt, text):
    from relattn.cli.explain.render import _num

    assert viz.format_number(x, fmt) == text
    assert _num(x, fmt) == text
