"""A property-based fuzz of the contract of ``attention`` / ``attention_weights``.

For generated valid arguments (shapes, GQA, masks, offsets, scales, encodings) the result equals
float64 math written independently (tests/oracle.py); for generated invalid ones the error is a
TypeError or ValueError whose message names the argument — never another exception type, never
a result. Bounded in time for CI."""

from __future__ import annotations

import math

import pytest
import torch
from cases import randomize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import attention_math, max_err

import relattn
from relattn.pe import ALiBi, Kerple, OffsetBias, RoPE, T5Bias

FUZZ = settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


def _encoding(kind: str, h: int, d: int, g: torch.Generator):
    if kind == "none":
        return None
    if kind == "t5":
        bidirectional = bool(torch.randint(2, (1,), generator=g))
        return randomize(T5Bias(h, 8, 20, bidirectional=bidirectional), g)
    if kind == "alibi":
        return ALiBi(h)
    if kind == "alibi_learnable":
        return randomize(ALiBi(h, learnable=True), g, std=0.05)
    if kind == "kerple":
        return randomize(Kerple(h, "power", r1=0.5, r2=0.7), g, std=0.5)
    if kind == "offset":
        return randomize(OffsetBias(h, 5, bidirectional=True), g)
    if kind == "rope+alibi":
        return [RoPE(d), ALiBi(h)]
    raise AssertionError(kind)


@st.composite
def valid_calls(draw):
    b = draw(st.integers(1, 2))
    hkv = draw(st.integers(1, 2))
    hq = hkv * draw(st.integers(1, 3))
    d = draw(st.sampled_from([2, 4, 8]))
    nk = draw(st.integers(1, 40))
    nq = draw(st.integers(1, nk))
    causal = draw(st.booleans())
    kw = {"causal": causal}
    use_docs = draw(st.booleans())
    if use_docs:
        kw["q_offset"] = draw(st.integers(0, nk - nq))
        cuts = draw(st.lists(st.integers(1, max(1, nk - 1)), max_size=3, unique=True))
        ids = torch.zeros(b, nk, dtype=torch.long)
        for c in cuts:
            ids[:, c:] += 1
        kw["doc_ids"] = ids * draw(st.sampled_from([1, 7, -3]))
    else:
        kw["q_offset"] = draw(st.integers(-5, nk + 5))
    if draw(st.booleans()):
        kw["window"] = draw(st.integers(1, 50))
    if draw(st.booleans()):
        kw["key_padding_mask"] = torch.tensor(
            draw(st.lists(st.booleans(), min_size=b * nk, max_size=b * nk))
        ).view(b, nk)
    if draw(st.booleans()):
        kw["scale"] = draw(st.floats(-3.0, 3.0, allow_nan=False))
    kind = draw(st.sampled_from(["none", "t5", "alibi", "alibi_learnable", "kerple", "offset",
                                 "rope+alibi"]))  # fmt: skip
    seed = draw(st.integers(0, 2**31 - 1))
    return (b, hq, hkv, nq, nk, d, kind, seed, kw)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@FUZZ
@given(call=valid_calls())
def test_valid_calls_match_float64(backend, call):
    b, hq, hkv, nq, nk, d, kind, seed, kw = call
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g)
    k = torch.randn(b, hkv, nk, d, generator=g)
    v = torch.randn(b, hkv, nk, d, generator=g)
    pe = _encoding(kind, hq, d, g)
    out = relattn.attention(q, k, v, pe, backend=backend, **kw)
    truth = attention_math(q, k, v, pe, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype and torch.isfinite(out).all()
    assert max_err(out, truth) <= 1e-5 * (1 + truth.abs().max().item())
    w = relattn.attention_weights(q, k, pe, **kw)
    assert (
        torch.isfinite(w).all() and ((w.sum(-1) - 1).abs() < 1e-5).logical_or(w.sum(-1) == 0).all()
    )


# Invalid values for one argument at a time: (argument, strategy of bad values).
BAD = {
    "causal": st.one_of(st.integers(), st.text(max_size=3), st.none(), st.floats()),
    "scale": st.one_of(
        st.text(max_size=3),
        st.just(float("nan")),
        st.just(float("inf")),
        st.booleans(),
        st.integers(10**309, 10**310),
    ),  # fmt: skip
    "q_offset": st.one_of(
        st.floats(),
        st.text(max_size=3),
        st.booleans(),
        st.none(),
        st.integers(2**63, 2**80),
        st.integers(-(2**80), -(2**63)),
    ),  # fmt: skip
    "window": st.one_of(st.integers(-10, 0), st.floats(), st.text(max_size=3), st.booleans()),
    "backend": st.one_of(
        st.text(max_size=5).filter(lambda s: s not in relattn.backends.names()),
        st.integers(),
        st.none(),
    ),  # fmt: skip
    "doc_ids": st.one_of(st.just([[0]]), st.integers(), st.just(torch.zeros(2, 3))),
    "key_padding_mask": st.one_of(
        st.just(torch.ones(2, 3)),
        st.just(torch.ones(1, 9).bool()),
        st.integers(),
        st.text(max_size=2),
    ),  # fmt: skip
    "pe": st.one_of(st.integers(), st.text(max_size=3), st.just(T5Bias(3)), st.just(RoPE(6))),
    "q": st.one_of(
        st.just(torch.zeros(2, 3)),
        st.just(torch.zeros(1, 2, 3, 4, dtype=torch.long)),
        st.integers(),
        st.just(torch.zeros(1, 3, 3, 4)),
    ),  # fmt: skip
}


@FUZZ
@given(data=st.data(), arg=st.sampled_from(sorted(BAD)))
def test_invalid_calls_raise_naming_the_argument(data, arg):
    bad = data.draw(BAD[arg])
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    kw = {"q": q, "k": k, "v": v, arg: bad}
    pos = [kw.pop("q"), kw.pop("k"), kw.pop("v"), kw.pop("pe", None)]
    with pytest.raises((TypeError, ValueError)) as info:
        relattn.attention(*pos, **kw)
    assert info.type in (TypeError, ValueError)
    named = "pe" if arg == "pe" else arg
    assert named in str(info.value) or (arg == "q" and "q" in str(info.value)), str(info.value)


@FUZZ
@given(
    scale=st.floats(1e-3, 1e36),
    magnitude=st.floats(1e-3, 1e15),
    seed=st.integers(0, 1000),
)
def test_finite_scores_give_finite_outputs(scale, magnitude, seed):
    """The NaN contract: finite inputs whose scores scale·q·k + PE are finite in float32 give
    finite outputs (README, "NaN and Inf inputs")."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, 9, 4, generator=g) * magnitude
    k = torch.randn(1, 2, 9, 4, generator=g)
    v = torch.randn(1, 2, 9, 4, generator=g)
    scores = scale * (q.double() @ k.double().transpose(-1, -2))
    if not bool((scores.abs() < 1e37).all()) or not math.isfinite(scale * magnitude * 10):
        return
    for backend in ("reference", "chunked"):
        out = relattn.attention(q, k, v, ALiBi(2), scale=scale, backend=backend)
        assert torch.isfinite(out).all(), backend
