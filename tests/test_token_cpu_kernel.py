"""The C++ CPU kernel's terms that depend on the tokens (``call.token``): the query-conditioned
banded bias ``Σ_c r[b, h, i, c]·P[h or 0, c, Δ]`` (0 <= Δ < W) and the forget gate
``fq_i - fk_j`` (Δ >= 0; ``fk_j - fq_i`` below), forward and backward, against float64 math
written out here on the materialized (B, H, Nq, Nk) scores with torch autograd.

The backend is driven through :class:`~relattn.backends.base.Call` objects directly.
"""

from __future__ import annotations

import os

import pytest
import torch

from relattn.backends import Call, cpu_kernel, get
from relattn.backends.base import TokenTerms
from relattn.masks import offset_range
from relattn.problem import Problem

OFF = os.environ.get("RELATTN_CPU_KERNEL", "1") == "0"
pytestmark = pytest.mark.skipif(OFF, reason="RELATTN_CPU_KERNEL=0")

F64 = torch.float64
NAMES = ("out", "lse", "q", "k", "v", "table", "r", "weight", "fq", "fk")


def _math(q, k, v, table, token, problem, grad_out):
    """out, lse and every gradient in float64 (the formula, materialized)."""
    q, k, v = (x.detach().to(F64).requires_grad_() for x in (q, k, v))
    leaves = {"q": q, "k": k, "v": v}
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    kk = k.repeat_interleave(hq // hkv, dim=1)
    vv = v.repeat_interleave(hq // hkv, dim=1)
    pos = problem.q_offset + torch.arange(nq)
    delta = pos[:, None] - torch.arange(nk)[None, :]  # (Nq, Nk)
    scores = problem.scale * q @ kk.transpose(-1, -2)
    visible = torch.ones(b, 1, nq, nk, dtype=torch.bool)
    if problem.causal:
        visible &= delta >= 0
    if problem.window:
        visible &= delta < problem.window
        if not problem.causal:
            visible &= delta > -problem.window
    if table is not None:
        t = leaves["table"] = table.detach().to(F64).requires_grad_()
        col = delta - problem.lo
        visible &= (col >= 0) & (col < t.shape[1])
        scores = scores + t[:, col.clamp(0, t.shape[1] - 1)][None]
    r, w, fq, fk = token
    if r is not None:
        r = leaves["r"] = r.detach().to(F64).requires_grad_()
        w = leaves["weight"] = w.detach().to(F64).requires_grad_()
        width = w.shape[2]
        inband = (delta >= 0) & (delta < width)
        cols = w[:, :, delta.clamp(0, width - 1)]  # (Hw, R, Nq, Nk)
        band = torch.einsum("bhic,hcij->bhij", r, cols.expand(hq, -1, -1, -1))
        scores = scores + band * inband
    if fq is not None:
        fq = leaves["fq"] = fq.detach().to(F64).requires_grad_()
        fk = leaves["fk"] = fk.detach().to(F64).requires_grad_()
        sign = torch.where(delta >= 0, 1.0, -1.0).to(F64)
        scores = scores + sign * (fq[..., :, None] - fk[..., None, :])
    if problem.doc_ids is not None:
        ids = problem.doc_ids
        visible &= (ids[:, pos][:, :, None] == ids[:, None, :])[:, None]
    if problem.key_padding_mask is not None:
        visible &= problem.key_padding_mask[:, None, None, :].bool()
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    weights = torch.where(visible, torch.exp(scores - safe[..., None]), 0.0)
    out = weights @ vv
    out.backward(grad_out.to(F64))
    got = {"out": out.detach(), "lse": lse.detach()}
    got.update({name: x.grad for name, x in leaves.items()})
    return got


def _kernel(q, k, v, table, token, problem, grad_out):
    """The backend through a Call: out, lse and the 8 gradients by name."""
    backend = get("cpu_kernel")
    call = Call(q, k, v, table, None, problem, backend, True, None, TokenTerms(*token))
    call = call.conformed()
    out, lse = backend.forward(call)
    grads = backend.backward(call, grad_out, out, lse)
    assert len(grads) == 8
    got = {"out": out, "lse": lse}
    for name, g, x in zip(NAMES[2:], grads, (q, k, v, table, *token), strict=True):
        if x is None:
            assert g is None, name
            continue
        assert g.shape == x.shape and g.dtype == x.dtype, (name, g.shape, g.dtype)
        got[name] = g
    return got


def _case(
    *,
    b=2,
    hq=4,
    hkv=2,
    nq=37,
    nk=None,
    d=16,
    rank=5,
    width=11,
    shared=True,
    band=True,
    gate=True,
    table=False,
    causal=True,
    q_offset=0,
    window=0,
    docs=False,
    padding=False,
    dtype=torch.float32,
    seed=0,
):
    """Inputs of one case: q, k, v, table, token (4 tensors or Nones), problem, grad_out."""
    g = torch.Generator().manual_seed(seed)
    nk = nq if nk is None else nk
    ct = F64 if dtype == F64 else torch.float32
    q = torch.randn(b, hq, nq, d, generator=g).to(dtype)
    k, v = (torch.randn(b, hkv, nk, d, generator=g).to(dtype) for _ in range(2))
    grad_out = torch.randn(b, hq, nq, d, generator=g).to(dtype)
    lo, hi = offset_range(nq, nk, causal, q_offset, window)
    tab = torch.randn(hq, hi - lo + 1, generator=g).to(ct) if table else None
    r = w = fq = fk = None
    if band:
        r = torch.randn(b, hq, nq, rank, generator=g).to(ct)
        w = (0.5 * torch.randn(1 if shared else hq, rank, width, generator=g)).to(ct)
    if gate:
        # F: a cumulative sum of log f <= 0 over positions 0 .. max(nk, q_offset + nq)
        n = max(nk, q_offset + nq) + max(0, -q_offset)
        logf = torch.nn.functional.logsigmoid(2 + torch.randn(b, hq, n, generator=g))
        f = logf.cumsum(-1)
        shift = max(0, -q_offset)
        fk = f[..., shift : shift + nk].to(ct).contiguous()
        fq = f[..., shift + q_offset : shift + q_offset + nq].to(ct).contiguous()
    doc_ids = kpm = None
    if docs:
        doc_ids = (torch.arange(nk) * 3 // nk).expand(b, nk).contiguous()
        doc_ids[1] = torch.arange(nk) * 2 // nk
    if padding:
        kpm = torch.ones(b, nk, dtype=torch.bool)
        kpm[0, -5:] = False
        kpm[1, :3] = False
    problem = Problem(lo, d**-0.5, causal, q_offset, window, doc_ids, kpm)
    return q, k, v, tab, (r, w, fq, fk), problem, grad_out


def _check_fp32(tol=1e-5, **kw):
    q, k, v, tab, token, problem, grad_out = _case(**kw)
    got = _kernel(q, k, v, tab, token, problem, grad_out)
    want = _math(q, k, v, tab, token, problem, grad_out)
    assert got.keys() == want.keys()
    for name, w in want.items():
        x = got[name].to(F64)
        finite = torch.isfinite(w)
        assert torch.equal(finite, torch.isfinite(x)), name  # -inf lse rows agree
        err = (x[finite] - w[finite]).abs().max().item() if finite.any() else 0.0
        bound = tol * (1 + w[finite].abs().max().item()) if finite.any() else 0.0
        assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 7 query rows and 16 keys: many blocks, bands across tile edges."""
    monkeypatch.setattr(cpu_kernel, "BLOCK_M", 7)
    monkeypatch.setattr(cpu_kernel, "BLOCK_N", 16)


MASKS = {
    "causal": {},
    "bidirectional": {"causal": False},
    "window": {"window": 9},
    "window_bidir": {"causal": False, "window": 6},
    "q_offset": {"nq": 20, "nk": 45, "q_offset": 25},
    "neg_q_offset": {"q_offset": -6},
    "cross_bidir": {"nq": 23, "nk": 40, "causal": False, "q_offset": 7},
    "doc_ids": {"docs": True},
    "key_padding": {"padding": True, "causal": False},
}


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("terms", ["band", "gate", "both+table"])
def test_float32_against_float64(small_tiles, mask, terms):
    """Out, lse and every gradient (q, k, v, table, r, P, fq, fk) within 1e-5 of float64 math,
    GQA 4:2, across many tiles, each mask."""
    kw = dict(MASKS[mask])
    kw.update(band=terms != "gate", gate=terms != "band", table=terms == "both+table")
    _check_fp32(**kw)


@pytest.mark.parametrize(
    "kw",
    [
        {"shared": False},  # P per head
        {"width": 1},
        {"width": 60},  # W larger than N
        {"width": 200, "causal": False, "shared": False},
        {"rank": 1, "width": 16},  # a band exactly one key tile wide
        {"rank": 16, "width": 33, "d": 32},
        {"hq": 4, "hkv": 1, "shared": False, "table": True},  # MQA
        {"b": 1, "hq": 2, "hkv": 2, "nq": 1, "nk": 30, "q_offset": 29},  # a decoding row
    ],
)
def test_band_shapes_against_float64(small_tiles, kw):
    _check_fp32(**kw)


def test_default_tiles_at_a_tile_boundary():
    """The kernel's own tiles (128 x 256), head dim 64 (the own products, k and v transposed:
    GQA 2:1 with 300 rows), N = 300 across tile edges, band and gate, a window."""
    _check_fp32(b=1, hq=4, hkv=2, nq=300, d=64, rank=16, width=150, window=200, seed=1)
    _check_fp32(b=1, hq=2, hkv=1, nq=300, d=64, rank=4, width=400, causal=False, table=True)


@pytest.mark.parametrize("gemm", ["blas", "aten"])
def test_other_products_against_float64(small_tiles, gemm):
    """The BLAS and nested at::addmm_ paths (scratch rows of exactly L keys)."""
    mod = cpu_kernel.load()
    mod.set_products(gemm)
    try:
        _check_fp32(nq=29, d=16, table=True)
    finally:
        mod.set_products("tiles")


@pytest.mark.parametrize("mask", ["causal", "bidirectional", "window", "doc_ids", "key_padding"])
def test_float64_against_float64(small_tiles, mask):
    _check_fp32(tol=1e-12, dtype=F64, table=True, shared=False, **MASKS[mask])


@pytest.fixture(params=["bf16-tiles", "widened"])
def bf16_path(request):
    """bfloat16's two paths: bf16 products (AVX-512-BF16, D a multiple of 32) and widened."""
    mod = cpu_kernel.load()
    tiles = request.param == "bf16-tiles"
    if tiles and not mod.bf16_products_for(64):
        pytest.skip("this CPU has no AVX-512-BF16 (or the build is AVX2-only): bf16 is widened")
    mod.set_bf16_products(tiles)
    yield request.param
    mod.set_bf16_products(True)


@pytest.mark.parametrize("d", [64, 48])
@pytest.mark.parametrize("mask", ["causal", "bidirectional", "doc_ids"])
def test_bfloat16_against_float64(small_tiles, bf16_path, d, mask):
    """bfloat16 (D = 64: bf16 products where the CPU has them; D = 48: always widened) with
    FlashAttention's criterion: each error at most 2x that of the same math in bfloat16, plus
    one bf16 unit at the tensor's magnitude. The terms' gradients come back in float32."""
    kw = dict(MASKS[mask], d=d, table=True, dtype=torch.bfloat16)
    q, k, v, tab, token, problem, grad_out = _case(**kw)
    got = _kernel(q, k, v, tab, token, problem, grad_out)
    assert all(got[n].dtype == torch.float32 for n in ("table", "r", "weight", "fq", "fk"))
    truth = _math(q, k, v, tab, token, problem, grad_out)
    naive = _naive_bf16(q, k, v, tab, token, problem, grad_out)
    eps = torch.finfo(torch.bfloat16).eps
    for name, t in truth.items():
        finite = torch.isfinite(t)
        err = (got[name].to(F64) - t)[finite].abs().max().item()
        err_n = (naive[name].to(F64) - t)[finite].abs().max().item()
        bound = 2 * err_n + eps * (1 + t[finite].abs().max().item())
        assert err <= bound, f"{name}: error {err:.3g} > {bound:.3g}"


def _naive_bf16(q, k, v, table, token, problem, grad_out):
    """The same math with every tensor in bfloat16 (what a user's naive bf16 code computes)."""
    bf = torch.bfloat16
    leaves = [x.detach().to(bf).requires_grad_() if x is not None else None for x in
              (q, k, v, table, *token)]  # fmt: skip
    qb, kb, vb, tb, rb, wb, fqb, fkb = leaves
    b, hq, nq, d = qb.shape
    hkv, nk = kb.shape[1], kb.shape[2]
    kk, vv = (x.repeat_interleave(hq // hkv, dim=1) for x in (kb, vb))
    pos = problem.q_offset + torch.arange(nq)
    delta = pos[:, None] - torch.arange(nk)[None, :]
    scores = problem.scale * qb @ kk.transpose(-1, -2)
    visible = torch.ones(b, 1, nq, nk, dtype=torch.bool)
    if problem.causal:
        visible &= delta >= 0
    col = delta - problem.lo
    visible &= (col >= 0) & (col < tb.shape[1])
    scores = scores + tb[:, col.clamp(0, tb.shape[1] - 1)][None]
    width = wb.shape[2]
    cols = wb[:, :, delta.clamp(0, width - 1)]
    band = torch.einsum("bhic,hcij->bhij", rb, cols.expand(hq, -1, -1, -1))
    scores = scores + band * ((delta >= 0) & (delta < width))
    sign = torch.where(delta >= 0, 1.0, -1.0).to(bf)
    scores = scores + sign * (fqb[..., :, None] - fkb[..., None, :])
    if problem.doc_ids is not None:
        ids = problem.doc_ids
        visible &= (ids[:, pos][:, :, None] == ids[:, None, :])[:, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    out = torch.softmax(scores, -1) @ vv
    lse = torch.logsumexp(scores.float(), -1)
    out.backward(grad_out)
    names = ("q", "k", "v", "table", "r", "weight", "fq", "fk")
    got = {"out": out.detach(), "lse": lse}
    got.update({n: x.grad for n, x in zip(names, leaves, strict=True)})
    return got


def test_absent_terms_change_nothing():
    """A Call without token terms returns the 4-tuple; with them, absent pairs give None."""
    q, k, v, tab, token, problem, grad_out = _case(gate=False, table=True)
    backend = get("cpu_kernel")
    assert backend.token_terms
    plain = Call(q, k, v, tab, None, problem, backend)
    out, lse = backend.forward(plain)
    assert len(backend.backward(plain, grad_out, out, lse)) == 4
    zero = TokenTerms(torch.zeros_like(token[0]), torch.zeros_like(token[1]), None, None)
    call = plain._replace(token=zero)
    out2, lse2 = backend.forward(call)
    grads = backend.backward(call, grad_out, out2, lse2)
    torch.testing.assert_close(out2, out, rtol=0, atol=0)
    assert grads[6] is None and grads[7] is None


def test_bad_shapes_raise_clearly():
    """Wrong shapes, dtypes or a half-given pair: a RuntimeError naming the tensor."""
    q, k, v, tab, token, problem, grad_out = _case(nq=9, table=False)
    r, w, fq, fk = token
    backend = get("cpu_kernel")

    def run(*terms):
        backend.forward(Call(q, k, v, None, None, problem, backend, token=TokenTerms(*terms)))

    with pytest.raises(RuntimeError, match=r"band_r must be a contiguous \(B, Hq, Nq, R\)"):
        run(r[:, :, :5], w, None, None)
    with pytest.raises(RuntimeError, match=r"band_w must be a contiguous \(Hw, R, W\)"):
        run(r, w[:, :3], None, None)
    with pytest.raises(RuntimeError, match="band_w must be .* Hw 1 or Hq"):
        run(r, w.expand(2, -1, -1).contiguous(), None, None)
    with pytest.raises(RuntimeError, match=r"gate_k must be a contiguous \(B, Hq, Nk\)"):
        run(None, None, fq, fk[..., :4])
    with pytest.raises(RuntimeError, match="gate_q must be .* compute dtype"):
        mod = cpu_kernel.load()
        params = cpu_kernel._params(mod, q, k, v, *(torch.empty(0),) * 2, problem, None)
        params.gate_q, params.gate_k = fq.double(), fk
        mod.forward(params)
    with pytest.raises(RuntimeError, match="gate_q and gate_k are given together"):
        params = cpu_kernel._params(mod, q, k, v, *(torch.empty(0),) * 2, problem, None)
        params.gate_q = fq
        mod.forward(params)
    with pytest.raises(RuntimeError, match="band_r and band_w are given together"):
        params = cpu_kernel._params(mod, q, k, v, *(torch.empty(0),) * 2, problem, None)
        params.band_w = w
        mod.forward(params)
