"""RelativeSelfAttention: wiring against float64 math, packed documents == one by one, masks
through the layer in every backend, rows with no visible key, and argument errors."""

from __future__ import annotations

import copy

import pytest
import torch
from cases import BACKENDS, LAYER_ENCODINGS, skip_unless_token_backend, strengthen
from hypothesis import given, settings
from hypothesis import strategies as st
from oracle import attention_math, max_err, seed_of
from token_oracle import band_math, gate_math

import relattn
from relattn.nn import RelativeSelfAttention
from relattn.pe import ALiBi, ForgetGate, QueryConditionedBias, RoPE, T5Bias

D_MODEL, HEADS, KV_HEADS = 32, 2, 1  # tiny: the triton backend runs in its interpreter on CPU


def token_bias_math(layer: RelativeSelfAttention, x: torch.Tensor) -> torch.Tensor | None:
    """The layer's token term ``(B, H, N, N)`` in float64 from its own projection (None for a
    table encoding): ``r = x·W_rᵀ`` through the band, or ``log f = logsigmoid(x·w + b)``."""
    b, n, _ = x.shape
    x = x.double()
    if isinstance(layer.pe, QueryConditionedBias):
        proj = layer.r_proj
        r = x @ proj.weight.double().T + (0 if proj.bias is None else proj.bias.double())
        r = r.view(b, n, layer.num_heads, layer.pe.rank).transpose(1, 2)
        return band_math(r, layer.pe.weight.detach().double(), n, 0)
    if isinstance(layer.pe, ForgetGate):
        proj = layer.gate_proj
        log_f = torch.nn.functional.logsigmoid(x @ proj.weight.double().T + proj.bias.double())
        return gate_math(log_f.transpose(1, 2), n, 0)
    return None


def make_layer(pe: str, rope: bool, backend: str, seed: int, **kw) -> RelativeSelfAttention:
    skip_unless_token_backend(pe, backend)
    torch.manual_seed(seed)
    layer = RelativeSelfAttention(
        D_MODEL, HEADS, kw.pop("num_kv_heads", KV_HEADS), pe=pe, rope=rope, backend=backend, **kw
    )
    return strengthen(layer)


def out_and_grads(layer, x, g, **kw) -> dict[str, torch.Tensor]:
    """The layer's output and the gradients of ``sum(out · g)`` w.r.t. x and every parameter."""
    x = x.detach().clone().requires_grad_(True)
    out = layer(x, **kw)
    named = {"x": x, **dict(layer.named_parameters())}
    grads = torch.autograd.grad((out * g).sum(), list(named.values()), allow_unused=True)
    res = {"out": out.detach()}
    for name, t, gr in zip(named, named.values(), grads, strict=True):
        res[name] = torch.zeros_like(t) if gr is None else gr
    return res


def assert_all_close(got: dict, want: dict, tol: float = 1e-5) -> None:
    for name in want:
        assert not torch.isnan(got[name]).any(), f"{name}: NaN"
        err = max_err(got[name], want[name])
        assert err <= tol * (1 + want[name].abs().max().item()), f"{name}: max error {err:.3g}"


# ----------------------------------------------------------------------------- wiring


@pytest.mark.parametrize("pe", LAYER_ENCODINGS)
@pytest.mark.parametrize("rope", [False, True], ids=["norope", "rope"])
@pytest.mark.parametrize("num_kv_heads", [1, 2], ids=["gqa", "mha"])
def test_layer_matches_float64_math(pe, rope, num_kv_heads):
    """Fused qkv split, GQA head layout, RoPE and output projection, written out by hand."""
    layer = make_layer(pe, rope, "reference", seed_of(pe, rope), num_kv_heads=num_kv_heads)
    layer = layer.double()
    b, n, h, d = 2, 9, HEADS, D_MODEL // HEADS
    x = torch.randn(b, n, D_MODEL, dtype=torch.float64)
    qkv = x @ layer.qkv.weight.T
    q, k, v = qkv.split([h * d, num_kv_heads * d, num_kv_heads * d], dim=-1)
    q = q.view(b, n, h, d).transpose(1, 2)
    k = k.view(b, n, num_kv_heads, d).transpose(1, 2)
    v = v.view(b, n, num_kv_heads, d).transpose(1, 2)
    bias = token_bias_math(layer, x)
    tables = [layer.pe] if bias is None and layer.pe is not None else []
    pe_list = tables + ([layer.rope] if layer.rope is not None else [])
    y = attention_math(q, k, v, pe_list or None, window=4, bias=bias)
    want = y.transpose(1, 2).reshape(b, n, D_MODEL) @ layer.out_proj.weight.T
    with torch.no_grad():
        got = layer(x, window=4)
    assert max_err(got, want) <= 1e-6  # RoPE takes cos/sin in float32 by design


def test_attributes_and_instances():
    t5 = T5Bias(4, num_buckets=16, max_distance=64)
    rope = RoPE(8)
    layer = RelativeSelfAttention(32, 4, 2, pe=t5, rope=rope)
    assert layer.pe is t5 and layer.rope is rope
    assert layer.qkv.weight.shape == ((4 + 2 * 2) * 8, 32)
    assert RelativeSelfAttention(32, 4, pe="none").pe is None
    assert isinstance(RelativeSelfAttention(32, 4, pe="alibi").pe, ALiBi)
    assert RelativeSelfAttention(32, 4, rope=True).rope.head_dim == 8
    assert RelativeSelfAttention(32, 4).rope is None


# ----------------------------------------------------------------------------- packed documents


def check_packed(layer, lengths: list[int], seed: int) -> None:
    """Documents packed in one row (doc_ids) == each document alone: outputs and gradients."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    x = torch.randn(1, n, D_MODEL, generator=gen)
    g = torch.randn(1, n, D_MODEL, generator=gen)
    doc_ids = torch.repeat_interleave(torch.arange(len(lengths)) * 3 + 1, torch.tensor(lengths))
    packed = out_and_grads(layer, x, g, doc_ids=doc_ids[None])

    alone: dict[str, list[torch.Tensor]] = {}
    params = {name: torch.zeros_like(p) for name, p in layer.named_parameters()}
    for xs, gs in zip(x.split(lengths, dim=1), g.split(lengths, dim=1), strict=True):
        r = out_and_grads(layer, xs, gs)
        alone.setdefault("out", []).append(r["out"])
        alone.setdefault("x", []).append(r["x"])
        for name in params:
            params[name] += r[name]
    want = {"out": torch.cat(alone["out"], 1), "x": torch.cat(alone["x"], 1), **params}
    assert_all_close(packed, want)


@settings(deadline=None, max_examples=12)
@given(
    lengths=st.lists(st.integers(1, 7), min_size=1, max_size=4),
    pe=st.sampled_from(LAYER_ENCODINGS),
    rope=st.booleans(),
)
def test_packed_equals_one_by_one(lengths, pe, rope):
    check_packed(make_layer(pe, rope, "reference", seed_of(pe, rope)), lengths, len(lengths))


# Every registered additive encoding meets every backend in one of the two per-backend tests
# below (half each, to keep the grid's cost; RoPE is on in both), so a new encoding joins them
# by registering.
_ADDITIVE = [name for name in relattn.pe.names() if name != "rope"]
_HALVES = (_ADDITIVE[0::2], _ADDITIVE[1::2])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pe", _HALVES[0])
def test_packed_equals_one_by_one_per_backend(backend, pe):
    check_packed(make_layer(pe, True, backend, seed_of(pe, backend)), [5, 1, 8, 3], seed=7)


# ----------------------------------------------------------------------------- masks per backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pe", _HALVES[1])
def test_window_and_padding_match_reference(backend, pe):
    layer = make_layer(pe, True, backend, seed_of(pe, "masks"))
    ref = copy.deepcopy(layer)
    ref.backend = "reference"
    x = torch.randn(2, 16, D_MODEL)
    g = torch.randn(2, 16, D_MODEL)
    padding = torch.ones(2, 16, dtype=torch.bool)
    padding[0, 10:] = False  # right padding
    padding[1, :3] = False  # left padding: the first queries see no key at all
    doc_ids = torch.tensor([[0] * 6 + [1] * 10, [2] * 16])
    for kw in (
        {"window": 5},
        {"key_padding_mask": padding},
        {"window": 3, "key_padding_mask": padding, "doc_ids": doc_ids},
    ):
        assert_all_close(out_and_grads(layer, x, g, **kw), out_and_grads(ref, x, g, **kw))


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_with_no_visible_key_give_zeros_and_zero_grads(backend):
    layer = make_layer("alibi", True, backend, seed=11)
    x = torch.randn(2, 6, D_MODEL)
    g = torch.randn(2, 6, D_MODEL)
    padding = torch.ones(2, 6, dtype=torch.bool)
    padding[1] = False  # an all-padded row
    padding[0, :2] = False  # queries 0 and 1 of row 0 see only padded keys
    r = out_and_grads(layer, x, g, key_padding_mask=padding)
    for name, t in r.items():
        assert torch.isfinite(t).all(), f"{name} not finite"
    assert torch.equal(r["out"][1], torch.zeros(6, D_MODEL))
    assert torch.equal(r["out"][0, :2], torch.zeros(2, D_MODEL))
    assert torch.equal(r["x"][1], torch.zeros(6, D_MODEL))
    assert r["out"][0, 2:].abs().sum() > 0


# ----------------------------------------------------------------------------- dropout, errors


def test_dropout_on_output_projection_in_training_only():
    layer = make_layer("t5", False, "reference", seed=12, dropout=0.5)
    x = torch.randn(1, 8, D_MODEL)
    layer.train()
    assert not torch.equal(layer(x), layer(x))
    layer.eval()
    assert torch.equal(layer(x), layer(x))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"d_model": 30}, ValueError, "d_model"),
        ({"num_heads": 0}, ValueError, "num_heads"),
        ({"num_kv_heads": 3}, ValueError, "num_kv_heads"),
        ({"pe": "rotary"}, ValueError, "pe"),
        ({"pe": T5Bias(2)}, ValueError, "num_heads"),
        ({"pe": RoPE(8)}, TypeError, "rope"),
        ({"pe": 3}, TypeError, "pe"),
        ({"rope": RoPE(4)}, ValueError, "head_dim"),
        ({"rope": "yes"}, TypeError, "rope"),
        ({"dropout": 1.0}, ValueError, "dropout"),
        ({"dropout": -0.1}, ValueError, "dropout"),
        ({"backend": "cuda"}, ValueError, "backend"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, match):
    args = {"d_model": 32, "num_heads": 4, **kwargs}
    with pytest.raises(error, match=match):
        RelativeSelfAttention(**args)


def test_bad_forward_arguments():
    layer = make_layer("t5", False, "reference", seed=13)
    x = torch.randn(2, 5, D_MODEL)
    with pytest.raises(ValueError, match="x must have shape"):
        layer(torch.randn(2, 5, D_MODEL + 1))
    with pytest.raises(ValueError, match="x must have shape"):
        layer(torch.randn(5, D_MODEL))
    with pytest.raises(ValueError, match="at least one token"):
        layer(torch.randn(2, 0, D_MODEL))
    with pytest.raises(ValueError, match="doc_ids"):
        layer(x, doc_ids=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="doc_ids"):
        layer(x, doc_ids=torch.tensor([[0, 1, 0, 0, 0]] * 2))  # document 0 in two runs
    with pytest.raises(ValueError, match="key_padding_mask"):
        layer(x, key_padding_mask=torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="window"):
        layer(x, window=0)
