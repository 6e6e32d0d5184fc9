"""The formula's promises, one test each, for every backend where the backend matters.

Several tests read the weights α through a backend with one-hot values: with ``v_j = e_j``,
``out_i[j] = Σ_j' α(i, j')·v_j'[j] = α(i, j)``.
"""

from __future__ import annotations

import math

import pytest
import torch
from cases import BACKENDS, ENCODINGS, lay_out, layouts
from hypothesis import given, settings
from hypothesis import strategies as st
from oracle import attention_math, delta_grid, pe_bias, pe_leaves, rope_rotate, visible_mask

import relattn
from relattn.pe import ALiBi, PositionEncoding, RoPE, T5Bias

PROPS = settings(deadline=None, max_examples=10, database=None)


def _randn(g, *shape):
    return torch.randn(*shape, generator=g)


def _case(name: str):
    """The conformance suite's encoding ``name`` (tests/cases.py), with fixed random parameters."""
    return lambda h: ENCODINGS[name](h, None, torch.Generator().manual_seed(h))


def _t5(h):
    return _case("t5")(h)


# Additive encodings with a position term that is not constant in Δ.
ADDITIVE = {
    name: _case(name)
    for name in (
        "t5",
        "t5_bidir",
        "alibi",
        "alibi_learnable",
        "kerple_log",
        "kerple_power",
        "offset",
        "offset_bidir",
    )
}


def _pe(name, h, d):
    if name == "none":
        return None
    if name == "rope":
        return RoPE(d)
    torch.manual_seed(0)
    return ADDITIVE[name](h)


def one_hot_values(b, h, nk, d):
    """``v_j = e_j`` (needs ``d >= nk``), so that out_i is row i of the weights."""
    v = torch.zeros(b, h, nk, d)
    v[..., torch.arange(nk), torch.arange(nk)] = 1.0
    return v


# ----------------------------------------------------------------------------- causality


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pe_name", ["none", "t5", "alibi", "rope"])
@PROPS
@given(n=st.integers(2, 40), data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_causality(backend, pe_name, n, data, seed):
    """Changing q, k, v after position i never changes output rows <= i (bit for bit), and the
    gradient of rows <= i reaching later keys and values is exactly zero."""
    i = data.draw(st.integers(0, n - 2), label="i")
    g = torch.Generator().manual_seed(seed)
    b, h, d = 1, 2, 16
    q, k, v = (_randn(g, b, h, n, d) for _ in range(3))
    pe = _pe(pe_name, h, d)
    out = relattn.attention(q, k, v, pe, backend=backend)

    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[:, :, i + 1 :] = _randn(g, b, h, n - i - 1, d) * 10
    out2 = relattn.attention(q2, k2, v2, pe, backend=backend)
    assert torch.equal(out[:, :, : i + 1], out2[:, :, : i + 1])
    assert not torch.equal(out[:, :, i + 1 :], out2[:, :, i + 1 :])

    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = relattn.attention(q, k, v, pe, backend=backend)
    out[:, :, : i + 1].mul(_randn(g, b, h, i + 1, d)).sum().backward()
    assert torch.equal(k.grad[:, :, i + 1 :], torch.zeros_like(k.grad[:, :, i + 1 :]))
    assert torch.equal(v.grad[:, :, i + 1 :], torch.zeros_like(v.grad[:, :, i + 1 :]))
    assert torch.equal(q.grad[:, :, i + 1 :], torch.zeros_like(q.grad[:, :, i + 1 :]))
    assert (v.grad[:, :, : i + 1].abs().sum(-1) > 0).all()


@PROPS
@given(
    n=st.integers(1, 40),
    q_offset=st.integers(0, 5),
    window=st.one_of(st.none(), st.integers(1, 8)),
    seed=st.integers(0, 2**31 - 1),
)
def test_query_i_sees_exactly_i_plus_1_keys(n, q_offset, window, seed):
    """Row r (position i = q_offset + r) has nonzero weight on exactly keys 0 .. i (the last W of
    them with a window): i + 1 dot products, the lower-triangular pattern."""
    g = torch.Generator().manual_seed(seed)
    nk = n + q_offset
    q, k = _randn(g, 1, 2, n, 8), _randn(g, 1, 2, nk, 8)
    w = relattn.attention_weights(q, k, q_offset=q_offset, window=window)
    support = w != 0
    for r in range(n):
        i = q_offset + r
        first = 0 if window is None else max(0, i - window + 1)
        expected = torch.zeros(nk, dtype=torch.bool)
        expected[first : i + 1] = True
        assert torch.equal(support[0, :, r], expected.expand(2, nk)), r
        assert int(support[0, 0, r].sum()) == i + 1 - first


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [None, 3])
def test_each_row_reads_exactly_its_keys(backend, window):
    """Through each backend: the gradient of output row i reaches exactly keys and values
    0 .. i (within the window), so row i used exactly those dot products."""
    n, d = 9, 16
    g = torch.Generator().manual_seed(3)
    q, k, v = (_randn(g, 1, 1, n, d).requires_grad_(True) for _ in range(3))
    for i in range(n):
        out = relattn.attention(q, k, v, backend=backend, window=window)
        dk, dv = torch.autograd.grad((out[0, 0, i] * _randn(g, d)).sum(), [k, v])
        first = 0 if window is None else max(0, i - window + 1)
        expected = torch.zeros(n, dtype=torch.bool)
        expected[first : i + 1] = True
        assert torch.equal(dv[0, 0].abs().sum(-1) != 0, expected), i
        # keys the row does not see get exactly zero gradient
        assert torch.equal(dk[0, 0, ~expected], torch.zeros_like(dk[0, 0, ~expected])), i
        if i + 1 - first > 1:
            assert (dk[0, 0, expected].abs().sum(-1) > 0).all(), i
        else:  # one visible key has weight 1 whatever its score (up to rounding in a backward)
            assert dk.abs().max() < 1e-5, i


# ----------------------------------------------------------------------------- weights


@pytest.mark.parametrize("backend", BACKENDS)
@PROPS
@given(n=st.integers(3, 16), data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_equal_dot_products_equal_weights(backend, n, data, seed):
    """With no PE, two keys with the same q·k get the same weight, whatever their positions."""
    j1 = data.draw(st.integers(0, n - 2), label="j1")
    j2 = data.draw(st.integers(j1 + 1, n - 1), label="j2")
    g = torch.Generator().manual_seed(seed)
    d = 16
    q, k = _randn(g, 1, 1, n, d), _randn(g, 1, 1, n, d)
    qi = q[0, 0, n - 1]
    u = _randn(g, d)
    u = u - (u @ qi) / (qi @ qi) * qi  # orthogonal to q_i: same dot product, different key
    k[0, 0, j2] = k[0, 0, j1] + u
    out = relattn.attention(q, k, one_hot_values(1, 1, n, d), backend=backend)
    w = out[0, 0, n - 1]
    assert torch.allclose(w[j1], w[j2], rtol=1e-5, atol=0), (w[j1], w[j2])


@pytest.mark.parametrize("backend", BACKENDS)
@PROPS
@given(n=st.integers(2, 24), seed=st.integers(0, 2**31 - 1))
def test_permuting_earlier_keys(backend, n, seed):
    """With no PE, permuting the keys a row sees (with their values) leaves its output
    unchanged; with a relative PE it does not."""
    g = torch.Generator().manual_seed(seed)
    d = 16
    q, k, v = (_randn(g, 1, 2, n, d) for _ in range(3))
    perm = torch.randperm(n, generator=g)
    while n > 1 and torch.equal(perm, torch.arange(n)):
        perm = torch.randperm(n, generator=g)
    out = relattn.attention(q, k, v, backend=backend)
    out_p = relattn.attention(q, k[:, :, perm], v[:, :, perm], backend=backend)
    torch.testing.assert_close(out_p[:, :, -1], out[:, :, -1], rtol=1e-5, atol=1e-6)

    pe = ALiBi(2)
    out = relattn.attention(q, k, v, pe, backend=backend)
    out_p = relattn.attention(q, k[:, :, perm], v[:, :, perm], pe, backend=backend)
    assert (out_p[:, :, -1] - out[:, :, -1]).abs().max() > 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pe_name", list(ADDITIVE))
def test_relative_pe_separates_equal_dot_products(backend, pe_name):
    """With every key equal (so every q·k is equal), row i's weights are softmax_j(PE(i - j)):
    equal dot products at different offsets get different weights."""
    n, d, h = 12, 16, 2
    g = torch.Generator().manual_seed(4)
    q = _randn(g, 1, h, n, d)
    k = _randn(g, 1, h, 1, d).expand(1, h, n, d).contiguous()
    pe = _pe(pe_name, h, d)
    out = relattn.attention(q, k, one_hot_values(1, h, n, d), pe, causal=False, backend=backend)
    w = out[0, :, :, :n].double()
    bias = pe_bias(pe, pe_leaves(pe, torch.float64), delta_grid(n, n, 0), torch.float64)
    expected = torch.softmax(bias, dim=-1)
    torch.testing.assert_close(w, expected, rtol=1e-5, atol=1e-6)
    # the weights of some row are not all equal (the position term did something)
    assert (w.max(-1).values - w.min(-1).values).max() > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
@PROPS
@given(
    n=st.integers(1, 16),
    causal=st.booleans(),
    q_offset=st.integers(-4, 4),
    window=st.one_of(st.none(), st.integers(1, 6)),
    pad=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_weights_rows_sum_to_one(backend, n, causal, q_offset, window, pad, seed):
    """Every row that sees a key has weights summing to 1; a row that sees none is all 0."""
    g = torch.Generator().manual_seed(seed)
    d, h = 16, 2
    q, k = _randn(g, 2, h, n, d), _randn(g, 2, h, n, d)
    kpm = (torch.rand(2, n, generator=g) > 0.3) if pad else None
    kw = dict(causal=causal, q_offset=q_offset, window=window, key_padding_mask=kpm)
    vis = visible_mask(2, n, n, causal, q_offset, window, None, kpm)[:, 0].any(-1)  # (B, Nq)
    expected = vis.double()[:, None].expand(2, h, n)

    pe = _t5(h)
    w = relattn.attention_weights(q, k, pe, **kw)
    assert not torch.isnan(w).any()
    torch.testing.assert_close(w.double().sum(-1), expected, rtol=0, atol=1e-6)

    out = relattn.attention(q, k, one_hot_values(2, h, n, d), pe, backend=backend, **kw)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.double().sum(-1), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(out[..., :n], w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@PROPS
@given(n=st.integers(1, 20), shift=st.integers(1, 25), seed=st.integers(0, 2**31 - 1))
def test_negative_q_offset_rows_are_zero(backend, n, shift, seed):
    """With q_offset = -s (causal) rows r < s see no key: out and dq are exactly 0, with no NaN
    anywhere, and the other rows are untouched."""
    g = torch.Generator().manual_seed(seed)
    d = 16
    q, k, v = (_randn(g, 1, 2, n, d).requires_grad_(True) for _ in range(3))
    pe = _t5(2)
    out = relattn.attention(q, k, v, pe, q_offset=-shift, backend=backend)
    out.backward(_randn(g, 1, 2, n, d))
    empty = min(shift, n)
    assert torch.equal(out[:, :, :empty], torch.zeros_like(out[:, :, :empty]))
    assert torch.equal(q.grad[:, :, :empty], torch.zeros_like(q.grad[:, :, :empty]))
    for t in (out, q.grad, k.grad, v.grad, pe.weight.grad):
        assert torch.isfinite(t).all()
    if empty < n:  # row r sees keys 0 .. r - shift
        ref = relattn.attention(q[:, :, empty:], k, v, pe, q_offset=0, backend="reference")
        torch.testing.assert_close(out[:, :, empty:], ref, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- Δ only


@pytest.mark.parametrize("pe_name", list(ADDITIVE))
@pytest.mark.parametrize("nq, nk, q_offset", [(7, 7, 0), (3, 11, 8), (9, 4, -3), (1, 6, 2)])
def test_bias_is_toeplitz(pe_name, nq, nk, q_offset):
    """bias(nq, nk, q_offset) depends only on Δ: constant along diagonals, equal to the
    definition, and unchanged by shifting q_offset and the key positions together."""
    pe = _pe(pe_name, 3, 8)
    b = pe.bias(nq, nk, q_offset)
    assert b.shape == (3, nq, nk)
    assert torch.equal(b[:, 1:, 1:], b[:, :-1, :-1])
    expected = pe_bias(pe, pe_leaves(pe, torch.float64), delta_grid(nq, nk, q_offset),
                       torch.float64)  # fmt: skip
    torch.testing.assert_close(b.double(), expected, rtol=1e-6, atol=1e-6)
    for s in (1, 5):
        shifted = pe.bias(nq, nk + s, q_offset + s)[:, :, s:]
        assert torch.equal(shifted, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pe_name", ["t5", "t5_bidir", "alibi", "kerple_power", "rope"])
@pytest.mark.parametrize("causal", [True, False])
def test_shifting_all_positions_changes_nothing(backend, pe_name, causal):
    """Moving every query and key s positions later (s hidden padded keys in front, q_offset
    + s) leaves the output unchanged: the encoding sees Δ only."""
    g = torch.Generator().manual_seed(5)
    b, h, nq, nk, d, s = 1, 2, 6, 10, 16, 13
    q, k, v = _randn(g, b, h, nq, d), _randn(g, b, h, nk, d), _randn(g, b, h, nk, d)
    pe = _pe(pe_name, h, d)
    kw = dict(causal=causal, backend=backend)
    out = relattn.attention(q, k, v, pe, q_offset=nk - nq, **kw)
    junk_k, junk_v = _randn(g, b, h, s, d), _randn(g, b, h, s, d)
    kpm = torch.ones(b, s + nk, dtype=torch.bool)
    kpm[:, :s] = False
    out_s = relattn.attention(
        q, torch.cat([junk_k, k], 2), torch.cat([junk_v, v], 2), pe,
        q_offset=nk - nq + s, key_padding_mask=kpm, **kw,
    )  # fmt: skip
    torch.testing.assert_close(out_s, out, rtol=1e-5, atol=2e-6)


# ----------------------------------------------------------------------------- conventions


class Scaled(PositionEncoding):
    """A table scaled by a constant (the README's recipe for the textbook convention)."""

    def __init__(self, inner, factor):
        super().__init__()
        self.inner, self.factor, self.num_heads = inner, factor, inner.num_heads

    def table(self, lo, hi):
        return self.inner.table(lo, hi) * self.factor


def _plain_softmax_attention(s, v, vis):
    s = s.masked_fill(~vis, float("-inf"))
    w = torch.softmax(s, -1).nan_to_num(0.0)
    return w @ v


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pe_name", ["t5", "alibi", "kerple_log"])
def test_textbook_convention(backend, pe_name):
    """softmax((q·k + PE)/√d + Mask) via scale = 1/√d and the table scaled by 1/√d."""
    g = torch.Generator().manual_seed(6)
    b, h, n, d = 2, 2, 13, 16
    q, k, v = (_randn(g, b, h, n, d) for _ in range(3))
    pe = _pe(pe_name, h, d)
    out = relattn.attention(q, k, v, Scaled(pe, 1 / math.sqrt(d)), scale=1 / math.sqrt(d),
                            backend=backend)  # fmt: skip
    bias = pe_bias(pe, pe_leaves(pe, torch.float64), delta_grid(n, n, 0), torch.float64)
    qd, kd, vd = q.double(), k.double(), v.double()
    s = (qd @ kd.transpose(-1, -2) + bias) / math.sqrt(d)
    vis = visible_mask(b, n, n, True, 0, None, None, None)
    torch.testing.assert_close(out.double(), _plain_softmax_attention(s, vd, vis),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_t5_unscaled_convention(backend, bidirectional):
    """T5's softmax(q·k + PE + Mask) (no 1/√d) via scale = 1.0."""
    g = torch.Generator().manual_seed(7)
    b, h, n, d = 1, 2, 15, 16
    q, k, v = (_randn(g, b, h, n, d) * 0.3 for _ in range(3))
    pe = T5Bias(h, 8, 20, bidirectional=bidirectional)
    with torch.no_grad():
        pe.weight.normal_(0, 1, generator=g)
    causal = not bidirectional
    out = relattn.attention(q, k, v, pe, scale=1.0, causal=causal, backend=backend)
    bias = pe_bias(pe, pe_leaves(pe, torch.float64), delta_grid(n, n, 0), torch.float64)
    qd, kd, vd = q.double(), k.double(), v.double()
    s = qd @ kd.transpose(-1, -2) + bias
    vis = visible_mask(b, n, n, causal, 0, None, None, None)
    torch.testing.assert_close(out.double(), _plain_softmax_attention(s, vd, vis),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def test_rope_rotation_matches_definition():
    """The RoPE the library applies inside attention is the rotate-half rotation by position."""
    g = torch.Generator().manual_seed(8)
    d = 16
    q, k, v = (_randn(g, 1, 1, 9, d) for _ in range(3))
    rope = RoPE(d)
    out = relattn.attention(q, k, v, rope, q_offset=3, causal=False)
    qr = rope_rotate(q.double(), rope, 3 + torch.arange(9))
    kr = rope_rotate(k.double(), rope, torch.arange(9))
    s = qr @ kr.transpose(-1, -2) / math.sqrt(d)
    vis = torch.ones(1, 1, 9, 9, dtype=torch.bool)
    torch.testing.assert_close(out.double(), _plain_softmax_attention(s, v.double(), vis),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


# ----------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
@PROPS
@given(data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_any_layout_gives_the_float64_answer(backend, data, seed):
    """Shapes drawn with memory layouts (cases.layouts: storage order, steps along each dim
    including D, padding, a storage offset, stride-0 batch and heads) and aliasing (k and v one
    tensor, q a view of it): out without autograd, out and dq, dk, dv with it, against float64
    math on the same values. Few query rows against more keys (decoding) and full calls."""
    tiny = backend == "triton"  # the interpreter: small shapes
    b = data.draw(st.integers(0, 2), label="B")
    hkv = data.draw(st.integers(1, 2), label="Hkv")
    hq = hkv * data.draw(st.integers(1, 2), label="group")
    d = data.draw(st.sampled_from([16] if tiny else [1, 8, 16]), label="D")
    nk = data.draw(st.integers(1, 24 if tiny else 160), label="Nk")
    nq = data.draw(st.integers(1, nk), label="Nq")
    alias = hq == hkv and data.draw(st.booleans(), label="alias")
    g = torch.Generator().manual_seed(seed)
    k = lay_out(_randn(g, b, hkv, nk, d), data.draw(layouts(), label="k layout"))
    if alias:  # one tensor: k = v, q its last rows
        v, q = k, k[:, :, nk - nq :]
    else:
        v = lay_out(_randn(g, b, hkv, nk, d), data.draw(layouts(), label="v layout"))
        q = lay_out(_randn(g, b, hq, nq, d), data.draw(layouts(), label="q layout"))
    names = ["none", "t5", "alibi"] + (["rope"] if d % 2 == 0 else [])  # RoPE: pairs of dims
    pe = _pe(data.draw(st.sampled_from(names), label="pe"), hq, d)
    grad_out = _randn(g, b, hq, nq, d)
    kw = {"q_offset": nk - nq}
    with torch.no_grad():
        out_ng = relattn.attention(q, k, v, pe, backend=backend, **kw)
    qq, kk, vv, named = _differentiable(q, k, v, alias)
    out = relattn.attention(qq, kk, vv, pe, backend=backend, **kw)
    truth = _math_with_grads(q, k, v, pe, grad_out, alias, **kw)
    if b == 0:
        assert out_ng.shape == out.shape == truth["out"].shape
        return
    scale = 1.0 + truth["out"].abs().max().item()
    assert (out_ng - truth["out"]).abs().max().item() <= 2e-5 * scale, "out without autograd"
    grads = torch.autograd.grad(out, list(named.values()), grad_out)
    got = {"out": out.detach(), **dict(zip(named, grads, strict=True))}
    for name, t in truth.items():
        assert got[name].shape == t.shape, name
        tol = 2e-5 * (1.0 + t.abs().max().item())
        assert (got[name].double() - t).abs().max().item() <= tol, name


def _differentiable(q, k, v, alias):
    """The caller's tensors, differentiable with their layout (``detach`` keeps the strides):
    ``(q, k, v, {name: tensor to differentiate})``; aliased, one tensor x is k and v and its
    last rows are q."""
    if alias:
        x = k.detach().requires_grad_(True)
        return x[:, :, k.shape[2] - q.shape[2] :], x, x, {"x": x}
    qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
    return qq, kk, vv, {"q": qq, "k": kk, "v": vv}


def _math_with_grads(q, k, v, pe, grad_out, alias, **kw):
    """Float64 out and gradients of the formula (tests/oracle.py) for the same values."""
    qq, kk, vv, named = _differentiable(*(t.detach().double() for t in (q, k, v)), alias)
    out = attention_math(qq, kk, vv, pe, **kw)
    if q.shape[0] == 0:
        return {"out": out}
    grads = torch.autograd.grad(out, list(named.values()), grad_out.double())
    return {"out": out.detach(), **dict(zip(named, grads, strict=True))}
