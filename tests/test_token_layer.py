"""The terms the tokens set, as a layer and a model: ``RelativeSelfAttention(pe="inkling" |
"fox")`` and ``TinyLMConfig(pe=...)``: forward and backward against float64 math and across
backends, decoding step by step with a KV cache (doc_ids, padding, a window) equal to one full
forward, generation, the decode backend's one-row step against float64 math, bad input, and
torch.compile without graph breaks. (The attention math of the terms: test_token_terms.py.)"""

from __future__ import annotations

import copy

import pytest
import torch
from cases import strengthen
from oracle import assert_close_f64, max_err
from token_oracle import run_token_math

import relattn
from relattn.cache import KVCache
from relattn.models import TinyLM, TinyLMConfig
from relattn.nn import RelativeSelfAttention
from relattn.pe import ForgetGate, QueryConditionedBias

D_MODEL, HEADS, KV_HEADS = 32, 4, 2
TOKEN = ["inkling", "fox"]


def make_layer(pe: str, backend: str = "auto", seed: int = 0, **kw) -> RelativeSelfAttention:
    torch.manual_seed(seed)
    if pe == "inkling":
        kw.setdefault("pe", QueryConditionedBias(HEADS, rank=4, extent=7))  # a narrow band
    layer = RelativeSelfAttention(D_MODEL, HEADS, KV_HEADS, **{"pe": pe, **kw}, backend=backend)
    return strengthen(layer)


def grads(layer, x, g, params=None, **kw) -> dict[str, torch.Tensor]:
    """Out and the gradients of ``sum(out·g)`` for x and every parameter of ``params`` (default
    ``layer``; a compiled layer's own names carry a prefix)."""
    x = x.detach().clone().requires_grad_(True)
    out = layer(x, **kw)
    named = {"x": x, **dict((params or layer).named_parameters())}
    got = torch.autograd.grad((out * g).sum(), list(named.values()))
    return {"out": out.detach(), **dict(zip(named, got, strict=True))}


def decode(layer, x, chunks, cache_window=None, **masks) -> torch.Tensor:
    b, n, _ = x.shape
    cache = KVCache(1, b, KV_HEADS, layer.head_dim, n, window=cache_window)
    outs, start = [], 0
    for size in chunks:
        part = {k: m[:, start : start + size] for k, m in masks.items()}
        outs.append(layer(x[:, start : start + size], cache=cache.layer(0), **part))
        start += size
    return torch.cat(outs, dim=1)


# ----------------------------------------------------------------------------- the layer


@pytest.mark.parametrize("pe", TOKEN)
def test_registry_entries(pe):
    spec = relattn.pe.spec(pe)
    assert spec.token and spec.additive
    module = relattn.pe.create(pe, 4, 8)
    assert isinstance(module, QueryConditionedBias if pe == "inkling" else ForgetGate)
    layer = RelativeSelfAttention(D_MODEL, HEADS, pe=pe)
    if pe == "inkling":
        assert (layer.pe.rank, layer.pe.extent) == (16, 1024)  # the defaults
        assert layer.r_proj.out_features == HEADS * 16 and layer.gate_proj is None
        assert relattn.pe.create(pe, 4, rank=3, extent=5).weight.shape == (3, 5)
    else:
        assert layer.gate_proj.out_features == HEADS and layer.r_proj is None
        bias = layer.gate_proj.bias.detach()
        assert bias.min() == 3.0 and bias.max() == 6.0  # gates start near 1
        model = TinyLM(TinyLMConfig(d_model=D_MODEL, num_heads=HEADS, num_layers=1, pe=pe))
        assert torch.equal(model.blocks[0].attn.gate_proj.bias.detach(), bias)  # kept by init


@pytest.mark.parametrize("pe", TOKEN)
@pytest.mark.parametrize("backend", ["reference", "decode"])
def test_layer_forward_backward_matches_float64(pe, backend):
    """Out and every gradient (x, qkv, the projection, P) of the layer on a backend against
    the same layer in float64 on the reference, with a window and padding."""
    layer = make_layer(pe, backend, seed=1)
    exact = copy.deepcopy(layer).double()
    exact.backend = "reference"
    x = torch.randn(2, 11, D_MODEL, generator=torch.Generator().manual_seed(2))
    g = torch.randn(2, 11, D_MODEL, generator=torch.Generator().manual_seed(3))
    padding = torch.ones(2, 11, dtype=torch.bool)
    padding[1, :2] = False
    kw = {"window": 6, "key_padding_mask": padding}
    got = grads(layer, x, g, **kw)
    want = grads(exact, x.double(), g.double(), **kw)
    assert_close_f64(got, want, rtol=1e-5, label=f"{pe} {backend}: ")
    proj = "r_proj.weight" if pe == "inkling" else "gate_proj.weight"
    assert got[proj].abs().sum() > 0  # the gradient reaches the layer's own projection


@pytest.mark.parametrize("pe", TOKEN)
def test_layer_terms_are_the_encodings_terms(pe):
    """The layer's attention equals relattn.attention with the term built from its
    projection by hand (position_terms), and both equal float64 math of the term."""
    layer = make_layer(pe, "reference", seed=4).double().eval()
    x = torch.randn(1, 9, D_MODEL, dtype=torch.float64)
    q, k, v = layer.project(x)
    terms = layer.position_terms(x)
    y = relattn.attention(q, k, v, terms, backend="reference")
    want = layer.out_proj(y.transpose(1, 2).reshape(1, 9, D_MODEL))
    with torch.no_grad():
        assert max_err(layer(x), want) <= 1e-12
    g = torch.zeros_like(q)
    if pe == "inkling":
        w = layer.pe.weight.detach()
        truth = run_token_math(q, k, v, g, r=layer.latents(x).detach(), weight=w)
    else:
        truth = run_token_math(q, k, v, g, log_f=layer.log_forget(x).detach())
    assert max_err(y.detach(), truth["out"]) <= 1e-12


# ----------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("pe", TOKEN)
@pytest.mark.parametrize("backend", ["auto", "reference", "decode"])
@pytest.mark.parametrize("masks", ["none", "docs+padding", "window"])
def test_decoding_step_by_step_equals_full_forward(pe, backend, masks):
    layer = make_layer(pe, backend, seed=5, rope=pe == "fox").eval()
    x = torch.randn(2, 15, D_MODEL, generator=torch.Generator().manual_seed(6))
    kw: dict = {}
    cache_window = None
    if masks == "docs+padding":
        kw["doc_ids"] = torch.tensor([[0] * 6 + [1] * 5 + [2] * 4, [7] * 2 + [3] * 13])
        kw["key_padding_mask"] = torch.ones(2, 15, dtype=torch.bool)
        kw["key_padding_mask"][1, :2] = False
    elif masks == "window":
        cache_window = 4
    chunks = [5, 3, 1, 1, 2, 1, 1, 1]
    with torch.no_grad():
        full = layer(x, window=cache_window, **kw)
        stepped = decode(layer, x, chunks, cache_window=cache_window, **kw)
    assert max_err(stepped, full) <= 1e-5


@pytest.mark.parametrize("pe", TOKEN)
def test_gradients_reach_new_tokens_through_the_cache(pe):
    layer = make_layer(pe, "reference", seed=7)
    x = torch.randn(1, 8, D_MODEL)
    g = torch.randn(1, 8, D_MODEL)
    full = grads(layer, x, g)
    cache = KVCache(1, 1, KV_HEADS, layer.head_dim, 8)
    cached = grads(layer, x, g, cache=cache)
    for name in full:
        assert max_err(cached[name], full[name]) <= 1e-5, name


@pytest.mark.parametrize("pe", TOKEN)
def test_tinylm_decoding_and_generate(pe):
    torch.manual_seed(8)
    config = TinyLMConfig(d_model=D_MODEL, num_heads=HEADS, num_kv_heads=KV_HEADS, pe=pe,
                          num_layers=2, vocab_size=64)  # fmt: skip
    model = strengthen_model(TinyLM(config)).eval()
    idx = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(2, capacity=20)
        steps = [model(idx[:, :12], cache=cache)]
        steps += [model(idx[:, t : t + 1], cache=cache) for t in range(12, 20)]
    assert max_err(torch.cat(steps, 1), full) <= 1e-5
    out = model.generate(idx[:, :5], 10, temperature=0)
    assert out.shape == (2, 15) and torch.equal(out[:, :5], idx[:, :5])
    with torch.no_grad():  # greedy: each new token is the argmax of a full forward
        assert torch.equal(model(out[:, :-1])[:, 4:].argmax(-1), out[:, 5:])
    model.train()
    loss = torch.nn.functional.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def strengthen_model(model: TinyLM) -> TinyLM:
    for block in model.blocks:
        strengthen(block.attn)
    return model


# ----------------------------------------------------------------------------- the decode step


@pytest.mark.parametrize("terms", ["band", "gate", "both+table"])
@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
def test_decode_one_row_step_against_float64(terms, grad):
    """A generation step (one row at position Nk - 1, B = 2, GQA, a band narrower than the
    cache) on the decode backend -- the C++ step where it is built -- against float64 math,
    without and with gradients."""
    g = torch.Generator().manual_seed(9)
    b, hq, hkv, nk, d, rank, width = 2, 4, 2, 37, 16, 3, 11
    q = torch.randn(b, hq, 1, d, generator=g)
    k, v = torch.randn(2, b, hkv, nk, d, generator=g)
    grad_out = torch.randn(b, hq, 1, d, generator=g)
    use: dict = {}
    if terms != "gate":
        use["r"] = torch.randn(b, hq, 1, rank, generator=g)
        use["weight"] = torch.randn(rank, width, generator=g)
    if terms != "band":
        use["log_f"] = -torch.rand(b, hq, nk, generator=g) * 0.5
    pe = None
    if terms == "both+table":
        pe = strengthen_table(relattn.pe.T5Bias(hq, num_buckets=8, max_distance=20))
    kw = {"q_offset": nk - 1}
    truth = run_token_math(q, k, v, grad_out, pe=pe, **use, **kw)
    if grad:
        from token_oracle import run_token_relattn

        got = run_token_relattn(q, k, v, grad_out, "decode", pe=pe, **use, **kw)
        assert_close_f64(got, truth, rtol=1e-5, label=f"step {terms}: ")
        return
    terms_list = [] if pe is None else [pe]
    if "r" in use:
        qcb = QueryConditionedBias(hq, rank, width)
        with torch.no_grad():
            qcb.weight.copy_(use["weight"])
        terms_list.append(qcb(use["r"]))
    if "log_f" in use:
        terms_list.append(ForgetGate()(use["log_f"]))
    with torch.no_grad():
        out = relattn.attention(q, k, v, terms_list, backend="decode", **kw)
        auto = relattn.attention(q, k, v, terms_list, **kw)
    assert max_err(out, truth["out"]) <= 1e-5 * (1 + truth["out"].abs().max().item())
    assert torch.equal(auto, out)  # auto picks decode for one row


def strengthen_table(enc):
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(10)))
    return enc


# ----------------------------------------------------------------------------- bad input


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match=r"pe QueryConditionedBias has num_heads=3; the layer"):
        RelativeSelfAttention(D_MODEL, HEADS, pe=QueryConditionedBias(3))
    with pytest.raises(ValueError, match=r"rank must be an int in \[1, 4096\]; got 0"):
        RelativeSelfAttention(D_MODEL, HEADS, pe=relattn.pe.create("inkling", HEADS, rank=0))
    with pytest.raises(ValueError, match=r"config.pe must be one of"):
        TinyLMConfig(pe="foxx")
    fox = make_layer("fox", "reference")
    with pytest.raises(ValueError, match=r"latents needs a layer with pe='inkling'"):
        fox.latents(torch.randn(1, 3, D_MODEL))
    with pytest.raises(ValueError, match=r"log_forget needs a layer with pe='fox'"):
        make_layer("inkling", "reference").log_forget(torch.randn(1, 3, D_MODEL))
    # a cache filled without a forget gate, then used by a fox layer, and the reverse
    plain = RelativeSelfAttention(D_MODEL, HEADS, KV_HEADS, pe="t5")
    cache = KVCache(1, 1, KV_HEADS, D_MODEL // HEADS, 10)
    with torch.no_grad():
        plain(torch.randn(1, 3, D_MODEL), cache=cache)
        with pytest.raises(ValueError, match=r"log_f \(a forget gate\) must be given in every"):
            fox(torch.randn(1, 1, D_MODEL), cache=cache)
        cache.reset()
        fox(torch.randn(1, 3, D_MODEL), cache=cache)
        with pytest.raises(ValueError, match=r"log_f \(a forget gate\) must be given in every"):
            plain(torch.randn(1, 1, D_MODEL), cache=cache)
    layer_cache = cache.layer(0)
    k = torch.zeros(1, KV_HEADS, 1, D_MODEL // HEADS)
    with pytest.raises(ValueError, match=r"log_f must cover the new tokens: shape \(B, Hq, n\)"):
        layer_cache.update(k, k, log_f=torch.zeros(1, HEADS, 2))
    with pytest.raises(TypeError, match="log_f must be a floating-point tensor"):
        layer_cache.update(k, k, log_f=torch.zeros(1, HEADS, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"log_f must have the 4 heads"):
        layer_cache.update(k, k, log_f=torch.zeros(1, 2, 1))
    assert layer_cache.length == 3  # nothing appended by the refused calls


# ----------------------------------------------------------------------------- torch.compile


@pytest.mark.slow
@pytest.mark.parametrize("pe", TOKEN)
def test_compiled_layer_without_graph_breaks(pe):
    """fullgraph=True: the layer's projection, the term and the attention op trace as one
    graph; forward and backward equal eager."""
    torch._dynamo.reset()
    layer = make_layer(pe, "auto", seed=11)
    x = torch.randn(2, 10, D_MODEL, generator=torch.Generator().manual_seed(12))
    g = torch.randn(2, 10, D_MODEL, generator=torch.Generator().manual_seed(13))
    eager = grads(layer, x, g)
    compiled = torch.compile(layer, fullgraph=True)
    got = grads(compiled, x, g, params=layer)
    for name, want in eager.items():
        assert max_err(got[name], want) <= 1e-5 * (1 + want.abs().max().item()), name
    torch._dynamo.reset()
