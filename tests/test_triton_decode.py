"""The Triton backend's split-KV decoding path (a few query rows against many keys): each key split
runs its own softmax and the host merges them by log-sum-exp. Against float64 math (conftest) in
Triton's interpreter on CPU, every mask and encoding kind, GQA, and rows that see no key."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from oracle import assert_close_f64, run_math, run_relattn, seed_of  # noqa: E402

from relattn.pe import ALiBi, Kerple, T5Bias  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Ten key blocks and a ragged last one (16-key blocks in the interpreter, 64 on a GPU): several
# splits, and enough blocks that a GPU's split heuristic splits too.
NK = 150 if DEVICE == "cpu" else 662

ENCODINGS = {
    "none": lambda: None,
    "t5": lambda: T5Bias(2, 8, 20),
    "t5_bidir": lambda: T5Bias(2, 8, 20, bidirectional=True),
    "alibi": lambda: ALiBi(2),
    "alibi_learnable": lambda: ALiBi(2, learnable=True),
    "kerple": lambda: Kerple(2, "power", r1=0.5, r2=0.7),
}


def _padding():
    m = torch.ones(2, NK, dtype=torch.bool)
    m[1, :41] = False
    m[0, 90:100] = False
    return m


def _docs():
    ids = torch.zeros(2, NK, dtype=torch.long)
    ids[:, 60:] = 1
    ids[1, 130:] = 2
    return ids


# name: (encoding, Nq, attention kwargs)
CASES = {
    "one_token": ("t5", 1, {"q_offset": NK - 1}),
    "few_tokens_alibi": ("alibi", 7, {"q_offset": NK - 7}),
    "learnable_alibi_window": ("alibi_learnable", 3, {"q_offset": NK - 3, "window": 70}),
    "kerple_padding": ("kerple", 4, {"q_offset": NK - 4, "key_padding_mask": _padding}),
    "documents": ("t5", 2, {"q_offset": NK - 2, "doc_ids": _docs}),
    "bidirectional_middle": ("t5_bidir", 5, {"causal": False, "q_offset": 70, "window": 40}),
    "no_encoding": ("none", 16, {"q_offset": NK - 16}),
    "rows_without_keys": ("t5", 6, {"q_offset": -3}),
}


def make_case(name: str):
    enc, nq, kw = CASES[name]
    g = torch.Generator().manual_seed(seed_of("decode", name))
    q = torch.randn(2, 2, nq, 16, generator=g)
    k = torch.randn(2, 1, NK, 16, generator=g)
    v = torch.randn(2, 1, NK, 16, generator=g)
    grad_out = torch.randn(2, 2, nq, 16, generator=g)
    pe = ENCODINGS[enc]()
    if pe is not None:
        with torch.no_grad():
            for p in pe.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return q, k, v, pe, grad_out, {n: (f() if callable(f) else f) for n, f in kw.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_split_kv_matches_float64(name, monkeypatch):
    from relattn.backends import triton_backend

    calls = []
    real = triton_backend._forward_splitkv
    monkeypatch.setattr(
        triton_backend,
        "_forward_splitkv",
        lambda K, a, splits: calls.append(splits) or real(K, a, splits),
    )
    q, k, v, pe, grad_out, kw = make_case(name)
    got = run_relattn(q, k, v, pe, grad_out, "triton", device=DEVICE, **kw)
    got = {n: t.detach().cpu() for n, t in got.items()}
    assert calls and calls[0] > 1, "the split-KV path did not run"
    truth = run_math(q, k, v, pe, grad_out, torch.float64, **kw)
    assert_close_f64(got, truth, label=f"split-KV {name}: ")


def test_long_rows_take_the_ordinary_forward(monkeypatch):
    from relattn.backends import triton_backend, triton_kernels

    a = type(
        "A",
        (),
        {
            "nq": triton_kernels.SPLITKV_MAX_ROWS + 1,
            "nk": 4096,
            "d": 16,
            "b": 1,
            "hq": 1,
            "q": torch.zeros(1, dtype=torch.float32),
        },
    )()
    assert triton_backend._decode_splits(triton_kernels, a) == 1
    a.nq, a.nk = 1, 16  # a single key block: nothing to split
    assert triton_backend._decode_splits(triton_kernels, a) == 1
