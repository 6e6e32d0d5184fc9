"""Low-precision parameter gradients of the Triton backend against float64 math.

With bf16 or fp16 q, k, v the encoding, its table and their gradients stay float32, so the
gradient of a learnable encoding is a float32 sum over every visible (query, key) pair of
``dS·∂PE/∂θ``. Each row's dS sums to zero; a per-row term ``D_i = Σ_j P·dP`` taken from the
rounded low-precision output instead breaks that, and the residue lands on every offset the row
sees, multiplied by the encoding's derivative (``|Δ|`` for ALiBi slopes). These cases catch that.

Criterion (FlashAttention's, in each tensor's own dtype): out, dq, dk, dv against the naive
formula in q's dtype; the float32 parameter gradients against the naive formula in float32 on the
same low-precision input values, plus 16 units of float32 at the gradient's magnitude (the sums
cancel row by row, so their rounding floor sits a few units above one).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from cases import ENCODINGS as CASE_ENCODINGS  # noqa: E402
from oracle import (  # noqa: E402
    assert_flash_accuracy,
    max_err,
    run_math,
    run_relattn,
    seed_of,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, HQ, HKV, N, D = 2, 2, 1, 64, 16  # GQA, four 16-row tiles per sequence in the interpreter


# Encodings with learnable parameters, from the conformance suite's table (tests/cases.py):
# id here -> name there.
ENCODINGS = {
    "alibi_learnable": "alibi_learnable",
    "kerple_log": "kerple_log",
    "kerple_power": "kerple_power",
    "t5": "t5_bidir",
}


def _padding(g: torch.Generator) -> torch.Tensor:
    m = torch.rand(B, N, generator=g) > 0.2
    m[0, :3] = False  # left padding: the first rows of batch 0 see no key
    m[1, -9:] = False  # right padding
    return m


def _docs(g: torch.Generator) -> torch.Tensor:
    ids = torch.zeros(B, N, dtype=torch.long)
    ids[:, N // 3 :] = 1
    ids[1, 3 * N // 4 :] = 2
    return ids


MASKS = {
    "causal": lambda g: {},
    "bidirectional": lambda g: {"causal": False},
    "window": lambda g: {"window": 13},
    "window_bidir": lambda g: {"window": 9, "causal": False},
    "key_padding": lambda g: {"key_padding_mask": _padding(g)},
    "doc_ids": lambda g: {"doc_ids": _docs(g)},
}


def make_case(enc: str, mask: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed_of("precision", enc, mask))
    q = torch.randn(B, HQ, N, D, generator=g).to(dtype)
    k = torch.randn(B, HKV, N, D, generator=g).to(dtype)
    v = torch.randn(B, HKV, N, D, generator=g).to(dtype)
    grad_out = torch.randn(B, HQ, N, D, generator=g).to(dtype)
    return q, k, v, CASE_ENCODINGS[ENCODINGS[enc]](HQ, D, g), grad_out, MASKS[mask](g)


def triton_run(q, k, v, pe, grad_out, kw) -> dict[str, torch.Tensor]:
    res = run_relattn(q, k, v, pe, grad_out, "triton", device=DEVICE, **kw)
    return {n: t.detach().cpu() for n, t in res.items()}


def assert_parameter_gradients(got: dict, truth: dict, naive32: dict, label: str) -> None:
    """float32 parameter gradients: error <= 2 × the float32 naive's error + 16 units."""
    params = [n for n in truth if n.startswith("pe")]
    assert params, "the case has no learnable parameter"
    for name in params:
        g, t = got[name], truth[name]
        assert g.dtype == torch.float32, f"{label}{name}: dtype {g.dtype}"
        assert torch.isfinite(g).all(), f"{label}{name}: not finite"
        eps = 16 * torch.finfo(torch.float32).eps * (1.0 + t.abs().max().item())
        err, err_naive = max_err(g, t), max_err(naive32[name], t)
        assert err <= 2 * err_naive + eps, (
            f"{label}{name}: error {err:.3g} > 2 × float32 naive error {err_naive:.3g} + {eps:.3g}"
        )


CASES = [
    pytest.param(enc, mask, torch.bfloat16, id=f"{enc}-{mask}-bf16")
    for enc in ENCODINGS
    for mask in MASKS
] + [
    pytest.param(enc, "causal", torch.float16, id=f"{enc}-causal-fp16")
    for enc in ("alibi_learnable", "kerple_power")
]


@pytest.mark.parametrize("enc, mask, dtype", CASES)
def test_low_precision_parameter_gradients(enc, mask, dtype):
    q, k, v, pe, grad_out, kw = make_case(enc, mask, dtype)
    got = triton_run(q, k, v, pe, grad_out, kw)
    truth = run_math(q, k, v, pe, grad_out, torch.float64, **kw)
    naive = run_math(q, k, v, pe, grad_out, dtype, **kw)
    as32 = [t.float() for t in (q, k, v, grad_out)]
    naive32 = run_math(*as32[:3], pe, as32[3], torch.float32, **kw)
    label = f"triton {dtype} {enc} {mask}: "
    tensors = ("out", "q", "k", "v")
    assert_flash_accuracy(
        {n: got[n] for n in tensors},
        {n: naive[n] for n in tensors},
        {n: truth[n] for n in tensors},
        dtype,
        label=label,
    )
    assert_parameter_gradients(got, truth, naive32, label)


def test_table_gradient_rows_sum_to_zero():
    """A constant added to every table entry leaves the softmax unchanged, so the table
    gradient summed over all offsets is 0 (each row's dS sums to zero): float32-exact in bf16."""
    from relattn import Problem
    from relattn.backends import Call, triton_backend

    g = torch.Generator().manual_seed(5)
    q, k, v, grad_out = (torch.randn(1, 2, N, D, generator=g).bfloat16().to(DEVICE) for _ in "qkvo")
    table = torch.randn(2, N, generator=g).to(DEVICE)
    scale = D**-0.5
    problem = Problem(lo=0, scale=scale)
    call = Call(q, k, v, table, None, problem, triton_backend.BACKEND)
    out, lse = triton_backend.BACKEND.forward(call)
    _, _, _, dtable = triton_backend.BACKEND.backward(call, grad_out, out, lse)
    total, magnitude = dtable.sum(1).abs(), dtable.abs().sum(1)
    assert (total <= 1e-5 * magnitude).all(), (total, magnitude)
