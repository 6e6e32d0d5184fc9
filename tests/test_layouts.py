"""Every backend on every memory layout a caller can hand it, against float64 math.

The same values reach a backend as a contiguous tensor, as other storage viewed as
``(B, H, N, D)`` (a ``(B, N, H, D)`` buffer, fully permuted storage), with a non-unit stride
along D, expanded by stride 0 over batch and heads, as one tensor serving as q and k (and v), as
a slice of a larger tensor (a storage offset), and with an empty batch; for few query rows
against a longer cache (the decode backend's shapes, ``q_offset = Nk - Nq``) and for full
self-attention. Forward without autograd (the inference fast paths) and forward + backward,
gradients taken with respect to the caller's tensors, so they come back in the caller's shapes.

A backend joins by registering itself (``cases.BACKENDS``); a layout by adding one entry to
:data:`LAYOUTS`.
"""

from __future__ import annotations

import pytest
import torch
from cases import BACKENDS, skip_unless_runs
from oracle import (
    ORACLES,
    assert_close_f64,
    attention_math,
    grads_of,
    max_err,
    pe_leaves,
    seed_of,
)

import relattn
from relattn.backends.base import Layout, conform, fits
from relattn.pe import T5Bias

# ----------------------------------------------------------------------------- layouts


def _contiguous(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


def _bnhd(x: torch.Tensor) -> torch.Tensor:
    """(B, N, H, D) storage viewed as (B, H, N, D), as heads split after a projection are."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def _permuted(x: torch.Tensor) -> torch.Tensor:
    """(D, N, H, B) storage: every stride differs from the contiguous one, D's the largest."""
    return x.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0)


def _strided_d(x: torch.Tensor) -> torch.Tensor:
    """Every other element along D (``buf[..., ::2]``)."""
    buf = torch.full((*x.shape[:-1], 2 * x.shape[-1]), float("nan"), dtype=x.dtype)
    buf[..., ::2] = x
    return buf[..., ::2]


def _offset(x: torch.Tensor) -> torch.Tensor:
    """A slice of a larger tensor (NaN around it): a storage offset and padded strides."""
    b, h, n, d = x.shape
    buf = torch.full((b + 1, h + 1, n + 3, d + 2), float("nan"), dtype=x.dtype)
    view = buf[1:, 1:, 2 : 2 + n, 1 : 1 + d]
    view.copy_(x)
    return view


def _expanded(x: torch.Tensor) -> torch.Tensor:
    """Stride 0 over batch and heads: the values of batch 0, head 0 everywhere."""
    return x[:1, :1].expand(x.shape)


# name -> how a tensor's values are laid out (``_expanded`` changes the values too: the oracle
# reads the laid-out tensors). "alias" and "empty_batch" are built by _inputs.
LAYOUTS = {
    "contiguous": _contiguous,
    "bnhd": _bnhd,
    "permuted": _permuted,
    "strided_d": _strided_d,
    "expanded": _expanded,
    "offset": _offset,
    "alias": _contiguous,  # q and k (and v) one tensor
    "empty_batch": _contiguous,
}

# (name, Hq, Hkv, Nq, Nk, D): few rows against a longer cache (q_offset = Nk - Nq) and full
# self-attention. GQA throughout (alias needs Hq == Hkv: it uses MHA, see _inputs).
SHAPES = {
    "decode1": (4, 2, 1, 150, 16),
    "decode7": (4, 2, 7, 150, 16),
    "decode128": (4, 2, 128, 200, 16),
    "full": (4, 2, 40, 40, 16),
}
# The Triton interpreter walks every block in Python: one decode row and a small full call.
TRITON_SHAPES = {
    "decode1": (2, 1, 1, 40, 16),
    "full": (2, 1, 19, 19, 16),
}
GRID = [
    pytest.param(be, lay, sh, id=f"{be}-{lay}-{sh}")
    for be in ["auto", *BACKENDS]
    for sh in (TRITON_SHAPES if be == "triton" else SHAPES)
    for lay in LAYOUTS
    if not (be == "triton" and lay in ("bnhd", "offset"))  # as contiguous/permuted for triton
]


def _inputs(layout: str, shape: tuple, seed: int):
    """``q, k, v`` laid out as ``layout`` (k, v share batch size 2, or 0 for empty_batch), and
    grad_out."""
    hq, hkv, nq, nk, d = shape
    b = 0 if layout == "empty_batch" else 2
    g = torch.Generator().manual_seed(seed)
    lay = LAYOUTS[layout]
    if layout == "alias":
        # One tensor: k = v = x, q its last Nq rows (q_offset = Nk - Nq puts them in place).
        x = lay(torch.randn(b, hq, nk, d, generator=g))
        q, k, v = x[:, :, nk - nq :], x, x
    else:
        q = lay(torch.randn(b, hq, nq, d, generator=g))
        k = lay(torch.randn(b, hkv, nk, d, generator=g))
        v = lay(torch.randn(b, hkv, nk, d, generator=g))
    grad_out = torch.randn(b, hq, nq, d, generator=g)
    return q, k, v, grad_out


def _same_layout(t: torch.Tensor) -> torch.Tensor:
    """A new leaf holding ``t``'s values with ``t``'s strides (stride 0 included) and storage
    offset, in storage of its own."""
    base = t.detach()
    size = base.untyped_storage().nbytes() // base.element_size()
    buf = torch.full((size,), float("nan"), dtype=base.dtype)
    out = buf.as_strided(base.shape, base.stride(), base.storage_offset())
    if base.numel():
        if 0 in base.stride():  # expanded: write the values once, through a dense view
            dense = tuple(slice(None) if s else slice(0, 1) for s in base.stride())
            buf.as_strided(base[dense].shape, base[dense].stride(), base.storage_offset()).copy_(
                base[dense]
            )
        else:
            out.copy_(base)
    return out.requires_grad_(True)


def _run(backend, layout, q, k, v, pe, grad_out, q_offset):
    """Out without autograd (the inference paths), then out and the gradients with respect to
    the caller's tensors (leaves with the same layout: for alias, the one tensor x whose last
    Nq rows are q and which is k and v, its gradient the sum of every use)."""
    with torch.no_grad():
        out_ng = relattn.attention(q, k, v, pe, q_offset=q_offset, backend=backend)
    if layout == "alias":
        x = _same_layout(k)
        qq, kk, vv = x[:, :, x.shape[2] - q.shape[2] :], x, x
        named = {"x": x}
    else:
        qq, kk, vv = _same_layout(q), _same_layout(k), _same_layout(v)
        named = {"q": qq, "k": kk, "v": vv}
    for t, given in ((qq, q), (kk, k), (vv, v)):
        assert t.stride() == given.stride(), "the test lost the layout it means to test"
        assert torch.equal(t.detach(), given)
    out = relattn.attention(qq, kk, vv, pe, q_offset=q_offset, backend=backend)
    for n, p in pe.named_parameters():
        named[f"pe.{n}"] = p
    return out_ng, grads_of(out, grad_out, named)


def _truth(q, k, v, pe, grad_out, q_offset, alias: bool):
    """The float64 formula on the same values, gradients of the same tensors."""
    leaves = pe_leaves(pe, torch.float64) if pe is not None else {}
    if alias:
        x = k.detach().to(torch.float64).clone().requires_grad_(True)
        xq = x[:, :, x.shape[2] - q.shape[2] :]
        out = attention_math(xq, x, x, pe, leaves=[leaves], q_offset=q_offset)
        named = {"x": x}
    else:
        qq, kk, vv = (t.detach().to(torch.float64).clone().requires_grad_(True) for t in (q, k, v))
        out = attention_math(qq, kk, vv, pe, leaves=[leaves], q_offset=q_offset)
        named = {"q": qq, "k": kk, "v": vv}
    named.update({f"pe.{n}": t for n, t in leaves.items()})
    return grads_of(out, grad_out, named)


def _assert_close(got: dict, truth: dict, label: str) -> None:
    """:func:`oracle.assert_close_f64`, with empty tensors (an empty batch) compared by shape."""
    assert got.keys() == truth.keys()
    for name in truth:
        if truth[name].numel() == 0:
            assert got[name].shape == truth[name].shape, f"{label}{name}: shape"
        else:
            assert_close_f64({name: got[name]}, {name: truth[name]}, label=label)


@pytest.mark.parametrize("backend, layout, shape_name", GRID)
def test_layout_grid(backend, layout, shape_name):
    """Out (with and without autograd) and dq, dk, dv and the table's gradient, on the caller's
    layout, against float64 math on the same values."""
    shape = (TRITON_SHAPES if backend == "triton" else SHAPES)[shape_name]
    hq, hkv, nq, nk, d = shape
    if layout == "alias":
        shape = (hq, hq, nq, nk, d)  # one tensor as q and k: as many kv heads as query heads
    q, k, v, grad_out = _inputs(layout, shape, seed_of(layout, shape_name))
    if backend != "auto":
        skip_unless_runs(backend, q, k, {"q_offset": nk - nq})
    torch.manual_seed(seed_of("pe", shape_name))
    pe = T5Bias(hq, 8, 20)
    with torch.no_grad():
        pe.weight.normal_()
    out_ng, got = _run(backend, layout, q, k, v, pe, grad_out, nk - nq)
    truth = _truth(q, k, v, pe, grad_out, nk - nq, layout == "alias")
    _assert_close({"out": out_ng}, {"out": truth["out"]}, label=f"{backend} no grad: ")
    _assert_close(got, truth, label=f"{backend} {layout}: ")
    for name, t in (("q", q), ("k", k), ("v", v), ("x", k)):
        if name in got:
            assert got[name].shape == t.shape, f"d{name} not in the caller's shape"


# ----------------------------------------------------------------------------- the issue


def test_issue_example_permuted_storage_through_auto():
    """The reported call: (D, N, H, B) storage viewed as (B, H, N, D) through ``auto`` (the
    decode backend at 100 rows) gave errors of 4.2-4.6 or inf, different on each run."""
    torch.manual_seed(0)
    b, h, n, d = 2, 4, 100, 32
    q = torch.randn(d, n, h, b).permute(3, 2, 1, 0)
    k = torch.randn(d, n, h, b).permute(3, 2, 1, 0)
    v = torch.randn(b, h, n, d)
    pe = T5Bias(h)
    truth = attention_math(q, k, v, pe)
    for _ in range(3):
        out = relattn.attention(q, k, v, pe)
        assert max_err(out, truth) <= 2e-5


@pytest.mark.parametrize("pe_name", ["none", "t5"])
def test_decode_step_strided_inputs(pe_name):
    """The generation step's fast path (one row, no autograd) on every layout of q and of the
    cache: strided_d and permuted q and k, v against float64."""
    b, hq, hkv, nk, d = 2, 4, 2, 70, 16
    g = torch.Generator().manual_seed(3)
    pe = None if pe_name == "none" else T5Bias(hq, 8, 20)
    for lay_q in ("strided_d", "permuted", "expanded", "offset"):
        for lay_kv in ("strided_d", "permuted", "bnhd", "offset"):
            q = LAYOUTS[lay_q](torch.randn(b, hq, 1, d, generator=g))
            k = LAYOUTS[lay_kv](torch.randn(b, hkv, nk, d, generator=g))
            v = LAYOUTS[lay_kv](torch.randn(b, hkv, nk, d, generator=g))
            with torch.no_grad():
                out = relattn.attention(q, k, v, pe, q_offset=nk - 1)
            truth = attention_math(q, k, v, pe, q_offset=nk - 1)
            assert max_err(out, truth) <= 2e-5, (lay_q, lay_kv)


def test_kv_cache_views_with_strided_queries():
    """A KVCache's views (a slice of its buffer, never copied) with queries and new keys cut
    from a fused projection (B, N, 3, H, D) -- non-contiguous, D dense -- and from a transposed
    one (D strided), token by token with q_offset, against float64 on the whole sequence."""
    b, h, d, n = 2, 4, 16, 12
    g = torch.Generator().manual_seed(4)
    pe = T5Bias(h, 8, 20)
    qkv = torch.randn(b, n, 3, h, d, generator=g)
    qkv_t = qkv.permute(4, 3, 2, 1, 0).contiguous().permute(4, 3, 2, 1, 0)  # D strided
    for fused in (qkv, qkv_t):
        q_all, k_all, v_all = (fused[:, :, i].transpose(1, 2) for i in range(3))
        truth = attention_math(q_all, k_all, v_all, pe)
        cache = relattn.KVCache(1, b, h, d, capacity=n).layer(0)
        outs = []
        with torch.no_grad():
            for t0, t1 in ((0, 5), (5, 6), (6, 7), (7, 12)):  # a prompt, single tokens, a chunk
                view = cache.update(k_all[:, :, t0:t1], v_all[:, :, t0:t1])
                assert not view.k.is_contiguous() or t1 == n  # the buffer's view, as it is
                q = q_all[:, :, t0:t1]
                outs.append(relattn.attention(q, view.k, view.v, pe, q_offset=view.q_offset))
        assert max_err(torch.cat(outs, 2), truth) <= 2e-5


# ----------------------------------------------------------------------------- tables


class TransposedTable(relattn.pe.PositionEncoding):
    """An encoding whose table is a transposed view (column stride H, not 1): a layout the
    decode backend's strided views of the table used to misread."""

    def __init__(self, num_heads: int) -> None:
        super().__init__(num_heads)
        self.weight = torch.nn.Parameter(torch.randn(num_heads))

    def table(self, lo: int, hi: int) -> torch.Tensor:
        d = torch.arange(lo, hi + 1, dtype=self.weight.dtype)
        by_offset = torch.cos(d / 3)[:, None] * self.weight[None, :]  # (T, H)
        return by_offset.t()  # (H, T), strides (1, H)


def _transposed_table_math(enc, leaves, delta, dtype):
    d = delta.to(dtype)
    return leaves["weight"].view(-1, *[1] * d.dim()) * torch.cos(d / 3)


ORACLES[TransposedTable] = _transposed_table_math


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
@pytest.mark.parametrize("nq", [1, 6])
def test_non_contiguous_table(backend, nq):
    """A custom encoding's non-contiguous table, decoding (q_offset = Nk - Nq), out with and
    without autograd and every gradient against float64."""
    b, hq, hkv, nk, d = 1, 4, 2, 30, 16
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(b, h, n, d, generator=g) for h, n in ((hq, nq), (hkv, nk), (hkv, nk)))
    grad_out = torch.randn(b, hq, nq, d, generator=g)
    torch.manual_seed(5)
    pe = TransposedTable(hq)
    if backend != "auto":
        skip_unless_runs(backend, q, k, {"q_offset": nk - nq})
    out_ng, got = _run(backend, "contiguous", q, k, v, pe, grad_out, nk - nq)
    truth = _truth(q, k, v, pe, grad_out, nk - nq, alias=False)
    _assert_close({"out": out_ng}, {"out": truth["out"]}, label=f"{backend} no grad: ")
    _assert_close(got, truth, label=f"{backend}: ")


# ----------------------------------------------------------------------------- the contract


def test_conform_views_what_fits_and_copies_once_what_does_not():
    """A tensor that fits the layout passes as it is (same storage, no copy); one that does not
    is copied to a contiguous tensor; one tensor given as k and v is copied once."""
    x = torch.randn(2, 5, 3, 8).transpose(1, 2)  # (B, N, H, D) storage: rows fit, not contiguous
    y = torch.randn(2, 3, 5, 16)[..., ::2]  # D strided: fits nothing but "strided"
    rows, dense, free = Layout("rows", "rows"), Layout(), Layout("strided", "strided")
    q, k, v, _, _ = conform(rows, x, x, x)
    assert q is x and k is x and v is x
    q, k, v, _, _ = conform(dense, x, y, y)
    assert q.is_contiguous() and k.is_contiguous() and v is k and torch.equal(k, y)
    q, k, v, _, _ = conform(free, y, y, x)
    assert q is y and k is y and v is x
    table = torch.randn(7, 3).t()
    assert conform(free, x, x, x, table)[3].is_contiguous()
    assert fits(torch.randn(2, 3, 4, 1)[..., ::1], "rows")  # D = 1: any stride reads right


def test_native_entry_points_refuse_layouts_they_cannot_read():
    """Called past conform, the decode backend's ATen calls and the C++ kernel raise, naming
    the strides, instead of reading wrongly or past a tensor."""
    from relattn.backends import cpu_kernel, decode
    from relattn.problem import Problem

    q = torch.randn(1, 2, 1, 8)
    k = torch.randn(1, 2, 9, 16)[..., ::2]
    v = torch.randn(1, 2, 9, 8)
    with pytest.raises(ValueError, match="unit stride along D"):
        decode._one_token(q, k, v, None, None, Problem(lo=0, scale=0.3, q_offset=8), False)
    with pytest.raises(ValueError, match="unit stride along D"):
        decode.forward(q, k, v, None, None, Problem(lo=0, scale=0.3, q_offset=8))
    qo = torch.randn(40).as_strided((1, 2, 1, 8), (16, 3, 8, 1))  # heads overlap
    with pytest.raises(ValueError, match="must not overlap"):
        decode.forward(qo, v, v, None, None, Problem(lo=0, scale=0.3, q_offset=8))
    if cpu_kernel.available():
        with pytest.raises(RuntimeError, match="must be contiguous"):
            cpu_kernel.forward(q, k, v, None, None, Problem(lo=0, scale=0.3, q_offset=8))
        table = torch.randn(20, 2).t()  # (2, 20), strides (1, 2)
        with pytest.raises(RuntimeError, match="table must be contiguous"):
            mod = cpu_kernel.load()
            problem = Problem(lo=0, scale=0.3, q_offset=8)
            empty = torch.empty(0)
            mod.forward(cpu_kernel._params(mod, q, v, v, table, empty, problem))
