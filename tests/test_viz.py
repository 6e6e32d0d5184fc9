"""Plot helpers: they write PNGs, and say which extra to install when matplotlib is missing."""

from __future__ import annotations

import sys

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
