"""The position terms that depend on the tokens (QueryConditionedBias, ForgetGate): every
backend that computes them, against float64 math written in tests/token_oracle.py, over the
masks, GQA, dtypes and layouts; plus the API's checks of bad input."""

from __future__ import annotations

import pytest
import torch
from oracle import assert_close_f64, seed_of
from token_oracle import band_math, gate_math, run_token_math, run_token_relattn

import relattn
from relattn import backends
from relattn.pe import ForgetGate, QueryConditionedBias, T5Bias


def token_backends() -> list[str]:
    """The CPU backends that compute token terms (triton is tested in test_triton_token)."""
    found = []
    for name in backends.names()[1:]:
        try:
            b = backends.get(name)
        except RuntimeError:
            continue
        if b.token_terms and (b.devices is None or "cpu" in b.devices):
            if name == "cpu_kernel":
                from relattn.backends import cpu_kernel

                if not cpu_kernel.available():
                    continue
            found.append(name)
    return found


BACKENDS = token_backends()

# (name, B, Hq, Hkv, Nq, Nk, D, q_offset, masks)
CASES = [
    ("causal", 2, 4, 2, 45, 45, 16, 0, {}),
    ("bidirectional", 1, 2, 1, 33, 33, 8, 0, {"causal": False}),
    ("window", 1, 4, 4, 50, 50, 16, 0, {"window": 7}),
    ("q_offset", 2, 2, 1, 9, 40, 16, 31, {}),
    ("docs", 2, 2, 2, 30, 30, 8, 0, {"docs": True}),
    ("padding", 2, 2, 1, 30, 30, 8, 0, {"padding": True}),
    ("window_bidirectional", 1, 2, 2, 40, 40, 8, 0, {"causal": False, "window": 6}),
]


def _inputs(case, dtype, rank=3, width=11, shared=True):
    name, b, hq, hkv, nq, nk, d, q_offset, masks = case
    g = torch.Generator().manual_seed(seed_of(name, str(dtype), rank, width, shared))
    q = torch.randn(b, hq, nq, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(b, hkv, nk, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(b, hkv, nk, d, generator=g, dtype=torch.float64).to(dtype)
    r = torch.randn(b, hq, nq, rank, generator=g, dtype=torch.float64).to(dtype)
    wshape = (rank, width) if shared else (hq, rank, width)
    weight = torch.randn(*wshape, generator=g, dtype=torch.float64).to(dtype)
    log_f = -torch.rand(b, hq, nk, generator=g, dtype=torch.float64).to(dtype) * 0.5
    grad_out = torch.randn(b, hq, nq, d, generator=g, dtype=torch.float64).to(dtype)
    kw = {"q_offset": q_offset}
    if "causal" in masks:
        kw["causal"] = masks["causal"]
    if "window" in masks:
        kw["window"] = masks["window"]
    if masks.get("docs"):
        kw["doc_ids"] = (torch.arange(nk) // 11).expand(b, nk).contiguous()
    if masks.get("padding"):
        kpm = torch.ones(b, nk, dtype=torch.bool)
        kpm[0, :5] = False
        kw["key_padding_mask"] = kpm
    return q, k, v, r, weight, log_f, grad_out, kw


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("terms", ["band", "gate", "both"])
def test_token_terms_against_float64(backend, case, terms):
    q, k, v, r, weight, log_f, grad_out, kw = _inputs(case, torch.float32)
    use = {"r": r, "weight": weight} if terms in ("band", "both") else {}
    if terms in ("gate", "both"):
        if kw["q_offset"] + q.shape[2] > k.shape[2]:
            pytest.skip("the forget gate needs the queries' positions among the keys")
        use["log_f"] = log_f
    truth = run_token_math(q, k, v, grad_out, **use, **kw)
    got = run_token_relattn(q, k, v, grad_out, backend, **use, **kw)
    assert_close_f64(got, truth, rtol=1e-5, label=f"{backend} {terms}: ")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_head"])
@pytest.mark.parametrize("width", [1, 4, 200], ids=lambda w: f"W{w}")
def test_band_extent_and_heads(backend, shared, width):
    case = ("band", 1, 4, 2, 70, 70, 16, 0, {})
    q, k, v, r, weight, _, grad_out, kw = _inputs(case, torch.float32, 4, width, shared)
    truth = run_token_math(q, k, v, grad_out, r=r, weight=weight, **kw)
    got = run_token_relattn(q, k, v, grad_out, backend, r=r, weight=weight, **kw)
    assert_close_f64(got, truth, rtol=1e-5, label=f"{backend} W={width}: ")


@pytest.mark.parametrize("backend", BACKENDS)
def test_with_table_and_rope_float64(backend):
    """The terms beside a table encoding and RoPE, in float64 (tight)."""
    case = ("mix", 1, 2, 1, 40, 40, 8, 0, {})
    q, k, v, r, weight, log_f, grad_out, kw = _inputs(case, torch.float64)
    rope = relattn.pe.RoPE(8)
    t5 = T5Bias(2, num_buckets=8, max_distance=16).double()
    truth = run_token_math(q, k, v, grad_out, r=r, weight=weight, log_f=log_f, pe=[rope, t5],
                           **kw)  # fmt: skip
    got = run_token_relattn(q, k, v, grad_out, backend, r=r, weight=weight, log_f=log_f,
                            pe=[rope, t5], **kw)  # fmt: skip
    assert_close_f64(got, truth, rtol=1e-10, label=f"{backend} mixed: ")


def test_terms_show_in_attention_weights():
    case = ("weights", 1, 2, 1, 20, 20, 8, 0, {})
    q, k, _, r, weight, log_f, _, _ = _inputs(case, torch.float64)
    qcb = QueryConditionedBias(2, 3, 11).double()
    with torch.no_grad():
        qcb.weight.copy_(weight)
    w = relattn.attention_weights(q, k, [qcb(r), ForgetGate()(log_f)])
    s = (q @ k.transpose(-1, -2)) / 8**0.5 + band_math(r, weight, 20, 0) + gate_math(log_f, 20, 0)
    s = s.masked_fill(torch.ones(20, 20, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(w, torch.softmax(s, -1), rtol=1e-12, atol=1e-12)


def test_dense_bias_for_inspection():
    g = torch.Generator().manual_seed(3)
    r = torch.randn(2, 3, 6, 4, generator=g, dtype=torch.float64)
    qcb = QueryConditionedBias(3, 4, 5, shared_heads=False).double()
    got = qcb(r).bias(6, 9, q_offset=3)
    torch.testing.assert_close(got, band_math(r, qcb.weight.detach(), 9, 3))
    log_f = -torch.rand(2, 3, 9, generator=g, dtype=torch.float64)
    torch.testing.assert_close(ForgetGate()(log_f).bias(6, 9, q_offset=3), gate_math(log_f, 6, 3))


def test_gate_is_alibi_for_constant_gates():
    """ALiBi -m·|Δ| is the forget gate with log f = -m (the issue's special case)."""
    q = torch.randn(1, 2, 30, 8, dtype=torch.float64)
    k, v = torch.randn(2, 1, 2, 30, 8, dtype=torch.float64)
    alibi = relattn.pe.ALiBi(2).double()
    m = alibi.slopes.double()
    log_f = (-m).view(1, 2, 1).expand(1, 2, 30).contiguous()
    for causal in (True, False):
        a = relattn.attention(q, k, v, alibi, causal=causal, backend="reference")
        b = relattn.attention(q, k, v, ForgetGate()(log_f), causal=causal, backend="reference")
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_backward_by_gradcheck(backend):
    """Every token gradient through the custom op, checked numerically in float64 (per-head
    P, both terms, padding, bidirectional with a window, GQA, a query offset)."""
    g = torch.Generator().manual_seed(5)

    def leaf(*shape, scale=1.0):
        x = torch.randn(*shape, generator=g, dtype=torch.float64) * scale
        return x.requires_grad_(True)

    q, k, v = leaf(2, 4, 6, 3), leaf(2, 2, 9, 3), leaf(2, 2, 9, 3)
    r, weight = leaf(2, 4, 6, 2), leaf(4, 2, 5)
    f = torch.cumsum(-torch.rand(2, 4, 9, generator=g, dtype=torch.float64), -1)
    fq, fk = f[:, :, 3:].clone().requires_grad_(True), f.clone().requires_grad_(True)
    kpm = torch.ones(2, 9, dtype=torch.bool)
    kpm[1, 2] = False

    def run(q, k, v, r, weight, fq, fk):
        out, lse = torch.ops.relattn.attention(
            q, k, v, None, None, r, weight, fq, fk, None, kpm, -2, 0.7, False, 3, 5, backend
        )
        return out

    assert torch.autograd.gradcheck(run, (q, k, v, r, weight, fq, fk), fast_mode=True)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_names_the_argument():
    q = torch.randn(1, 2, 10, 8)
    k = v = torch.randn(1, 1, 10, 8)
    qcb = QueryConditionedBias(2, rank=4, extent=16)
    with pytest.raises(ValueError, match=r"r must be 4-D \(B, Hq=2, Nq, rank=4\)"):
        qcb(torch.randn(1, 2, 10, 3))
    with pytest.raises(TypeError, match="r must be a floating-point tensor"):
        qcb(torch.ones(1, 2, 10, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"r must have shape \(B, Hq, Nq, rank\)"):
        relattn.attention(q, k, v, qcb(torch.randn(1, 2, 9, 4)))
    with pytest.raises(ValueError, match="extent must be"):
        QueryConditionedBias(2, rank=4, extent=0)
    with pytest.raises(ValueError, match="rank must be"):
        QueryConditionedBias(2, rank=-1)
    with pytest.raises(ValueError, match="log_f must be <= 0"):
        ForgetGate()(torch.full((1, 2, 10), 0.1))
    with pytest.raises(ValueError, match="log_f must be <= 0"):
        ForgetGate()(torch.full((1, 2, 10), float("nan")))
    with pytest.raises(ValueError, match=r"log_f must be 3-D \(B, Hq, Nk\)"):
        ForgetGate()(torch.zeros(2, 10))
    with pytest.raises(ValueError, match=r"log_f must have shape \(B, Hq, Nk\) = \(1, 2, 10\)"):
        relattn.attention(q, k, v, ForgetGate()(torch.zeros(1, 2, 9)))
    with pytest.raises(ValueError, match="q_offset"):
        relattn.attention(q, k, v, ForgetGate()(torch.zeros(1, 2, 10)), q_offset=3)
    with pytest.raises(ValueError, match="has 4 heads; q has Hq=2"):
        relattn.attention(q, k, v, QueryConditionedBias(4, rank=4)(torch.randn(1, 4, 10, 4)))
    with pytest.raises(ValueError, match="at most one BandTerm"):
        relattn.attention(q, k, v, [qcb(torch.randn(1, 2, 10, 4))] * 2)
    with pytest.raises(TypeError, match=r"call the QueryConditionedBias with r"):
        relattn.attention(q, k, v, qcb)
    with pytest.raises(TypeError, match=r"call the ForgetGate with log_f"):
        relattn.attention(q, k, v, ForgetGate())
    with pytest.raises(RuntimeError, match="does not compute the terms that depend on the tokens"):
        _no_token_backend_call(q, k, v, qcb)


def _no_token_backend_call(q, k, v, qcb):
    class Plain(backends.Backend):
        name = "plain_no_token"

    backends.register(Plain())
    try:
        relattn.attention(q, k, v, qcb(torch.randn(1, 2, 10, 4)), backend="plain_no_token")
    finally:
        backends._REGISTRY.pop("plain_no_token", None)
        backends._CANDIDATES.clear()


# ----------------------------------------------------------------------------- torch.compile


# One fused backend is enough (the op's fake and autograd are the same for all): the first.
FUSED = next((b for b in BACKENDS if b not in ("reference", "decode")), "reference")


@pytest.mark.parametrize("backend", [FUSED])
def test_compile_fullgraph_with_token_terms(backend):
    """The terms under torch.compile(fullgraph=True): no graph break, the custom op traced as
    one node (its fake gives the token gradients' shapes), the same values and gradients."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(8)
    b, hq, hkv, n, d, rank, width = 1, 4, 2, 40, 16, 3, 9
    x = torch.randn(b, n, 8, generator=g)
    proj_r = torch.nn.Linear(8, hq * rank)
    proj_f = torch.nn.Linear(8, hq)
    qcb = QueryConditionedBias(hq, rank, width)
    q = torch.randn(b, hq, n, d, generator=g, requires_grad=True)
    k, v = (torch.randn(b, hkv, n, d, generator=g, requires_grad=True) for _ in range(2))

    def loss(q, k, v, x):
        r = proj_r(x).view(b, n, hq, rank).transpose(1, 2)
        log_f = torch.nn.functional.logsigmoid(proj_f(x) + 3.0).transpose(1, 2)
        terms = [qcb(r), ForgetGate()(log_f)]
        out = relattn.attention(q, k, v, terms, backend=backend)
        return out.square().sum()

    params = [q, k, v, proj_r.weight, proj_f.weight, qcb.weight]
    eager = loss(q, k, v, x)
    g_eager = torch.autograd.grad(eager, params)
    compiled = torch.compile(loss, fullgraph=True)
    got = compiled(q, k, v, x)
    g_got = torch.autograd.grad(got, params)
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    for a, e in zip(g_got, g_eager, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_shapes(backend):
    """An empty batch, one query against one key, rank 1 and a band of one offset, a window of
    one, a query offset past every key: values and gradients as the float64 math."""
    shapes = [  # (name, B, Hq, Hkv, Nq, Nk, D, q_offset, masks), rank, width
        (("empty", 0, 2, 1, 5, 5, 8, 0, {}), 2, 3),
        (("one", 1, 2, 1, 1, 1, 8, 0, {}), 1, 1),
        (("window1", 1, 2, 2, 9, 9, 8, 0, {"window": 1}), 2, 4),
        (("far", 2, 2, 1, 6, 40, 8, 1000, {}), 3, 5),
    ]
    for case, rank, width in shapes:
        q, k, v, r, weight, log_f, grad_out, kw = _inputs(case, torch.float32, rank, width)
        use = {"r": r, "weight": weight}
        if kw["q_offset"] + q.shape[2] <= k.shape[2]:
            use["log_f"] = log_f
        got = run_token_relattn(q, k, v, grad_out, backend, **use, **kw)
        truth = run_token_math(q, k, v, grad_out, **use, **kw)
        if q.numel() == 0:  # nothing to compare but the shapes (and that it ran)
            assert {n: t.shape for n, t in got.items()} == {n: t.shape for n, t in truth.items()}
            continue
        assert_close_f64(got, truth, rtol=1e-5, label=f"{backend} {case[0]}: ")
