"""The Triton backend's own suite: every feature of its kernels against the reference backend and
float64 math (conftest), run on CPU through Triton's interpreter when there is no GPU.

Shapes are tiny (the interpreter runs every tile in numpy) but cross several 16×16 tiles, with
ragged edges, so the three loop stages, the block skipping and the per-tile table reduction all
run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Triton reads this when a kernel is decorated; the backend also loads its kernels per mode.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from cases import ENCODINGS, randomize
from oracle import assert_close_f64, assert_flash_accuracy, run_math, run_relattn, seed_of

import relattn  # noqa: E402
from relattn.pe import OffsetBias, T5Bias  # noqa: E402
from relattn.problem import Problem  # noqa: E402

SRC = Path(relattn.__file__).resolve().parents[1]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _encoding(name: str, h: int, g: torch.Generator):
    """The conformance suite's encoding ``name`` (tests/cases.py), randomized from ``g``."""
    return ENCODINGS[name](h, None, g)


def _doc_ids(b: int, nk: int) -> torch.Tensor:
    d = torch.zeros(b, nk, dtype=torch.long)
    d[:, nk // 3 :] = 1
    d[-1, 2 * nk // 3 :] = 2
    return d


def _padding(b: int, nk: int) -> torch.Tensor:
    m = torch.ones(b, nk, dtype=torch.bool)
    m[0, -7:] = False  # right padding
    m[-1, :5] = False  # left padding, and a hole
    m[-1, 20] = False
    return m


# name: (encoding, (B, Hq, Hkv, Nq, Nk, D), attention kwargs)
CASES = {
    "t5_gqa_ragged": ("t5", (2, 4, 2, 37, 37, 16), {}),
    "offset_mqa": ("offset", (1, 4, 1, 24, 24, 16), {}),
    "alibi_fixed": ("alibi", (2, 2, 2, 33, 33, 16), {}),
    "alibi_learnable": ("alibi_learnable", (1, 2, 1, 33, 33, 16), {}),
    "kerple_log": ("kerple_log", (1, 2, 2, 29, 29, 16), {}),
    "kerple_power": ("kerple_power", (1, 2, 2, 29, 29, 16), {}),
    "none_d32": ("none", (1, 2, 2, 50, 50, 32), {}),
    "long_n128": ("t5", (1, 1, 1, 128, 128, 16), {}),
    "decode_q_offset": ("t5", (1, 2, 1, 13, 40, 16), {"q_offset": 27}),
    "negative_q_offset": ("offset", (2, 2, 2, 20, 30, 16), {"q_offset": -5}),
    "nq_gt_nk": ("t5", (1, 2, 2, 30, 20, 16), {"q_offset": 3}),
    "bidirectional": ("t5_bidir", (1, 2, 1, 35, 35, 16), {"causal": False}),
    "bidir_offset": ("offset_bidir", (1, 2, 2, 20, 33, 16), {"causal": False, "q_offset": 6}),
    "window": ("alibi_learnable", (1, 2, 2, 45, 45, 16), {"window": 9}),
    "window_bidir": ("offset_bidir", (1, 2, 2, 40, 40, 16), {"causal": False, "window": 7}),
    "doc_ids": ("t5", (2, 2, 1, 40, 40, 16), {"doc_ids": _doc_ids}),
    "key_padding": ("kerple_log", (2, 2, 2, 36, 36, 16), {"key_padding_mask": _padding}),
    "doc_pad_window": (
        "alibi",
        (2, 2, 2, 40, 40, 16),
        {"doc_ids": _doc_ids, "key_padding_mask": _padding, "window": 12},
    ),
}


def make_case(name: str, dtype: torch.dtype = torch.float32):
    enc_name, (b, hq, hkv, nq, nk, d), kw = CASES[name]
    g = torch.Generator().manual_seed(seed_of("triton", name))
    kw = {k: (v(b, nk) if callable(v) else v) for k, v in kw.items()}
    q = torch.randn(b, hq, nq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, nk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, nk, d, generator=g).to(dtype)
    grad_out = torch.randn(b, hq, nq, d, generator=g).to(dtype)
    return q, k, v, _encoding(enc_name, hq, g), grad_out, kw


def triton_run(q, k, v, pe, grad_out, kw) -> dict[str, torch.Tensor]:
    """relattn with backend="triton" on DEVICE (the interpreter on CPU); results on the CPU."""
    res = run_relattn(q, k, v, pe, grad_out, "triton", device=DEVICE, **kw)
    return {n: t.detach().cpu() for n, t in res.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_and_float64(name):
    q, k, v, pe, grad_out, kw = make_case(name)
    got = triton_run(q, k, v, pe, grad_out, kw)
    ref = run_relattn(q, k, v, pe, grad_out, "reference", **kw)
    truth = run_math(q, k, v, pe, grad_out, torch.float64, **kw)
    assert_close_f64(got, truth, label="triton vs float64: ")
    assert_close_f64(got, ref, label="triton vs reference: ")


def test_rows_without_keys_are_zero_not_nan():
    """q_offset < 0 hides every key from the first rows; a fully padded batch row hides all."""
    q, k, v, pe, grad_out, kw = make_case("negative_q_offset")
    pad = torch.ones(q.shape[0], k.shape[2], dtype=torch.bool)
    pad[1] = False
    got = triton_run(q, k, v, pe, grad_out, {"key_padding_mask": pad, **kw})
    for name, t in got.items():
        assert torch.isfinite(t).all(), name
    assert torch.equal(got["out"][:, :, :5], torch.zeros_like(got["out"][:, :, :5]))
    assert torch.equal(got["out"][1], torch.zeros_like(got["out"][1]))
    assert torch.equal(got["q"][1], torch.zeros_like(got["q"][1]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", ["t5_gqa_ragged", "window", "alibi_fixed"])
def test_low_precision_accuracy(name, dtype):
    """FlashAttention's criterion: error vs float64 at most 2× naive attention in the dtype."""
    q, k, v, pe, grad_out, kw = make_case(name, dtype)
    got = triton_run(q, k, v, pe, grad_out, kw)
    assert got["out"].dtype == dtype
    truth = run_math(q, k, v, pe, grad_out, torch.float64, **kw)
    naive = run_math(q, k, v, pe, grad_out, dtype, **kw)
    assert_flash_accuracy(got, naive, truth, dtype, label=f"triton {dtype}: ")


@pytest.mark.parametrize("name", ["t5_gqa_ragged", "bidir_offset", "doc_pad_window"])
def test_deterministic_gradients_are_bit_identical(name):
    q, k, v, pe, grad_out, kw = make_case(name)
    fast = triton_run(q, k, v, pe, grad_out, kw)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = triton_run(q, k, v, pe, grad_out, kw)
        second = triton_run(q, k, v, pe, grad_out, kw)
    finally:
        torch.use_deterministic_algorithms(was)
    for n in first:
        assert torch.equal(first[n], second[n]), f"{n} differs between deterministic runs"
    # The deterministic table gradient (per-band sums) agrees with the atomic one.
    assert_close_f64(first, fast, label="deterministic vs atomic: ")


def test_table_gradient_of_clipped_offsets():
    """Far offsets share OffsetBias's last column: its gradient sums every far diagonal."""
    q, k, v, _, grad_out, kw = make_case("long_n128")
    pe = randomize(OffsetBias(1, max_offset=3), torch.Generator().manual_seed(3))
    got = triton_run(q, k, v, pe, grad_out, {})
    truth = run_math(q, k, v, pe, grad_out, torch.float64)
    assert_close_f64(got, truth, label="triton vs float64: ")


def test_unsupported_reasons(monkeypatch):
    from relattn.backends import triton_backend
    from relattn.backends.triton_backend import BACKEND

    problem = Problem(lo=0, scale=0.25)
    q = torch.zeros(1, 1, 4, 16, device=DEVICE)
    assert BACKEND.unsupported(q, q, problem) is None
    assert "dtype" in BACKEND.unsupported(q.double(), q.double(), problem)
    big = torch.zeros(1, 1, 4, 256, device=DEVICE)
    assert "head dim" in BACKEND.unsupported(big, big, problem)
    monkeypatch.setattr(triton_backend, "_interpreting", lambda: False)
    q = q.cpu()
    assert "CUDA" in BACKEND.unsupported(q, q, problem)
    with pytest.raises(RuntimeError, match="backend='triton' cannot run"):
        relattn.attention(q, q, q, backend="triton")
    monkeypatch.setattr(triton_backend, "_installed", lambda: False)
    assert "not installed" in BACKEND.unsupported(q, q, problem)


def test_backend_protocol():
    from relattn.backends.triton_backend import BACKEND, TritonBackend

    assert isinstance(BACKEND, TritonBackend)
    assert BACKEND.name == "triton" and BACKEND.autograd is False
    q = torch.zeros(1, 1, 4, 16)
    # The interpreter is for tests: auto dispatch never picks triton for CPU tensors.
    assert BACKEND.priority(q, q, Problem(lo=0, scale=0.25)) is None
    if torch.cuda.is_available():
        problem = Problem(lo=0, scale=0.25)
        half = q.cuda().bfloat16()
        priority = BACKEND.priority(half, half, problem)
        assert priority is not None and priority > 0
        # Exact float32 (no TF32) is left to chunked's matmuls.
        assert BACKEND.priority(q.cuda(), q.cuda(), problem) is None


def test_importing_the_backend_does_not_import_triton():
    """CPU users never pay for importing triton: not at import, not on a CPU call."""
    code = (
        "import sys, torch, relattn; import relattn.backends.triton_backend as t; "
        "q = torch.randn(1, 1, 8, 16); relattn.attention(q, q, q); "
        "t.BACKEND.priority(q, q, None); print('triton' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


def test_explicit_backend_error_names_the_reason():
    q = torch.zeros(1, 1, 4, 16, dtype=torch.float64, device=DEVICE)
    with pytest.raises(RuntimeError, match="float64"):
        relattn.attention(q, q, q, backend="triton")


def test_interpreter_mode_change_is_reported(monkeypatch):
    """Kernels are decorated in one mode when first imported; a later change gets a reason."""
    from relattn.backends import triton_backend

    kernels = triton_backend._kernels()
    q = torch.zeros(1, 1, 4, 16, device=DEVICE)
    problem = relattn.Problem(lo=0, scale=1.0)
    assert triton_backend.BACKEND.unsupported(q, q, problem) is None
    monkeypatch.setattr(kernels, "INTERPRET", not kernels.INTERPRET)
    assert "TRITON_INTERPRET changed" in triton_backend.BACKEND.unsupported(q, q, problem)


def test_gpu_benchmark_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the benchmark would run")
    from relattn.benchmarking import gpu

    with pytest.raises(RuntimeError, match="CUDA"):
        gpu.run(quick=True)


def _ends_in_torch(table: torch.Tensor) -> torch.Tensor:
    """(H, 2): the last column equal to the first from the start, the first equal to the last
    through the end (exact comparison)."""
    t = table.shape[1]
    rows = []
    for row in table:
        head = int((row != row[0]).nonzero()[0]) if (row != row[0]).any() else t
        tail = int((row != row[-1]).nonzero()[-1]) + 1 if (row != row[-1]).any() else 0
        rows.append([head - 1, tail])
    return torch.tensor(rows, dtype=torch.int32)


def test_table_ends_kernel():
    from relattn.backends import triton_backend
    from relattn.backends.triton_kernels import TABLE_ENDS_BLOCK

    t = 3 * TABLE_ENDS_BLOCK + 5  # several chunks and a ragged one
    g = torch.Generator().manual_seed(0)
    table = torch.randn(6, t, generator=g)
    table[0, :7] = table[0, 0]  # a constant head
    table[1, 40:] = table[1, -1]  # a constant tail
    table[2] = 1.5  # constant throughout
    table[3, 10:] = table[3, -1]
    table[3, 20] = float("nan")  # a NaN breaks the run
    table[4, :] = float("-inf")
    q = torch.zeros(1, 6, 4, 16, device=DEVICE)
    launch = triton_backend._Launch(
        triton_backend._kernels(), q, q, q, table.to(DEVICE), None, Problem(lo=0, scale=1.0)
    )
    got = launch.table_ends(triton_backend._kernels()).cpu()
    assert torch.equal(got, _ends_in_torch(table)), (got, _ends_in_torch(table))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_constant_table_runs_give_the_same_bits(monkeypatch, causal):
    """Key blocks inside the table's constant tail (T5 past max_distance) or head (its negative
    side) add one loaded value: the results equal those of the per-score loads bit for bit
    (deterministic mode, so the table gradient's order is fixed on a GPU too)."""
    from relattn.backends import triton_backend

    g = torch.Generator().manual_seed(5)
    q, k, v, grad_out = (torch.randn(1, 2, 70, 16, generator=g) for _ in range(4))
    pe = randomize(T5Bias(2, 8, 12, bidirectional=not causal), g)
    kw = {"causal": causal}
    sentinel = lambda self, K: torch.tensor(
        [[-1, self.t]] * self.hq, dtype=torch.int32, device=self.q.device
    )
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        fast = triton_run(q, k, v, pe, grad_out, kw)
        monkeypatch.setattr(triton_backend._Launch, "table_ends", sentinel)
        slow = triton_run(q, k, v, pe, grad_out, kw)
    finally:
        torch.use_deterministic_algorithms(was)
    for name in fast:
        assert torch.equal(fast[name], slow[name]), name
    truth = run_math(q, k, v, pe, grad_out, torch.float64, **kw)
    assert_close_f64(fast, truth, label="triton vs float64: ")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("shape", ["constant", "long_head", "long_tail"])
def test_tables_with_long_constant_runs_match_float64(causal, shape):
    """A table constant throughout, or over a long run at either end (every block of a row may
    fall in a constant run, on the diagonal's side too): out and gradients against float64."""
    g = torch.Generator().manual_seed(11)
    q, k, v, grad_out = (torch.randn(1, 2, 70, 16, generator=g) for _ in range(4))
    pe = OffsetBias(2, max_offset=69, bidirectional=not causal)
    with torch.no_grad():
        w = torch.randn(pe.weight.shape, generator=g)
        mid = w.shape[1] // 2
        if shape == "constant":
            w[:] = w[:, :1]
        elif shape == "long_head":
            w[:, : mid + 30] = w[:, :1]  # constant from the smallest offset on
        else:
            w[:, mid - 30 :] = w[:, -1:]  # constant up to the largest offset
        pe.weight.copy_(w)
    kw = {"causal": causal}
    got = triton_run(q, k, v, pe, grad_out, kw)
    truth = run_math(q, k, v, pe, grad_out, torch.float64, **kw)
    assert_close_f64(got, truth, label=f"triton {shape}: ")


# name: (encoding, (B, Hq, Hkv, Nq, Nk, D), attention kwargs); 70 rows: several 16-row tiles.
_BIDIR_WINDOW = {"causal": False, "window": 21}
TABLE_GRAD_CASES = {
    "t5_tail_gqa": ("t5", (2, 4, 2, 70, 70, 16), {}),  # T5(8, 12): a constant tail
    "offset_everywhere": ("offset_wide", (1, 2, 1, 50, 50, 16), {}),  # no constant run
    "t5_bidir": ("t5_bidir", (1, 2, 2, 45, 45, 16), {"causal": False}),
    "offset_bidir_window": ("offset_bidir", (1, 2, 2, 48, 48, 16), _BIDIR_WINDOW),
}


@pytest.mark.parametrize("name", list(TABLE_GRAD_CASES))
def test_table_gradient_by_tile_diagonal_sums(name):
    """The atomic path's table gradient (per-tile diagonal sums, one atomic per offset, constant
    runs split off) against float64, and equal bit for bit across two runs (the interpreter
    runs programs in order; on a GPU the atomics' order is not fixed)."""
    enc, (b, hq, hkv, nq, nk, d), kw = TABLE_GRAD_CASES[name]
    g = torch.Generator().manual_seed(seed_of("triton-table-grad", name))
    q = torch.randn(b, hq, nq, d, generator=g)
    k = torch.randn(b, hkv, nk, d, generator=g)
    v = torch.randn(b, hkv, nk, d, generator=g)
    grad_out = torch.randn(b, hq, nq, d, generator=g)
    if enc == "t5":
        pe = randomize(T5Bias(hq, 8, 12), g)
    elif enc == "offset_wide":
        pe = randomize(OffsetBias(hq, max_offset=nq), g)  # every offset its own column
    else:
        pe = _encoding(enc, hq, g)
    assert not torch.are_deterministic_algorithms_enabled()
    first = triton_run(q, k, v, pe, grad_out, kw)
    second = triton_run(q, k, v, pe, grad_out, kw)
    for n in first:
        assert torch.equal(first[n], second[n]), n
    truth = run_math(q, k, v, pe, grad_out, torch.float64, **kw)
    assert_close_f64(first, truth, label="triton vs float64: ")
