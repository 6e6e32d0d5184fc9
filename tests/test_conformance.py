"""One conformance suite: backends × encodings × masks × dtypes × shapes, against float64 math
written independently in conftest (and, in float32, against the reference backend).

A new backend joins by adding its name to ``conftest.BACKENDS``; a new encoding by adding one
``ENCODINGS`` entry; a new mask by adding one ``MASKS`` entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from conftest import (
    BACKENDS,
    assert_close_f64,
    assert_flash_accuracy,
    attention_math,
    max_err,
    run_math,
    run_relattn,
    seed_of,
    visible_mask,
)

import relattn
from relattn.pe import ALiBi, Kerple, OffsetBias, RoPE, T5Bias

# ----------------------------------------------------------------------------- encodings


def _randomize(enc, g: torch.Generator, std: float = 1.0):
    """Learnable parameters drawn large enough that the position term matters."""
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return enc


def _t5(bidirectional):
    return lambda h, d, g: _randomize(T5Bias(h, 8, 20, bidirectional=bidirectional), g)


def _kerple(kind):
    def make(h, d, g):
        enc = Kerple(h, kind, r1=0.5, r2=0.7)
        return _randomize(enc, g, std=0.5)

    return make


ENCODINGS: dict[str, object] = {
    "none": lambda h, d, g: None,
    "t5": _t5(False),
    "t5_bidir": _t5(True),
    "alibi": lambda h, d, g: ALiBi(h),
    "alibi_learnable": lambda h, d, g: _randomize(ALiBi(h, learnable=True), g, std=0.05),
    "kerple_log": _kerple("log"),
    "kerple_power": _kerple("power"),
    "offset": lambda h, d, g: _randomize(OffsetBias(h, max_offset=9), g),
    "offset_bidir": lambda h, d, g: _randomize(OffsetBias(h, max_offset=6, bidirectional=True), g),
    "rope": lambda h, d, g: RoPE(d),
    "rope+t5": lambda h, d, g: [RoPE(d), _t5(False)(h, d, g)],
}

# ----------------------------------------------------------------------------- masks


def _doc_ids(b, n, g):
    ids = torch.zeros(b, n, dtype=torch.long)
    for i in range(b):
        cuts = torch.randperm(max(n - 1, 1), generator=g)[: min(3, n - 1)] + 1
        ids[i, cuts] = 1
        ids[i] = ids[i].cumsum(0) + 10 * i  # contiguous runs, ids need not start at 0
    return ids


def _key_padding(b, n, g):
    kpm = torch.rand(b, n, generator=g) > 0.25
    kpm[0, : min(3, n)] = False  # left padding: the first rows of batch 0 see no key
    if b > 1:
        kpm[1, -min(2, n) :] = False
    return kpm


@dataclass
class Mask:
    """How a mask turns a sequence length N into (Nq, Nk, keyword arguments)."""

    nq: object = lambda n: n
    nk: object = lambda n: n
    kwargs: object = lambda b, n, g: {}
    extra: dict = field(default_factory=dict)

    def make(self, b, n, g):
        nq, nk = self.nq(n), self.nk(n)
        kw = dict(self.extra)
        kw.update(self.kwargs(b, nk, g))
        if "q_offset" in kw and callable(kw["q_offset"]):
            kw["q_offset"] = kw["q_offset"](nq, nk)
        return nq, nk, kw


MASKS: dict[str, Mask] = {
    "causal": Mask(),
    "bidirectional": Mask(extra={"causal": False}),
    "q_offset": Mask(  # decoding-like: the last Nq positions against all Nk keys
        nq=lambda n: max(1, n // 4),
        extra={"q_offset": lambda nq, nk: nk - nq},
    ),
    "neg_q_offset": Mask(extra={"q_offset": lambda nq, nk: -min(3, nq)}),
    "cross_bidir": Mask(nq=lambda n: max(1, n // 2), extra={"causal": False, "q_offset": 2}),
    "window": Mask(extra={"window": 5}),
    "window_bidir": Mask(extra={"window": 4, "causal": False}),
    "doc_ids": Mask(kwargs=lambda b, n, g: {"doc_ids": _doc_ids(b, n, g)}),
    "key_padding": Mask(kwargs=lambda b, n, g: {"key_padding_mask": _key_padding(b, n, g)}),
}

# ----------------------------------------------------------------------------- shapes

# (B, Hq, Hkv, N, D)
SHAPES = {
    "gqa_odd": (2, 4, 2, 37, 16),
    "mqa": (1, 4, 1, 24, 16),
    "n1": (2, 2, 2, 1, 16),
    "mha_d32": (1, 2, 2, 50, 32),
    "long": (1, 2, 1, 150, 16),  # crosses several blocks of a tiled kernel
}
# The Triton backend runs through the interpreter on CPU: tiny shapes only (N <= 64, D = 16).
TRITON_SHAPES = {
    "gqa_odd": (2, 4, 2, 19, 16),
    "mqa": (1, 4, 1, 24, 16),
    "n1": (2, 2, 2, 1, 16),
    "n64": (1, 2, 2, 64, 16),
}
MAIN_SHAPE = {"triton": "gqa_odd"}  # backend -> shape used for the full encoding × mask grid


def _shapes(backend):
    return TRITON_SHAPES if backend == "triton" else SHAPES


def _shape(backend, name):
    return _shapes(backend)[name]


# ----------------------------------------------------------------------------- a case


def make_case(backend, enc_name, mask_name, shape, dtype):
    b, hq, hkv, n, d = shape
    g = torch.Generator().manual_seed(seed_of(enc_name, mask_name, shape))
    nq, nk, kw = MASKS[mask_name].make(b, n, g)
    q = torch.randn(b, hq, nq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, nk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, nk, d, generator=g).to(dtype)
    grad_out = torch.randn(b, hq, nq, d, generator=g).to(dtype)
    pe = ENCODINGS[enc_name](hq, d, g)
    return q, k, v, pe, grad_out, kw


def _rows_without_keys_are_zero(got, kw, shape_q):
    """The rows that see no key give exactly 0 out and 0 dq."""
    b, _, nq, _ = shape_q
    nk = kw["_nk"]
    m = visible_mask(
        b, nq, nk, kw.get("causal", True), kw.get("q_offset", 0), kw.get("window"),
        kw.get("doc_ids"), kw.get("key_padding_mask"),
    )  # fmt: skip
    vis = m[:, 0].any(-1)  # (B, Nq)
    empty = ~vis
    for name in ("out", "q"):
        t = got[name].permute(0, 2, 1, 3)  # (B, Nq, H, D)
        assert torch.equal(t[empty], torch.zeros_like(t[empty])), f"{name}: rows without keys"


def check_fp32(backend, enc_name, mask_name, shape):
    q, k, v, pe, grad_out, kw = make_case(backend, enc_name, mask_name, shape, torch.float32)
    got = run_relattn(q, k, v, pe, grad_out, backend, **kw)
    truth = run_math(q, k, v, pe, grad_out, torch.float64, **kw)
    assert_close_f64(got, truth, label=f"{backend} vs float64: ")
    if backend != "reference":
        ref = run_relattn(q, k, v, pe, grad_out, "reference", **kw)
        assert_close_f64(got, ref, label=f"{backend} vs reference: ")
    _rows_without_keys_are_zero(got, {**kw, "_nk": k.shape[2]}, q.shape)


def check_low_precision(backend, enc_name, mask_name, shape, dtype):
    q, k, v, pe, grad_out, kw = make_case(backend, enc_name, mask_name, shape, dtype)
    got = run_relattn(q, k, v, pe, grad_out, backend, **kw)
    truth = run_math(q, k, v, pe, grad_out, torch.float64, **kw)
    naive = run_math(q, k, v, pe, grad_out, dtype, **kw)
    assert_flash_accuracy(got, naive, truth, dtype, label=f"{backend} {dtype}: ")
    _rows_without_keys_are_zero(got, {**kw, "_nk": k.shape[2]}, q.shape)


# ----------------------------------------------------------------------------- float32 grid

GRID = [
    pytest.param(be, enc, mask, id=f"{be}-{enc}-{mask}")
    for be in BACKENDS
    for enc in ENCODINGS
    for mask in MASKS
]


@pytest.mark.parametrize("backend, enc_name, mask_name", GRID)
def test_fp32_every_encoding_every_mask(backend, enc_name, mask_name):
    """Every backend sees every encoding under every mask, out and all gradients."""
    check_fp32(backend, enc_name, mask_name, _shape(backend, MAIN_SHAPE.get(backend, "gqa_odd")))


SHAPE_GRID = [
    pytest.param(be, enc, mask, sh, id=f"{be}-{enc}-{mask}-{sh}")
    for be in BACKENDS
    for sh in _shapes(be)
    if sh != MAIN_SHAPE.get(be, "gqa_odd")  # the main shape is in GRID already
    for enc in ("none", "t5", "alibi", "rope+t5")
    for mask in ("causal", "q_offset", "bidirectional")
]


@pytest.mark.parametrize("backend, enc_name, mask_name, shape_name", SHAPE_GRID)
def test_fp32_shapes(backend, enc_name, mask_name, shape_name):
    """GQA, MQA, N = 1, odd N, wide D, Nq ≠ Nk, several blocks."""
    check_fp32(backend, enc_name, mask_name, _shape(backend, shape_name))


# ----------------------------------------------------------------------------- low precision

LOW = [torch.bfloat16, torch.float16]
LOW_GRID = [
    pytest.param(be, enc, mask, dt, id=f"{be}-{enc}-{mask}-{str(dt)[6:]}")
    for be in BACKENDS
    for dt in LOW
    for enc, mask in [(e, "causal") for e in ENCODINGS]
    + [(e, m) for e in ("t5", "alibi") for m in MASKS if m != "causal"]
]


@pytest.mark.parametrize("backend, enc_name, mask_name, dtype", LOW_GRID)
def test_low_precision_accuracy(backend, enc_name, mask_name, dtype):
    """bfloat16 / float16 against float64 with FlashAttention's criterion (2× the naive error)."""
    check_low_precision(backend, enc_name, mask_name, _shape(backend, "gqa_odd"), dtype)


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
    pe = ALiBi(h)
    scores = (q.double() @ k.double().transpose(-1, -2)) / d**0.5
    assert scores.max() < -5e3
    got = run_relattn(q, k, v, pe, grad_out, backend)
    truth = run_math(q, k, v, pe, grad_out, torch.float64)
    naive = run_math(q, k, v, pe, grad_out, dtype)
    assert_flash_accuracy(got, naive, truth, dtype, label=f"{backend}: ")
