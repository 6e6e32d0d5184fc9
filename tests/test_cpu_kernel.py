"""The fused C++ CPU kernel (``backend="cpu_kernel"``): its build and fallback, its exactness on
small tiles (online softmax across key tiles, several query blocks, the ATen fallback for the
matrix products), ``auto``'s choice, and that a pass dispatches O(1) ATen ops from Python.

The conformance suite runs it on every encoding × mask × shape too (it is in ``BACKENDS``).
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from cases import check_fp32, make_case
from oracle import run_math, run_relattn
from torch.utils._python_dispatch import TorchDispatchMode

import relattn
from relattn._machine import CPU
from relattn.backends import Call, chunked, cpu_kernel
from relattn.problem import Problem

OFF = os.environ.get("RELATTN_CPU_KERNEL", "1") == "0"
pytestmark = pytest.mark.skipif(OFF, reason="RELATTN_CPU_KERNEL=0")


def test_the_kernel_builds():
    """One clear failure where the extension cannot be built (the conformance suite skips)."""
    mod = cpu_kernel.load()
    assert cpu_kernel.build_error() is None
    assert hasattr(mod, "forward") and hasattr(mod, "backward")


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 7 query rows and 16 keys: many blocks, the online softmax across tiles."""
    monkeypatch.setattr(cpu_kernel, "BLOCK_M", 7)
    monkeypatch.setattr(cpu_kernel, "BLOCK_N", 16)


def _has_tiles() -> bool:
    return cpu_kernel.load().products_for(16).startswith("tiles")


@pytest.fixture(params=["tiles", "tiles-avx2", "blas", "aten"])
def gemm(request):
    """The kernel's own tile products (float32: AVX-512 where the CPU has it, and the AVX2 + FMA
    version, run on an AVX-512 CPU too), the exported BLAS, and the nested at::addmm_
    fallback."""
    mod = cpu_kernel.load()
    if request.param.startswith("tiles") and not _has_tiles():
        pytest.skip("this CPU has neither AVX2 + FMA nor AVX-512: the kernel uses BLAS")
    mod.set_products(request.param)
    yield request.param
    mod.set_products("tiles")


@pytest.mark.parametrize("enc", ["t5", "alibi", "kerple_log", "none"])
@pytest.mark.parametrize(
    "mask",
    ["causal", "bidirectional", "window", "q_offset", "neg_q_offset", "doc_ids", "key_padding"],
)
def test_small_tiles_against_float64(small_tiles, gemm, enc, mask):
    """Out and every gradient (the table's too) against float64 math and the reference, with
    GQA, odd N and rows that see no key, across many tiles."""
    check_fp32("cpu_kernel", enc, mask, (2, 4, 2, 37, 16))


@pytest.fixture(params=["bf16-tiles", "widened"])
def bf16_path(request):
    """bfloat16's two paths: bf16 tile products (AVX-512-BF16, where the CPU has it) and the
    inputs widened to float32."""
    mod = cpu_kernel.load()
    tiles = request.param == "bf16-tiles"
    if tiles and not mod.bf16_products_for(64):
        pytest.skip("this CPU has no AVX-512-BF16 (or the build is AVX2-only): bf16 is widened")
    mod.set_bf16_products(tiles)
    yield request.param
    mod.set_bf16_products(True)


@pytest.mark.parametrize("enc", ["t5", "alibi", "none"])
@pytest.mark.parametrize(
    "mask",
    ["causal", "bidirectional", "window_bidir", "neg_q_offset", "doc_ids", "key_padding"],
)
@pytest.mark.parametrize("tiles", ["small", "default"])
def test_bfloat16_paths_against_float64(bf16_path, enc, mask, tiles, monkeypatch):
    """Out and every gradient in bfloat16 by both paths, against float64 with the 16-bit
    criterion: small tiles (7 rows, an odd count, and 16 keys: tiles that start and end on odd
    keys, single keys at their ends) at D = 32, and the default tiles at D = 64."""
    from cases import check_low_precision

    shape = (2, 4, 2, 37, 32)
    if tiles == "small":
        monkeypatch.setattr(cpu_kernel, "BLOCK_M", 7)
        monkeypatch.setattr(cpu_kernel, "BLOCK_N", 16)
    else:
        shape = (1, 4, 2, 300, 64)
    check_low_precision("cpu_kernel", enc, mask, shape, torch.bfloat16)
    want = "bfloat16 tiles" if bf16_path == "bf16-tiles" else "bfloat16 widened"
    assert cpu_kernel.compute_path(torch.bfloat16, shape[-1]).startswith(want)


def test_16bit_paths_are_named():
    mod = cpu_kernel.load()
    assert cpu_kernel.compute_path(torch.float16, 64).startswith("float16 widened to float32")
    assert cpu_kernel.compute_path(torch.bfloat16, 48).startswith("bfloat16 widened")  # D % 32
    bf16 = cpu_kernel.compute_path(torch.bfloat16, 64)
    assert bf16.startswith("bfloat16 tiles (AVX-512-BF16)") == mod.bf16_products_for(64)
    with pytest.raises(ValueError, match="dtype"):
        cpu_kernel.compute_path(torch.int8, 64)


@pytest.mark.parametrize("shape", [(1, 4, 1, 50, 16), (1, 2, 2, 5, 8), (2, 2, 1, 1, 16)])
def test_shapes_against_float64(small_tiles, shape):
    """MQA, Nk smaller than a tile, N = 1."""
    check_fp32("cpu_kernel", "t5", "cross_bidir", shape)


@pytest.mark.parametrize("d", [8, 24, 48, 80, 128])
def test_head_dims_against_float64(small_tiles, gemm, d):
    """Head dims that the own products take (multiples of 16: whole 64-column blocks and
    one-vector remainders) and that go to BLAS (8, 24), Nk not a multiple of 16."""
    check_fp32("cpu_kernel", "t5", "causal", (1, 3, 1, 29, d))
    check_fp32("cpu_kernel", "alibi", "window", (1, 2, 2, 21, d))


@pytest.mark.parametrize("mask", ["causal", "bidirectional", "window", "doc_ids", "key_padding"])
@pytest.mark.parametrize("enc", ["t5", "alibi"])
def test_transposed_products_against_float64(small_tiles, gemm, enc, mask):
    """From 512 query rows per kv head the own products also take q kᵀ and dO vᵀ (k and v
    transposed once per call, zero-padded past Nk): GQA 4:1 with 131 rows, Nk not a multiple
    of 16."""
    check_fp32("cpu_kernel", enc, mask, (1, 4, 1, 131, 16))


@pytest.mark.parametrize("mask", ["causal", "doc_ids", "window"])
def test_default_tiles_against_float64(gemm, mask):
    """The kernel's own tile sizes (128 x 256) and head dim 64, with enough rows per kv head
    (GQA 2:1, 520 rows) for the transposed products: several query blocks, full and partial
    key tiles."""
    check_fp32("cpu_kernel", "t5", mask, (1, 4, 2, 520, 64))


def test_products_name_the_path():
    """What multiplies the tiles, as the benchmarks report it; unknown names are refused."""
    mod = cpu_kernel.load()
    flags = CPU.flags
    if {"avx2", "fma"} <= flags:
        avx512 = {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags
        capped = os.environ.get("RELATTN_CPU_KERNEL_ISA", "").lower() == "avx2"
        want = "tiles (AVX-512)" if avx512 and not capped else "tiles (AVX2)"
        assert mod.products_for(64) == want
    assert mod.products_for(24) in ("blas", "aten")
    try:
        mod.set_products("tiles-avx2")
        if _has_tiles():
            assert mod.products_for(64) == "tiles (AVX2)"
        mod.set_products("blas")
        assert mod.products_for(64) in ("blas", "aten")
        with pytest.raises(RuntimeError, match="products must be"):
            mod.set_products("fast")
    finally:
        mod.set_products("tiles")


def _fwd_bwd(module, q, k, v, table, slopes, problem, grad_out):
    backend = module.BACKEND
    call = Call(q, k, v, table, slopes, problem, backend)
    out, lse = backend.forward(call)
    return (out, lse, *backend.backward(call, grad_out, out, lse))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pe", ["table", "slopes", "none"])
@pytest.mark.parametrize(
    "causal, q_offset, window, nq, nk",
    [(True, 0, 0, 70, 70), (False, 0, 0, 33, 90), (True, 60, 0, 30, 90), (True, 0, 9, 70, 70),
     (False, 3, 5, 40, 45), (True, -20, 0, 40, 40)],
)  # fmt: skip
def test_backend_against_chunked(small_tiles, dtype, pe, causal, q_offset, window, nq, nk):
    """The backend protocol directly (lse, dtable included) against the chunked backend; float64
    to float64 precision."""
    g = torch.Generator().manual_seed(nq * 1000 + nk)
    b, hq, hkv, d = 2, 4, 2, 8
    q = torch.randn(b, hq, nq, d, generator=g, dtype=dtype)
    k, v = (torch.randn(b, hkv, nk, d, generator=g, dtype=dtype) for _ in range(2))
    grad_out = torch.randn(b, hq, nq, d, generator=g, dtype=dtype)
    lo = q_offset - (nk - 1)
    table = torch.randn(hq, nq + nk - 1, generator=g, dtype=dtype) if pe == "table" else None
    slopes = torch.rand(hq, generator=g, dtype=dtype) if pe == "slopes" else None
    problem = Problem(lo=lo, scale=d**-0.5, causal=causal, q_offset=q_offset, window=window)
    want = _fwd_bwd(chunked, q, k, v, table, slopes, problem, grad_out)
    got = _fwd_bwd(cpu_kernel, q, k, v, table, slopes, problem, grad_out)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for name, w, x in zip(["out", "lse", "dq", "dk", "dv", "dtable"], want, got, strict=True):
        if w is None:
            assert x is None
            continue
        assert x.dtype == w.dtype and x.shape == w.shape, name
        torch.testing.assert_close(x, w, rtol=tol, atol=tol, msg=name)


def test_huge_scores_across_tiles(small_tiles):
    """Scores near -1e4 in float32 across several key tiles: the backward recomputes the rows'
    statistics rather than trusting the float32 lse (off by exp(|lse|·2⁻²⁴))."""
    q, k, v, pe, grad_out, kw = make_case("alibi", "causal", (1, 2, 2, 40, 16), torch.float32)
    direction = torch.ones(16) / 4
    q = q * 0.3 + direction * 200
    k = k * 0.3 - direction * 200
    got = run_relattn(q, k, v, pe, grad_out, "cpu_kernel", **kw)
    truth = run_math(q, k, v, pe, grad_out, torch.float64, **kw)
    ref = run_relattn(q, k, v, pe, grad_out, "chunked", **kw)
    for name in truth:
        err = (got[name].double() - truth[name]).abs().max().item()
        err_ref = (ref[name].double() - truth[name]).abs().max().item()
        assert err <= 2 * err_ref + 1e-5, (name, err, err_ref)


@pytest.mark.parametrize("slope", [28.9, 29.2, 43.6, 44.2, 90.0])
def test_weights_at_the_float32_exponential_edges(small_tiles, slope):
    """The kernel's float32 exponential is a polynomial clamped to [-88, 88]: weights
    exp(-slope·Δ) for Δ = 1, 2, 3 fall just above, across and below float32's smallest normal
    (exp(-87.3)) and to exactly 0; out and every gradient match float64 math and chunked."""
    n = 40
    q = torch.zeros(1, 2, n, 16)
    k = torch.zeros(1, 2, n, 16)
    v = torch.randn(1, 2, n, 16)
    grad_out = torch.randn(1, 2, n, 16)
    pe = relattn.pe.ALiBi(2, learnable=True, slopes=[slope, slope / 3])
    got = run_relattn(q, k, v, pe, grad_out, "cpu_kernel", causal=True)
    truth = run_math(q, k, v, pe, grad_out, torch.float64, causal=True)
    ref = run_relattn(q, k, v, pe, grad_out, "chunked", causal=True)
    for name in truth:
        assert torch.isfinite(got[name]).all(), name
        err = (got[name].double() - truth[name]).abs().max().item()
        err_ref = (ref[name].double() - truth[name]).abs().max().item()
        assert err <= 2 * err_ref + 1e-5, (name, err, err_ref)


def test_a_nan_query_row_is_nan_and_leaves_the_others(small_tiles):
    """NaN scores stay NaN (documented): a NaN in one query row makes that row's output NaN
    and no other row's, in out and in dq (the others match chunked)."""
    q, k, v, pe, grad_out, kw = make_case("t5", "causal", (1, 2, 2, 37, 16), torch.float32)
    q[0, 1, 20, 3] = float("nan")
    got = run_relattn(q, k, v, pe, grad_out, "cpu_kernel", **kw)
    ref = run_relattn(q, k, v, pe, grad_out, "chunked", **kw)
    out = got["out"]
    assert out[0, 1, 20].isnan().all()
    others = torch.ones(out.shape[:3], dtype=torch.bool)
    others[0, 1, 20] = False
    assert not out[others].isnan().any()
    torch.testing.assert_close(out[others], ref["out"][others], rtol=1e-5, atol=1e-5)
    dq = got["q"]
    assert dq[0, 1, 20].isnan().all() and not dq[others].isnan().any()
    torch.testing.assert_close(dq[others], ref["q"][others], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- auto


def _inputs(n, dtype=torch.float32):
    q = torch.randn(1, 2, n, 16, dtype=dtype)
    return q, q.clone(), Problem(lo=-(n - 1), scale=0.25)


def test_auto_prefers_the_kernel_for_long_float_inputs():
    q, k, p = _inputs(300)
    assert relattn.backends.choose("auto", q, k, p).name == "cpu_kernel"
    q64, k64, p = _inputs(300, torch.float64)
    assert relattn.backends.choose("auto", q64, k64, p).name == "cpu_kernel"
    q, k, p = _inputs(64)  # few rows: decode
    assert relattn.backends.choose("auto", q, k, p).name == "decode"
    for dt in (torch.bfloat16, torch.float16):
        q, k, p = _inputs(300, dt)
        assert relattn.backends.choose("auto", q, k, p).name == "cpu_kernel"
    q = torch.zeros(1, 2, 300, 16, dtype=torch.int32)
    k = q.clone()
    with pytest.raises(RuntimeError, match="float32, float64, bfloat16 or float16"):
        relattn.backends.choose("cpu_kernel", q, k, p)


def test_failed_build_falls_back_to_chunked_and_is_not_retried(monkeypatch):
    calls = []

    def broken():
        calls.append(1)
        raise OSError("no C++ compiler here")

    monkeypatch.setattr(cpu_kernel, "_module", None)
    monkeypatch.setattr(cpu_kernel, "_error", None)
    monkeypatch.setattr(cpu_kernel, "_build", broken)
    q, k, p = _inputs(300)
    v = torch.randn_like(q)
    with pytest.warns(UserWarning, match="no C.. compiler here"):
        with pytest.raises(RuntimeError, match="no C.. compiler here"):
            cpu_kernel.load()
    assert not cpu_kernel.available()
    assert relattn.backends.choose("auto", q, k, p).name == "chunked"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        out = relattn.attention(q, k, v, causal=True)
        with pytest.raises(RuntimeError, match="could not be built: OSError: no C.. compiler"):
            relattn.attention(q, k, v, backend="cpu_kernel")
    assert len(calls) == 1
    want = relattn.attention(q, k, v, backend="chunked")
    torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_no_toolchain_means_auto_never_tries(monkeypatch):
    """Without ninja or a compiler, auto does not pick the kernel, and no build is tried."""
    monkeypatch.setattr(cpu_kernel, "_module", None)
    monkeypatch.setattr(cpu_kernel, "_error", None)
    monkeypatch.setattr(cpu_kernel, "_toolchain", lambda: False)
    q, k, p = _inputs(300)
    assert relattn.backends.choose("auto", q, k, p).name == "chunked"
    assert cpu_kernel._module is None and cpu_kernel._error is None


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("RELATTN_CPU_KERNEL", "0")
    q, k, p = _inputs(300)
    assert relattn.backends.choose("auto", q, k, p).name == "chunked"
    with pytest.raises(RuntimeError, match="RELATTN_CPU_KERNEL=0"):
        relattn.backends.choose("cpu_kernel", q, k, p)


def test_backward_memory_bound_limits_the_threads_not_the_answer(monkeypatch):
    """With the per-thread buffers capped at one, the backward (2 threads) gives what it gives
    uncapped, up to summation order; and the cap follows the machine's memory."""
    g = torch.Generator().manual_seed(5)
    q, k, v, grad = (torch.randn(1, 4, 300, 16, generator=g, dtype=torch.float64) for _ in range(4))
    table = torch.randn(4, 599, generator=g, dtype=torch.float64)
    problem = Problem(lo=-299, scale=0.25, causal=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out, lse = cpu_kernel.forward(q, k, v, table, None, problem)
        call = Call(q, k, v, table, None, problem, cpu_kernel.BACKEND)
        want = cpu_kernel.backward(call, grad, out, lse)
        monkeypatch.setattr(cpu_kernel, "max_slots", lambda *a: 1)
        got = cpu_kernel.backward(call, grad, out, lse)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    monkeypatch.undo()
    big = torch.empty(1, 8, 32768, 64)  # a 128 MiB buffer per thread (fp32 dk + dv)
    monkeypatch.setattr(cpu_kernel, "_physical_memory", lambda: 16 << 30)
    assert cpu_kernel.max_slots(big, big, False) == 12  # 10 % of 16 GiB
    monkeypatch.setattr(cpu_kernel, "_physical_memory", lambda: 0)
    assert cpu_kernel.max_slots(big, big, False) == 8  # the 1 GiB floor
    assert cpu_kernel.max_slots(big[:, :, :8], big[:, :, :8], True) > 1000


def test_isa_switch_is_a_separate_build(monkeypatch):
    """RELATTN_CPU_KERNEL_ISA=avx2 (the benchmarks' AVX2-class setting) compiles without the
    AVX-512 clone, under its own cached name, never reusing the default build."""
    monkeypatch.delenv("RELATTN_CPU_KERNEL_ISA", raising=False)
    default_flags, default_name = cpu_kernel._cflags(), cpu_kernel._name()
    assert "-DRELATTN_ISA_AVX2" not in default_flags
    monkeypatch.setenv("RELATTN_CPU_KERNEL_ISA", "avx2")
    assert "-DRELATTN_ISA_AVX2" in cpu_kernel._cflags()
    assert cpu_kernel._name() != default_name
    assert "RELATTN_ISA_AVX2" in cpu_kernel.SOURCE.read_text()


# ----------------------------------------------------------------------------- O(1) ops


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def _ops_of_a_training_step(backend, n):
    """ATen ops dispatched from Python by the backend's forward and backward (called directly:
    through the custom op a dispatch mode would see one op)."""
    g = torch.Generator().manual_seed(n)
    q, k, v, grad_out = (torch.randn(1, 2, n, 16, generator=g) for _ in range(4))
    table = torch.randn(2, n, generator=g)
    problem = Problem(lo=0, scale=0.25)
    _fwd_bwd(backend, q, k, v, table, None, problem, grad_out)  # warm (and build)
    with _CountOps() as mode:
        _fwd_bwd(backend, q, k, v, table, None, problem, grad_out)
    return mode.ops


def test_a_training_step_dispatches_o1_ops(small_tiles, monkeypatch):
    """Forward + backward dispatch as many ATen ops at 64 query blocks as at 8, where the
    chunked backend dispatches a few per block: the kernel's per-tile work stays inside its
    one parallel region per pass."""
    few, many = _ops_of_a_training_step(cpu_kernel, 56), _ops_of_a_training_step(cpu_kernel, 448)
    assert few == many and many < 40, (few, many)
    monkeypatch.setattr(chunked, "BLOCK_M", 7)
    chunked_few = _ops_of_a_training_step(chunked, 56)
    chunked_many = _ops_of_a_training_step(chunked, 448)
    assert chunked_many > 4 * chunked_few and chunked_few > many, (chunked_few, chunked_many)


def test_params_struct_is_filled_by_name_and_checked():
    """The kernel takes one Params struct; one left unset is a clear error, not a crash, and
    the struct filled by cpu_kernel._params gives the backend's own answer."""
    mod = cpu_kernel.load()
    q, k, v = (torch.randn(1, 2, 5, 16) for _ in range(3))
    problem = Problem(lo=0, scale=0.25, q_offset=0)
    with pytest.raises(RuntimeError, match="every tensor of Params must be set"):
        mod.forward(mod.Params())
    params = cpu_kernel._params(mod, q, k, v, torch.empty(0), torch.empty(0), problem)
    assert (params.lo, params.scale, params.causal, params.q_offset) == (0, 0.25, True, 0)
    out, lse = mod.forward(params)
    want, want_lse = chunked.forward(q, k, v, None, None, problem)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-6)
