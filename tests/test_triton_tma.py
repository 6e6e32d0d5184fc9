"""The Triton kernels' tensor-descriptor (TMA) path against their pointer path.

On Hopper the forward and dq stream k and v through tensor descriptors (``RELATTN_TRITON_TMA``,
``triton_kernels.TMA_MODE``); elsewhere, and for tensors whose alignment TMA cannot take,
through pointers (dk/dv always: see ``triton_kernels.attn_bwd_dkdv``). The interpreter runs
both paths when the mode is "on": the same tiles reach the same arithmetic, so out and every
gradient must be bit-identical, and the descriptor path must also match float64 math (rows
and columns past a ragged edge read 0 from the descriptor, as the pointer path's masks make
them).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from oracle import assert_close_f64, run_math, run_relattn  # noqa: E402
from test_triton import DEVICE, make_case  # noqa: E402
from test_triton_token import assert_close as assert_token_close  # noqa: E402
from test_triton_token import make_inputs, math64  # noqa: E402
from test_triton_token import triton_run as token_run  # noqa: E402

from relattn.backends import triton_backend  # noqa: E402


def _kernels():
    return triton_backend._kernels()


@pytest.fixture
def tma_mode():
    """Set ``TMA_MODE`` for one test, restored after."""
    K = _kernels()
    was = K.TMA_MODE

    def set_mode(mode: str) -> None:
        K.TMA_MODE = mode

    yield set_mode
    K.TMA_MODE = was


def _run(q, k, v, pe, grad_out, kw):
    res = run_relattn(q, k, v, pe, grad_out, "triton", device=DEVICE, **kw)
    return {n: t.detach().cpu() for n, t in res.items()}


@pytest.fixture
def spy_tma(monkeypatch):
    """The TMA constexpr of every launch that decides one, in order."""
    seen: list[bool] = []
    decide = triton_backend._tma

    def spy(K, *tensors):
        seen.append(decide(K, *tensors))
        return seen[-1]

    monkeypatch.setattr(triton_backend, "_tma", spy)
    return seen


# a table with GQA and ragged edges; closed-form ALiBi; every mask; bidirectional with q_offset
@pytest.mark.parametrize(
    "name", ["t5_gqa_ragged", "alibi_fixed", "doc_pad_window", "bidir_offset", "decode_q_offset"]
)
def test_descriptor_path_is_bit_identical_to_pointers(name, tma_mode, spy_tma):
    q, k, v, pe, grad_out, kw = make_case(name)
    tma_mode("off")
    pointers = _run(q, k, v, pe, grad_out, kw)
    assert spy_tma and not any(spy_tma)
    spy_tma.clear()
    tma_mode("on")
    descriptors = _run(q, k, v, pe, grad_out, kw)
    assert spy_tma and all(spy_tma), "the descriptor path did not run"
    for key, want in pointers.items():
        assert torch.equal(descriptors[key], want), key
    truth = run_math(q, k, v, pe, grad_out, torch.float64, **kw)
    assert_close_f64(descriptors, truth, label="triton (TMA) vs float64: ")


def test_descriptor_path_with_token_terms(tma_mode, spy_tma):
    """The band and the forget gate (bidirectional, GQA, a table beside them) stream their
    tiles the same way: every output and gradient bit-identical, and float64's."""
    x = make_inputs(hq=4, hkv=2, band=True, gate=True, table=True, causal=False, nq=33, nk=40)
    tma_mode("off")
    pointers = token_run(x)
    tma_mode("on")
    descriptors = token_run(x)
    assert any(spy_tma)
    for key, want in pointers.items():
        assert torch.equal(descriptors[key], want), key
    assert_token_close(descriptors, math64(x), 1e-5, "triton (TMA) vs float64: ")


def test_unaligned_rows_take_the_pointer_path(tma_mode, spy_tma):
    """Row strides that are not multiples of 16 bytes (a narrowed last dim) cannot be a
    descriptor's: those launches use pointers, with the same results."""
    x = make_inputs(hq=4, hkv=2, band=False, table=True)
    tma_mode("on")
    want = token_run(x)
    spy_tma.clear()
    d = x["k"].shape[-1]
    widen = lambda t: torch.cat([t, torch.zeros(*t.shape[:-1], 1)], -1)[..., :d]
    narrowed = {**x, "k": widen(x["k"]), "v": widen(x["v"])}  # rows 68 bytes apart
    assert narrowed["k"].stride(2) == d + 1
    got = token_run(narrowed)
    assert spy_tma == [False, False]  # the forward's launch and the backward's: pointers
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_alignment_rule():
    t = torch.zeros(2, 3, 5, 8)
    assert triton_backend._tma_rows(t)  # 32-byte rows
    assert not triton_backend._tma_rows(torch.zeros(2, 3, 5, 9)[..., :8])  # 36-byte rows
    assert not triton_backend._tma_rows(torch.zeros(2, 3, 1, 8).expand(2, 3, 5, 8))  # stride 0
    assert not triton_backend._tma_rows(torch.zeros(2 * 3 * 5 * 8 + 1)[1:].view(2, 3, 5, 8))


def test_auto_never_uses_descriptors_in_the_interpreter(tma_mode):
    K = _kernels()
    if not K.INTERPRET:
        pytest.skip("compiled kernels: auto follows the GPU")
    tma_mode("auto")
    assert triton_backend._tma(K, torch.zeros(1, 1, 4, 16)) is False


def test_bad_mode_is_refused(tma_mode):
    tma_mode("yes")
    with pytest.raises(ValueError, match="RELATTN_TRITON_TMA must be auto, on or off; got 'yes'"):
        triton_backend._tma(_kernels(), torch.zeros(1, 1, 4, 16))


def test_yardstick_kernel_is_causal_attention():
    """The offline gate's bias-free reference (tools/yardstick_kernel.py, descriptors for q, k, v
    and out) computes causal attention: its loops are a fair yardstick only if they do the
    work. Interpreter only (the GPU check times kernels, not this)."""
    K = _kernels()
    if not K.INTERPRET:
        pytest.skip("the yardstick runs in the interpreter here")
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "yardstick_kernel.py"
    spec = importlib.util.spec_from_file_location("yardstick_kernel_test", path)
    ys = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ys)
    g = torch.Generator().manual_seed(21)
    q, k, v = (torch.randn(2, 3, 48, 16, generator=g) for _ in range(3))
    out, lse = ys.yardstick_forward(q, k, v)
    truth = run_math(q, k, v, None, torch.zeros_like(q), torch.float64)
    assert (out.double() - truth["out"]).abs().max() < 1e-5
    s = (q.double() @ k.double().transpose(-1, -2)) / 4
    s = s.masked_fill(torch.ones(48, 48, dtype=torch.bool).triu(1), float("-inf"))
    assert (lse.double() - torch.logsumexp(s, -1)).abs().max() < 1e-5
