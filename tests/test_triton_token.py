"""The Triton backend's token-dependent position terms (the query-conditioned banded bias and the
forget gate) against float64 math written here: out, lse and every gradient (q, k, v, table, r,
P, fq, fk), through the kernels' own calls (``Call``), in Triton's interpreter on CPU.

Shapes cross several 16 × 16 tiles with ragged edges, so the masked and unmasked stages, the
skipped band blocks (W smaller than N), the band's gradient kernel (its diagonals and its groups
of query blocks) and the split-KV decoding kernel all run.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from relattn.backends import get  # noqa: E402
from relattn.backends.base import Call, TokenTerms  # noqa: E402
from relattn.masks import offset_range  # noqa: E402
from relattn.problem import Problem  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("q", "k", "v", "table", "r", "weight", "fq", "fk")


def make_inputs(
    *,
    b: int = 1,
    hq: int = 2,
    hkv: int = 2,
    nq: int = 37,
    nk: int = 37,
    d: int = 16,
    rank: int = 5,
    extent: int = 20,
    shared: bool = True,
    band: bool = True,
    gate: bool = False,
    table: bool = False,
    causal: bool = True,
    q_offset: int = 0,
    window: int = 0,
    seed: int = 0,
) -> dict:
    """Random inputs of one call, float32 on the CPU (``None`` for absent terms)."""
    g = torch.Generator().manual_seed(seed)
    x = {
        "q": torch.randn(b, hq, nq, d, generator=g),
        "k": torch.randn(b, hkv, nk, d, generator=g),
        "v": torch.randn(b, hkv, nk, d, generator=g),
        "grad_out": torch.randn(b, hq, nq, d, generator=g),
        "r": None,
        "weight": None,
        "fq": None,
        "fk": None,
        "table": None,
    }
    lo, hi = offset_range(nq, nk, causal, q_offset, window)
    if table:
        x["table"] = 0.5 * torch.randn(hq, hi - lo + 1, generator=g)
    if band:
        x["r"] = torch.randn(b, hq, nq, rank, generator=g)
        x["weight"] = 0.3 * torch.randn(1 if shared else hq, rank, extent, generator=g)
    if gate:
        # F = cumsum of log f <= 0 over the positions, read at the queries' and the keys'.
        log_f = -0.2 * torch.rand(b, hq, max(nk, q_offset + nq), generator=g)
        f = log_f.cumsum(-1)
        x["fk"] = f[..., :nk].contiguous()
        x["fq"] = f[..., q_offset : q_offset + nq].contiguous()
    x["problem"] = dict(lo=lo, scale=d**-0.5, causal=causal, q_offset=q_offset, window=window)
    return x


def math64(x: dict) -> dict[str, torch.Tensor]:
    """out, lse and the gradients of every given input by autograd in float64."""
    p = x["problem"]
    t = {n: (x[n].double().requires_grad_() if x[n] is not None else None) for n in NAMES}
    q, k, v = t["q"], t["k"], t["v"]
    hq, nq, nk = q.shape[1], q.shape[2], k.shape[2]
    k_ = k.repeat_interleave(hq // k.shape[1], 1)
    v_ = v.repeat_interleave(hq // k.shape[1], 1)
    delta = p["q_offset"] + torch.arange(nq)[:, None] - torch.arange(nk)[None, :]
    s = p["scale"] * q @ k_.transpose(-1, -2)
    if t["table"] is not None:
        col = (delta - p["lo"]).clamp(0, t["table"].shape[1] - 1)
        s = s + t["table"][:, col]
    if t["r"] is not None:
        w = t["weight"].shape[-1]
        inside = (delta >= 0) & (delta < w)
        pd = t["weight"][:, :, delta.clamp(0, w - 1)] * inside  # (Hw, R, Nq, Nk)
        s = s + torch.einsum("bhic,hcij->bhij", t["r"], pd.expand(hq, -1, -1, -1))
    if t["fq"] is not None:
        sign = torch.where(delta >= 0, 1.0, -1.0).double()
        s = s + sign * (t["fq"][..., :, None] - t["fk"][..., None, :])
    vis = torch.ones(nq, nk, dtype=torch.bool)
    if p["causal"]:
        vis &= delta >= 0
    if p["window"]:
        vis &= delta < p["window"]
        if not p["causal"]:
            vis &= delta > -p["window"]
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, -1)
    w_ = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    out = w_ @ v_
    out.backward(x["grad_out"].double())
    res = {"out": out.detach(), "lse": lse.detach()}
    res.update({n: t[n].grad for n in NAMES if t[n] is not None})
    return res


def triton_run(x: dict, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """out, lse and the gradients from the backend's forward and backward on one ``Call``."""
    backend = get("triton")
    dev = lambda t: t.to(DEVICE) if t is not None else None
    q, k, v = (x[n].to(dtype).to(DEVICE) for n in "qkv")
    token = TokenTerms(*(dev(x[n]) for n in ("r", "weight", "fq", "fk")))
    problem = Problem(**x["problem"])
    call = Call(q, k, v, dev(x["table"]), None, problem, backend, token=token)
    out, lse = backend.forward(call)
    grads = backend.backward(call, x["grad_out"].to(dtype).to(DEVICE), out, lse)
    assert len(grads) == 8
    res = {"out": out, "lse": lse}
    for name, grad in zip(NAMES, grads, strict=True):
        given = x[name] is not None
        assert (grad is not None) == given, f"{name}: gradient {'missing' if given else 'given'}"
        if given:
            assert grad.shape == x[name].shape, name
            want = dtype if name in "qkv" else x[name].dtype
            assert grad.dtype == want, f"{name}: dtype {grad.dtype}, expected {want}"
            res[name] = grad
    return {n: t.detach().float().cpu() for n, t in res.items()}


def assert_close(got: dict, truth: dict, rtol: float, label: str = "") -> None:
    """Every tensor within ``rtol · (1 + max|truth|)`` of float64 (lse: finite entries)."""
    assert got.keys() == truth.keys(), (sorted(got), sorted(truth))
    for name, t in truth.items():
        g = got[name].double()
        if name == "lse":
            assert torch.equal(torch.isfinite(g), torch.isfinite(t)), f"{label}lse: -inf rows"
            g, t = g[torch.isfinite(t)], t[torch.isfinite(t)]
        assert not torch.isnan(g).any(), f"{label}{name}: NaN"
        tol = rtol * (1.0 + t.abs().max().item())
        err = (g - t).abs().max().item()
        assert err <= tol, f"{label}{name}: max error {err:.3g} > {tol:.3g}"


# name: make_inputs arguments
CASES = {
    "band_causal": {},
    "band_bidirectional": {"causal": False, "nq": 33, "nk": 40},
    "band_window_q_offset": {"window": 23, "q_offset": 9, "nq": 30, "nk": 45},
    "band_gqa_per_head": {"hq": 4, "hkv": 2, "shared": False, "rank": 16, "extent": 9},
    "band_wide_rank": {"rank": 20, "extent": 50, "nq": 34, "nk": 34},
    # several groups of query blocks in the band's gradient kernel (two 16-row blocks a group in
    # the interpreter), W across three key blocks, a query offset, GQA, a weight per head
    "band_groups_gqa_q_offset": {
        "b": 2, "hq": 4, "hkv": 2, "shared": False, "nq": 70, "nk": 90, "q_offset": 20,
        "extent": 40, "gate": True,
    },
    "gate_causal": {"band": False, "gate": True, "hq": 4, "hkv": 2},
    "gate_bidirectional": {"band": False, "gate": True, "causal": False, "q_offset": 5},
    "band_gate_table": {"gate": True, "table": True, "b": 2, "extent": 13},
    "band_gate_table_bidir_window": {
        "gate": True, "table": True, "causal": False, "window": 19, "shared": False, "nk": 41,
    },
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_token_terms_match_float64(name):
    x = make_inputs(seed=len(name), **CASES[name])
    assert_close(triton_run(x), math64(x), 1e-5, label=f"{name}: ")


def test_bfloat16_within_its_precision():
    """bf16 q, k, v (the terms stay float32): out, dq, dk, dv within two units of bf16 of the
    float64 math on the same rounded inputs; lse and the terms' float32 gradients within float32
    precision in the interpreter (on a GPU the band's dots run in TF32 for 16-bit inputs)."""
    x = make_inputs(hq=4, hkv=2, gate=True, table=True, shared=False, seed=3)
    rounded = {n: x[n].bfloat16().float() for n in ("q", "k", "v", "grad_out")}
    truth = math64({**x, **rounded})
    got = triton_run(x, torch.bfloat16)
    main = ("out", "q", "k", "v")
    eps = torch.finfo(torch.bfloat16).eps
    assert_close({n: got[n] for n in main}, {n: truth[n] for n in main}, 2 * eps, "bf16: ")
    rest = [n for n in truth if n not in main]
    rtol = 1e-5 if DEVICE == "cpu" else 1e-2
    assert_close({n: got[n] for n in rest}, {n: truth[n] for n in rest}, rtol, "bf16: ")


def test_deterministic_table_gradient_with_token_terms():
    """The table gradient without atomics (deterministic mode) sees the band and the gate."""
    x = make_inputs(gate=True, table=True, causal=False, seed=11)
    torch.use_deterministic_algorithms(True)
    try:
        got = triton_run(x)
    finally:
        torch.use_deterministic_algorithms(False)
    assert_close(got, math64(x), 1e-5, label="deterministic: ")


def test_band_outside_every_tile():
    """q_offset puts every offset past W: the band adds nothing, its gradients are 0."""
    x = make_inputs(q_offset=60, nq=8, nk=30, extent=10, seed=5)
    got, truth = triton_run(x), math64(x)
    assert_close(got, truth, 1e-5)
    assert torch.equal(got["weight"], torch.zeros_like(got["weight"]))


@pytest.mark.parametrize("gate", [False, True], ids=["band", "band_gate"])
def test_split_kv_decoding(gate, monkeypatch):
    """A few query rows against many keys take the split-KV kernel (forward only)."""
    from relattn.backends import triton_backend

    calls = []
    real = triton_backend._forward_splitkv
    monkeypatch.setattr(
        triton_backend,
        "_forward_splitkv",
        lambda K, a, splits: calls.append(splits) or real(K, a, splits),
    )
    x = make_inputs(hq=4, hkv=2, nq=3, nk=150, q_offset=147, extent=40, gate=gate, seed=7)
    backend = get("triton")
    dev = lambda t: t.to(DEVICE) if t is not None else None
    token = TokenTerms(*(dev(x[n]) for n in ("r", "weight", "fq", "fk")))
    q, k, v = (x[n].to(DEVICE) for n in "qkv")
    call = Call(q, k, v, None, None, Problem(**x["problem"]), backend, token=token)
    out, lse = backend.forward(call)
    out, lse = out.cpu(), lse.cpu()
    assert calls and calls[0] > 1, "the split-KV path did not run"
    truth = math64(x)
    assert_close({"out": out, "lse": lse}, {n: truth[n] for n in ("out", "lse")}, 1e-5)
