"""Tied tails: encodings whose far offsets share one parameter (T5 past max_distance, a clipped
OffsetBias) say so (``PositionEncoding.tied_from``), and the Triton backend takes that run's
gradient from the other columns' (each row's ∂L/∂score sums to zero) instead of walking its
tiles: no table gradient in dk/dv, the band kernel over the untied diagonals only, no atomics.
Checked against float64 math for the parameters' gradients, in Triton's interpreter on CPU.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from oracle import assert_close_f64, run_math, run_relattn  # noqa: E402

import relattn  # noqa: E402
from relattn.backends import triton_backend  # noqa: E402
from relattn.call import tied_offset  # noqa: E402
from relattn.pe import ALiBi, Kerple, OffsetBias, T5Bias  # noqa: E402
from relattn.pe.base import offsets  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(
    "enc",
    [
        T5Bias(2),
        T5Bias(2, num_buckets=8, max_distance=20),
        T5Bias(2, bidirectional=True),
        OffsetBias(2, max_offset=9),
        OffsetBias(2, max_offset=9, bidirectional=True),
        OffsetBias(2, max_offset=0),
    ],
    ids=["t5", "t5_small", "t5_bidir", "offset", "offset_bidir", "offset_0"],
)
@pytest.mark.parametrize("lo, hi", [(0, 300), (0, 30), (-40, 200), (150, 400), (5, 6)])
def test_tied_from_is_the_run_of_one_parameter(enc, lo, hi):
    """The returned offset starts the longest run at ``hi`` whose columns index one parameter,
    brute force from the encoding's own index; None when that run is one column."""
    index = enc.buckets(offsets(lo, hi)) if isinstance(enc, T5Bias) else enc.index(offsets(lo, hi))
    t = lo + len(index) - 1
    while t > lo and index[t - 1 - lo] == index[-1]:
        t -= 1
    want = t if t < hi else None
    assert enc.tied_from(lo, hi) == want
    # and the table agrees: every tied column holds the same value in each head
    if want is not None:
        table = enc.table(lo, hi)
        assert (table[:, want - lo :] == table[:, -1:]).all()


def test_tied_offset_of_several_encodings():
    t5, off = T5Bias(2), OffsetBias(2, max_offset=9)
    assert tied_offset([t5], 0, 300) == 113
    assert tied_offset([t5, off], 0, 300) == 113  # the later run: both tied from there
    assert tied_offset([t5, ALiBi(2)], 0, 300) == 113  # fixed ALiBi: no gradient to read
    assert tied_offset([t5, ALiBi(2, learnable=True)], 0, 300) is None
    assert tied_offset([Kerple(2, "log")], 0, 300) is None
    frozen = T5Bias(2).requires_grad_(False)
    assert tied_offset([frozen], 0, 300) is None  # nothing needs a gradient

    class Bad(T5Bias):
        def tied_from(self, lo, hi):
            return hi + 1

    with pytest.raises(ValueError, match=r"pe Bad.tied_from\(0, 300\) must return None or an int"):
        tied_offset([Bad(2)], 0, 300)


@pytest.fixture
def spy_tied(monkeypatch):
    """The tied offsets the backend's backward used (one entry per backward with a table)."""
    seen: list[int] = []
    real = triton_backend._table_grad_tied

    def spy(K, a, grads, tied):
        seen.append(tied)
        return real(K, a, grads, tied)

    monkeypatch.setattr(triton_backend, "_table_grad_tied", spy)
    return seen


# name: (encoding, (B, Hq, Hkv, Nq, Nk, D), kwargs, the tied offset the call sees)
CASES = {
    "t5_long": (lambda: T5Bias(2, num_buckets=8, max_distance=20), (1, 2, 1, 70, 70, 16), {}, 14),
    "t5_gqa_q_offset": (
        lambda: T5Bias(4, num_buckets=8, max_distance=20),
        (2, 4, 2, 20, 60, 16),
        {"q_offset": 40},
        14,
    ),
    "offset_window": (
        lambda: OffsetBias(2, max_offset=9),
        (1, 2, 2, 45, 45, 16),
        {"window": 30},
        9,
    ),
    "offset_bidir": (
        lambda: OffsetBias(2, max_offset=6, bidirectional=True),
        (1, 2, 2, 33, 40, 16),
        {"causal": False, "q_offset": 4},
        6,
    ),
    "offset_docs_padding": (
        lambda: OffsetBias(2, max_offset=5),
        (2, 2, 2, 40, 40, 16),
        {"doc_ids": "docs", "key_padding_mask": "pad"},
        5,
    ),
    "all_tied": (lambda: OffsetBias(2, max_offset=0), (1, 2, 2, 30, 30, 16), {}, 0),
}


def _case(name):
    make, (b, hq, hkv, nq, nk, d), kw, tied = CASES[name]
    g = torch.Generator().manual_seed(len(name))
    enc = make()
    with torch.no_grad():
        for p in enc.parameters():
            p.normal_(generator=g)
    if kw.get("doc_ids") == "docs":
        docs = torch.zeros(b, nk, dtype=torch.long)
        docs[:, nk // 3 :] = 1
        pad = torch.ones(b, nk, dtype=torch.bool)
        pad[0, -6:] = False
        kw = {**kw, "doc_ids": docs, "key_padding_mask": pad}
    q = torch.randn(b, hq, nq, d, generator=g)
    k = torch.randn(b, hkv, nk, d, generator=g)
    v = torch.randn(b, hkv, nk, d, generator=g)
    grad_out = torch.randn(b, hq, nq, d, generator=g)
    return q, k, v, enc, grad_out, kw, tied


@pytest.mark.parametrize("name", list(CASES))
def test_tied_tail_gradient_matches_float64(name, spy_tied):
    q, k, v, enc, grad_out, kw, tied = _case(name)
    got = run_relattn(q, k, v, enc, grad_out, "triton", device=DEVICE, **kw)
    got = {n: t.detach().cpu() for n, t in got.items()}
    assert spy_tied == [tied], "the tied path did not run"
    truth = run_math(q, k, v, enc, grad_out, torch.float64, **kw)
    assert_close_f64(got, truth, label=f"triton tied {name}: ")


def test_tied_path_is_deterministic_without_deterministic_mode(spy_tied):
    """No atomics on the tied path: two runs give the same bits."""
    q, k, v, enc, grad_out, kw, _ = _case("t5_gqa_q_offset")
    runs = [run_relattn(q, k, v, enc, grad_out, "triton", device=DEVICE, **kw) for _ in range(2)]
    assert len(spy_tied) == 2
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name


def test_equal_columns_without_the_promise_keep_their_own_gradients(spy_tied):
    """A table whose tail is equal by value but not one parameter (a custom encoding that
    promises nothing) still gets every column's own gradient."""

    class Free(relattn.pe.PositionEncoding):
        def __init__(self):
            super().__init__(2)
            self.weight = torch.nn.Parameter(torch.zeros(2, 40))  # equal columns, free params

        def table(self, lo, hi):
            return self.weight[:, lo : hi + 1]

    g = torch.Generator().manual_seed(3)
    q, k, v, grad_out = (torch.randn(1, 2, 40, 16, generator=g) for _ in range(4))
    enc = Free()
    got = run_relattn(q, k, v, enc, grad_out, "triton", device=DEVICE)
    assert spy_tied == []
    # the reference backend in float64 (plain autograd) is the truth for a custom table
    import copy

    wide = [t.double() for t in (q, k, v, grad_out)]
    truth = run_relattn(*wide[:3], copy.deepcopy(enc).double(), wide[3], "reference")
    assert_close_f64({n: t.detach().cpu() for n, t in got.items()}, truth, label="free: ")


def test_prepared_call_carries_the_tied_offset(monkeypatch):
    """prepare() gives the tied offset to a backend that reads it, when a gradient is needed,
    outside torch.compile (finding the run reads index values); None otherwise."""
    from relattn.call import prepare

    q, k, v = (torch.randn(1, 2, 40, 16, device=DEVICE) for _ in range(3))
    pe = OffsetBias(2, max_offset=9).to(DEVICE)
    assert prepare(q, k, v, pe, backend="triton").tied == 9
    assert prepare(q, k, v, pe, backend="reference").tied is None  # reads no tied runs
    with torch.no_grad():
        assert prepare(q, k, v, pe, backend="triton").tied is None
    monkeypatch.setattr(relattn.call, "_compiling", lambda: True)
    assert prepare(q, k, v, pe, backend="triton").tied is None


def test_tied_path_only_where_it_walks_few_diagonals():
    """Causal: the untied columns sit next to the diagonal (a handful of block diagonals);
    bidirectional: the negative offsets cover half of them, and the per-tile atomics of dk/dv
    stay cheaper than walking them again."""
    from types import SimpleNamespace

    K = triton_backend._kernels()
    n = 8192

    def launch(lo, t):
        q = torch.zeros(1, dtype=torch.bfloat16)
        return SimpleNamespace(d=128, q=q, nq=n, nk=n, q_offset=0, lo=lo, t=t)

    causal = launch(0, n)
    assert triton_backend._few_bands(K, causal, 113)
    band_min, walked, total = triton_backend._band_range(
        K, causal, triton_backend._last_untied_band(K, causal, 113)
    )
    assert band_min == 0 and walked <= 9 and total == 2 * (n // 16 if K.INTERPRET else n // 32) - 1
    bidirectional = launch(-(n - 1), 2 * n - 1)
    assert not triton_backend._few_bands(K, bidirectional, 91)
