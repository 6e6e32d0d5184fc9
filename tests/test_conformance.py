"""One conformance suite: backends × encodings × masks × dtypes × shapes × devices, against
float64 math written independently in oracle.py (and, in float32, against the reference).

A new backend joins by registering itself (``relattn.backends.register``); a new encoding by
registering itself (``relattn.pe.register``) and, for a hand-written float64 definition,
adding it to ``oracle.ORACLES``; a new mask by adding one ``cases.MASKS`` entry.
"""

from __future__ import annotations

import pytest
import torch
from cases import (
    BACKENDS,
    DEVICES,
    MASKS,
    backends_for,
    check_fp32,
    check_low_precision,
    registry_variants,
    run_math,
    run_relattn,
    shapes_for,
    skip_unless_runs,
)
from oracle import assert_flash_accuracy, attention_math, max_err

import relattn
from relattn.pe import ALiBi

ENCODINGS = registry_variants()


# ----------------------------------------------------------------------------- float32 grid


def _id(device: str) -> str:
    return "" if device == "cpu" else f"-{device}"


GRID = [
    pytest.param(be, enc, mask, dev, id=f"{be}-{enc}-{mask}{_id(dev)}")
    for dev in DEVICES
    for be in backends_for(dev)
    for enc in ENCODINGS
    for mask in MASKS
]


@pytest.mark.parametrize("backend, enc_name, mask_name, device", GRID)
def test_fp32_every_encoding_every_mask(backend, enc_name, mask_name, device):
    """Every backend sees every encoding under every mask, out and all gradients."""
    check_fp32(backend, enc_name, mask_name, shapes_for(backend, device)["gqa_odd"], device)


SHAPE_GRID = [
    pytest.param(be, enc, mask, sh, dev, id=f"{be}-{enc}-{mask}-{sh}{_id(dev)}")
    for dev in DEVICES
    for be in backends_for(dev)
    for sh in shapes_for(be, dev)
    if sh != "gqa_odd"  # the main shape is in GRID already
    for enc in ("none", "t5", "alibi", "rope+t5")
    for mask in ("causal", "q_offset", "bidirectional")
]


@pytest.mark.parametrize("backend, enc_name, mask_name, shape_name, device", SHAPE_GRID)
def test_fp32_shapes(backend, enc_name, mask_name, shape_name, device):
    """GQA, MQA, N = 1, odd N, wide D, Nq ≠ Nk, several blocks."""
    check_fp32(backend, enc_name, mask_name, shapes_for(backend, device)[shape_name], device)


# ----------------------------------------------------------------------------- low precision

LOW = [torch.bfloat16, torch.float16]
# The main shape, and D = 64 across several blocks where a backend affords it (the CPU kernel
# multiplies bf16 in pairs of features there).
LOW_SHAPES = ("gqa_odd", "d64_blocks")
LOW_GRID = [
    pytest.param(be, enc, mask, dt, sh, dev, id=f"{be}-{enc}-{mask}-{str(dt)[6:]}-{sh}{_id(dev)}")
    for dev in DEVICES
    for be in backends_for(dev)
    for sh in LOW_SHAPES
    if sh in shapes_for(be, dev)
    for dt in LOW
    for enc, mask in [(e, "causal") for e in ENCODINGS]
    + [(e, m) for e in ("t5", "alibi") for m in MASKS if m != "causal"]
]


@pytest.mark.parametrize("backend, enc_name, mask_name, dtype, shape_name, device", LOW_GRID)
def test_low_precision_accuracy(backend, enc_name, mask_name, dtype, shape_name, device):
    """bfloat16 / float16 against float64 with FlashAttention's criterion (2× the naive error)."""
    shape = shapes_for(backend, device)[shape_name]
    check_low_precision(backend, enc_name, mask_name, shape, dtype, device)


# ----------------------------------------------------------------------------- extra cases


# Heads for the 16k-key test; the Triton interpreter walks every key block of every head.
ALIBI_16K_HEADS = {"triton": 2}


@pytest.mark.parametrize("backend", BACKENDS)
def test_alibi_16k_decoding_rows(backend):
    """ALiBi at Nk = 16384: the last rows against every key (offsets up to 16383; the largest
    |PE| is 64 for the gentlest head, 8192 for the steepest of 8); against float64 math."""
    nk, nq, d = 16384, 3, 16
    h = ALIBI_16K_HEADS.get(backend, 8)
    g = torch.Generator().manual_seed(7)
    pe = ALiBi(h)
    q = torch.randn(1, h, nq, d, generator=g)
    k = torch.randn(1, 1, nk, d, generator=g)
    v = torch.randn(1, 1, nk, d, generator=g)
    out = relattn.attention(q, k, v, pe, q_offset=nk - nq, backend=backend)
    truth = attention_math(q, k, v, pe, q_offset=nk - nq)
    assert torch.isfinite(out).all()
    err = max_err(out, truth)
    assert err <= 2e-5, err


def test_alibi_16k_full_chunked():
    """ALiBi at N = 16384 (B = H = 1, D = 16), causal, through the chunked backend: a few rows
    across the sequence against float64 math computed only for those rows."""
    n, d = 16384, 16
    g = torch.Generator().manual_seed(8)
    pe = ALiBi(1)
    q = torch.randn(1, 1, n, d, generator=g)
    k = torch.randn(1, 1, n, d, generator=g)
    v = torch.randn(1, 1, n, d, generator=g)
    out = relattn.attention(q, k, v, pe, backend="chunked")
    assert torch.isfinite(out).all()
    for r in (0, 1, 777, 8191, n - 2, n - 1):
        truth = attention_math(q[:, :, r : r + 1], k, v, pe, q_offset=r)
        err = max_err(out[:, :, r : r + 1], truth)
        assert err <= 2e-5, (r, err)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_very_negative_scores(backend, dtype):
    """Rows whose scores are all about -1e4: the max subtraction keeps them exact (no 0/0),
    judged by the accuracy criterion against a naive implementation in the same dtype."""
    b, h, n, d = 1, 2, 33, 16
    g = torch.Generator().manual_seed(9)
    direction = torch.randn(d, generator=g)
    direction = direction / direction.norm()
    # q·k·scale ≈ -1e4 for every pair, plus O(1) differences between keys
    q = (direction * 200 + 0.5 * torch.randn(b, h, n, d, generator=g)).to(dtype)
    k = (-direction * 200 + 0.5 * torch.randn(b, h, n, d, generator=g)).to(dtype)
    v = torch.randn(b, h, n, d, generator=g).to(dtype)
    grad_out = torch.randn(b, h, n, d, generator=g).to(dtype)
    skip_unless_runs(backend, q, k, {})
    pe = ALiBi(h)
    scores = (q.double() @ k.double().transpose(-1, -2)) / d**0.5
    assert scores.max() < -5e3
    got = run_relattn(q, k, v, pe, grad_out, backend)
    truth = run_math(q, k, v, pe, grad_out, torch.float64)
    naive = run_math(q, k, v, pe, grad_out, dtype)
    assert_flash_accuracy(got, naive, truth, dtype, label=f"{backend}: ")
