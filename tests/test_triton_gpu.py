"""The Triton backend on a CUDA GPU at sizes the interpreter cannot afford (N up to 16k, D = 128),
every autotune config that pruning keeps, torch.compile, deterministic mode, and the chunked
fallback on CUDA. Marked ``gpu``: `make gpu-check` runs them; without CUDA they are skipped.

The kernels are called through the backend protocol with an explicit table (what every encoding
reduces to) and compared with the formula in float64, written here with dense tensors on the GPU,
by FlashAttention's criterion (error <= 2 × the naive same-dtype error + one unit); the table
gradient is float32 and is held to the float32 naive's error plus the rounding scale of a float32
sum in another order: 8 units of Σ|∂L/∂score| over the scores the entry collects (the terms of a
table entry cancel, each row's ∂L/∂score sums to zero, so its error scales with that sum, not
with the entry).
"""

from __future__ import annotations

import math

import pytest
import torch

from relattn.backends.base import Call
from relattn.problem import Problem

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def dense_attention(q, k, v, table, slopes, problem: Problem, dtype, extras=None):
    """The formula with dense (B, H, Nq, Nk) tensors in ``dtype`` (softmax included); the
    table's (B, H, Nq, Nk) bias and its column index go into ``extras`` when given."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    idx = torch.arange(hq, device=q.device) // (hq // hkv)
    q, k, v = q.to(dtype), k[:, idx].to(dtype), v[:, idx].to(dtype)
    s = (q @ k.transpose(-1, -2)) * problem.scale
    r = torch.arange(nq, device=q.device)[:, None]
    c = torch.arange(nk, device=q.device)[None, :]
    delta = problem.q_offset + r - c
    if table is not None:
        col = (delta - problem.lo).clamp(0, table.shape[1] - 1)
        bias = table.to(dtype)[:, col].expand(b, -1, -1, -1)
        if extras is not None:
            extras.update(bias=bias, col=col)
        s = s + bias
    if slopes is not None:
        s = s - slopes.to(dtype)[:, None, None] * delta.abs().to(dtype)
    vis = torch.ones(nq, nk, dtype=torch.bool, device=q.device)
    if problem.causal:
        vis &= delta >= 0
    if problem.window:
        vis &= delta < problem.window
        if not problem.causal:
            vis &= delta > -problem.window
    vis = vis.expand(b, 1, nq, nk)
    if problem.key_padding_mask is not None:
        vis = vis & problem.key_padding_mask[:, None, None, :]
    if problem.doc_ids is not None:
        ids = problem.doc_ids
        vis = vis & (
            ids[:, None, problem.q_offset : problem.q_offset + nq, None] == ids[:, None, None, :]
        )
    s = s.masked_fill(~vis, float("-inf"))
    any_vis = vis.any(-1, keepdim=True)
    w = torch.softmax(torch.where(any_vis, s, torch.zeros((), dtype=dtype, device=s.device)), -1)
    w = torch.where(vis, w, torch.zeros((), dtype=dtype, device=s.device))
    return w @ v


def grads(fn, q, k, v, table, slopes, problem, grad_out, dtype):
    """out, dq, dk, dv (and dtable) of ``fn`` with inputs cast to ``dtype`` (table: float32
    unless dtype is float64). In float64 with a table, also ``table_abs``: per table entry,
    Σ|∂L/∂score| over the scores it is added to (the rounding scale of its gradient)."""
    tdtype = torch.float64 if dtype == torch.float64 else torch.float32
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
    tab = None if table is None else table.detach().to(tdtype).requires_grad_(True)
    extras: dict = {}
    out = fn(*leaves, tab, slopes, problem, dtype, extras)
    named = {"q": leaves[0], "k": leaves[1], "v": leaves[2]}
    if tab is not None:
        named["table"] = tab
    scale = tab is not None and dtype == torch.float64
    wrt = list(named.values()) + ([extras["bias"]] if scale else [])
    gs = list(torch.autograd.grad(out, wrt, grad_out.to(out.dtype)))
    res = {"out": out.detach()}
    if scale:
        dscore = gs.pop().abs().sum(0).flatten(1)  # (H, Nq·Nk), summed over the batch
        table_abs = torch.zeros_like(tab).index_add_(1, extras["col"].flatten(), dscore)
        res["table_abs"] = table_abs
    return {**res, **dict(zip(named, gs, strict=True))}


def backend_grads(q, k, v, table, slopes, problem, grad_out):
    from relattn.backends.triton_backend import BACKEND

    call = Call(q, k, v, table, slopes, problem, BACKEND)
    out, lse = BACKEND.forward(call)
    dq, dk, dv, dtable = BACKEND.backward(call, grad_out, out, lse)
    res = {"out": out, "q": dq, "k": dk, "v": dv}
    if table is not None:
        res["table"] = dtable
    return res


def err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def check(got, truth, naive, naive32, dtype, label=""):
    for name in got:
        ref = naive32 if name == "table" else naive
        eps = torch.finfo(torch.float32 if name == "table" else dtype).eps
        bound = 2 * err(ref[name], truth[name]) + eps * (1 + truth[name].abs().max().item())
        assert torch.isfinite(got[name]).all(), f"{label}{name}: not finite"
        if name == "table":
            # Entry by entry: the float32 naive's error, plus 8 units of the entry's Σ|∂L/∂s|.
            excess = (got[name].double() - truth[name]).abs() - 8 * eps * truth["table_abs"]
            e = excess.max().item()
            assert e <= bound, (
                f"{label}{name}: error beyond 8 units of Σ|dS| {e:.3g} > {bound:.3g} "
                f"(largest Σ|dS| {truth['table_abs'].max().item():.3g})"
            )
            continue
        e = err(got[name], truth[name])
        assert e <= bound, f"{label}{name}: error {e:.3g} > {bound:.3g}"


def make(b, hq, hkv, nq, nk, d, dtype, seed, table=True, slopes=False, **kw):
    g = torch.Generator(device="cuda").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, device="cuda", generator=g)
    q = rnd(b, hq, nq, d).to(dtype)
    k, v = rnd(b, hkv, nk, d).to(dtype), rnd(b, hkv, nk, d).to(dtype)
    grad_out = rnd(b, hq, nq, d).to(dtype)
    causal = kw.get("causal", True)
    q_offset = kw.get("q_offset", 0)
    lo = 0 if causal else q_offset - (nk - 1)
    hi = q_offset + nq - 1
    tab = rnd(hq, hi - lo + 1) if table else None
    slo = torch.rand(hq, device="cuda", generator=g) * 0.1 if slopes else None
    problem = Problem(lo=lo, scale=1 / math.sqrt(d), **kw)
    return q, k, v, tab, slo, problem, grad_out


LARGE = {
    "n16k_d128_bf16_table": ((1, 2, 2, 16384, 16384, 128, torch.bfloat16), {}),
    "n8k_d128_fp16_alibi_window_bidir": (
        (1, 2, 1, 8192, 8192, 128, torch.float16),
        {"table": False, "slopes": True, "causal": False, "window": 700},
    ),
    "n4k_d64_bf16_gqa_ragged": ((2, 4, 2, 4000, 4000, 64, torch.bfloat16), {}),
    "decode_128_of_16k": ((1, 4, 1, 128, 16384, 128, torch.bfloat16), {"q_offset": 16384 - 128}),
    "split_kv_1_of_16k": ((2, 8, 2, 1, 16384, 128, torch.bfloat16), {"q_offset": 16383}),
    "split_kv_4_of_8k_alibi": (
        (1, 4, 4, 4, 8192, 64, torch.float16),
        {"table": False, "slopes": True, "q_offset": 8188},
    ),
}


@pytest.mark.parametrize("name", list(LARGE))
def test_large_against_float64(name):
    shape, kw = LARGE[name]
    q, k, v, table, slopes, problem, grad_out = make(*shape, seed=len(name), **kw)
    got = backend_grads(q, k, v, table, slopes, problem, grad_out)
    truth = grads(dense_attention, q, k, v, table, slopes, problem, grad_out, torch.float64)
    naive = grads(dense_attention, q, k, v, table, slopes, problem, grad_out, q.dtype)
    naive32 = grads(dense_attention, q, k, v, table, slopes, problem, grad_out, torch.float32)
    check(got, truth, naive, naive32, q.dtype, label=f"{name}: ")


def test_padding_and_documents_at_scale():
    b, n = 2, 3000
    ids = torch.zeros(b, n, dtype=torch.long, device="cuda")
    ids[:, 1000:] = 1
    ids[1, 2200:] = 2
    kpm = torch.ones(b, n, dtype=torch.bool, device="cuda")
    kpm[0, -300:] = False
    kpm[1, :77] = False
    q, k, v, table, slopes, problem, grad_out = make(
        b, 2, 1, n, n, 128, torch.bfloat16, seed=3, doc_ids=ids, key_padding_mask=kpm, window=900
    )
    got = backend_grads(q, k, v, table, slopes, problem, grad_out)
    truth = grads(dense_attention, q, k, v, table, slopes, problem, grad_out, torch.float64)
    naive = grads(dense_attention, q, k, v, table, slopes, problem, grad_out, q.dtype)
    naive32 = grads(dense_attention, q, k, v, table, slopes, problem, grad_out, torch.float32)
    check(got, truth, naive, naive32, q.dtype)


@pytest.mark.parametrize("kernel", ["attn_fwd", "attn_bwd_dq", "attn_bwd_dkdv"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_every_kept_config(kernel, head_dim):
    """Each config pruning keeps on this GPU gives the same answer (ragged N, every mask)."""
    from relattn.backends import triton_kernels as K

    n = 1000
    kpm = torch.ones(2, n, dtype=torch.bool, device="cuda")
    kpm[1, -123:] = False
    q, k, v, table, slopes, problem, grad_out = make(
        2, 2, 1, n, n, head_dim, torch.bfloat16, seed=head_dim, key_padding_mask=kpm, window=333
    )
    truth = grads(dense_attention, q, k, v, table, slopes, problem, grad_out, torch.float64)
    naive = grads(dense_attention, q, k, v, table, slopes, problem, grad_out, q.dtype)
    naive32 = grads(dense_attention, q, k, v, table, slopes, problem, grad_out, torch.float32)
    configs = K.kept_configs(kernel, head_dim, 2, K.device_shared_memory(q.device.index))
    assert configs, f"pruning keeps no config of {kernel} at D={head_dim}"
    for config in configs:
        with K.forced_config(kernel, config):
            got = backend_grads(q, k, v, table, slopes, problem, grad_out)
        check(got, truth, naive, naive32, q.dtype, label=f"{kernel} {config}: ")


def test_deterministic_mode_is_bit_identical():
    q, k, v, table, slopes, problem, grad_out = make(1, 4, 2, 4096, 4096, 128, torch.bfloat16, 9)
    fast = backend_grads(q, k, v, table, slopes, problem, grad_out)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = backend_grads(q, k, v, table, slopes, problem, grad_out)
        second = backend_grads(q, k, v, table, slopes, problem, grad_out)
    finally:
        torch.use_deterministic_algorithms(was)
    for name in first:
        assert torch.equal(first[name], second[name]), f"{name} differs between runs"
    tol = 1e-4 * (1 + fast["table"].abs().max().item())
    assert err(first["table"], fast["table"]) <= tol  # the band sums agree with the atomics


def test_torch_compile_fullgraph_on_cuda():
    import relattn
    from relattn.pe import T5Bias

    pe = T5Bias(4).cuda()
    q, k, v = (
        torch.randn(2, 4, 1024, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for _ in "qkv"
    )
    f = lambda q, k, v: relattn.attention(q, k, v, pe, backend="triton")
    eager = f(q, k, v)
    eager_grads = torch.autograd.grad(eager.float().square().sum(), [q, k, v, pe.weight])
    compiled = torch.compile(f, fullgraph=True)(q, k, v)
    comp_grads = torch.autograd.grad(compiled.float().square().sum(), [q, k, v, pe.weight])
    assert torch.equal(compiled, eager)
    for a, b in zip(comp_grads, eager_grads, strict=True):
        assert err(a, b) <= 1e-3 * (1 + b.abs().max().item())


def test_chunked_fallback_on_cuda():
    """Without triton, CUDA tensors go through the chunked backend: same answer as reference."""
    import relattn
    from relattn.pe import ALiBi

    pe = ALiBi(4, learnable=True).cuda()
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(1, 4, 1500, 64, device="cuda", generator=g) for _ in "qkv")
    res = {}
    for backend in ("chunked", "reference"):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = relattn.attention(*leaves, pe, backend=backend)
        gs = torch.autograd.grad(out.square().sum(), [*leaves, pe._slopes])
        res[backend] = [out, *gs]
    for a, b in zip(res["chunked"], res["reference"], strict=True):
        assert err(a, b) <= 1e-4 * (1 + b.abs().max().item())
