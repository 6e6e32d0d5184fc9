"""An audit of the terms the tokens set (QueryConditionedBias, ForgetGate) from a user's side:
inputs that used to give NaN or a traceback from deep inside, and the forget gate's precision
over long sequences. Values are checked against float64 math written here."""

from __future__ import annotations

import pytest
import torch
from oracle import assert_close_f64
from test_token_terms import BACKENDS
from token_oracle import run_token_math, run_token_relattn

import relattn
from relattn.cache import KVCache
from relattn.pe import ForgetGate, QueryConditionedBias
from relattn.pe.token import GateTerm


def _qkv(b=1, h=2, n=12, d=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=torch.float64).to(dtype) for _ in range(3)]


def _attention_math(q, k, v, bias, causal=True):
    """softmax(q·kᵀ/√D + bias + causal mask)·v in float64."""
    q, k, v = q.double(), k.double(), v.double()
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + bias
    if causal:
        n = s.shape[-1]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ v


# ----------------------------------------------------------------------------- gates of 0


def test_gate_of_exactly_zero_is_refused_not_nan():
    """log f = -inf (a gate of exactly 0, e.g. log(sigmoid(x)) underflowing) made F_i - F_j
    = -inf - (-inf) = NaN on every backend, forward and backward: now a ValueError naming
    log_f (the docs define f in (0, 1])."""
    log_f = -torch.rand(1, 2, 12)
    log_f[..., 5] = float("-inf")
    with pytest.raises(ValueError, match=r"log_f must be <= 0 and finite.*-inf"):
        ForgetGate()(log_f)


@pytest.mark.parametrize(
    "value", [0.5, float("nan"), float("-inf"), float("inf")], ids=["pos", "nan", "-inf", "inf"]
)
def test_cache_checks_the_values_of_log_f(value):
    """KVCache.update took any log_f (positive, NaN, -inf) silently: wrong or NaN outputs."""
    cache = KVCache(1, 1, 2, 8, 10).layer(0)
    k = v = torch.randn(1, 2, 3, 8)
    log_f = -torch.rand(1, 2, 3)
    log_f[0, 1, 2] = value
    with pytest.raises(ValueError, match=r"log_f must be <= 0 and finite"):
        cache.update(k, v, None, None, log_f)


@pytest.mark.parametrize("value", [float("nan"), float("-inf"), float("inf")])
def test_from_cumulative_refuses_non_finite_values(value):
    f = torch.cumsum(-torch.rand(1, 2, 12), -1)
    f[0, 0, 7] = value
    with pytest.raises(ValueError, match=r"F must be finite"):
        GateTerm.from_cumulative(f)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gates_of_one_are_plain_attention(backend):
    """log f = 0 everywhere (every gate open) adds nothing: plain causal attention."""
    q, k, v = _qkv(2, 2, 20, 8, seed=1)
    out = relattn.attention(q, k, v, ForgetGate()(torch.zeros(2, 2, 20)), backend=backend)
    torch.testing.assert_close(out.double(), _attention_math(q, k, v, 0.0), rtol=0, atol=2e-6)


# ----------------------------------------------------------------------------- bias()


def test_bias_checks_its_arguments():
    """term.bias(nq, nk, q_offset) raised from deep inside torch (IndexError, RuntimeError) or
    reported a string nq as if it were the number."""
    band = QueryConditionedBias(2, 4, 16)(torch.randn(1, 2, 10, 4))
    gate = ForgetGate()(-torch.rand(1, 2, 10))
    for term in (band, gate):
        with pytest.raises(TypeError, match=r"nq must be an int >= 0; got str '10'"):
            term.bias("10", 10)
        with pytest.raises(ValueError, match=r"nk must be an int >= 0; got -1"):
            term.bias(10, -1)
        with pytest.raises(TypeError, match=r"q_offset must be an int.*got float 1.5"):
            term.bias(10, 10, 1.5)


@pytest.mark.parametrize("backend", ["chunked", "cpu_kernel", "decode"])
def test_forget_gate_keeps_its_digits_over_a_long_sequence(backend):
    """Strongly forgetting heads over 1536 keys (|F| ~ 1000): float32 out and the gradients
    within 1e-5 of float64 math (F detrended before the kernels; a float32 F alone gives
    ~1e-4)."""
    from relattn.backends import cpu_kernel

    if backend == "cpu_kernel" and not cpu_kernel.available():
        pytest.skip("no C++ toolchain")
    g = torch.Generator().manual_seed(21)
    b, h, n, d = 1, 2, 1536, 16
    q, k, v, grad_out = (torch.randn(b, h, n, d, generator=g) for _ in range(4))
    log_f = torch.log(0.5 * (1 + 0.01 * torch.rand(b, h, n, generator=g)))
    truth = run_token_math(q, k, v, grad_out, log_f=log_f)
    got = run_token_relattn(q, k, v, grad_out, backend, log_f=log_f)
    assert_close_f64(got, truth, rtol=1e-5, label=f"{backend}: ")
