"""KVCache: prefill then token-by-token decoding equals one full forward, for every encoding ×
backend, with and without RoPE and a sliding window; overflow and misuse raise clear errors."""

from __future__ import annotations

import pytest
import torch
from cases import BACKENDS, LAYER_ENCODINGS, skip_unless_token_backend, strengthen
from hypothesis import given, settings
from hypothesis import strategies as st
from oracle import max_err, seed_of

from relattn.cache import KVCache, within_doc_positions
from relattn.nn import RelativeSelfAttention

D_MODEL, HEADS, KV_HEADS = 32, 2, 1  # tiny: the triton backend runs in its interpreter on CPU


def make_layer(pe: str, rope: bool, backend: str, seed: int, **kw) -> RelativeSelfAttention:
    skip_unless_token_backend(pe, backend)
    torch.manual_seed(seed)
    layer = RelativeSelfAttention(D_MODEL, HEADS, KV_HEADS, pe=pe, rope=rope, backend=backend, **kw)
    return strengthen(layer).eval()


def decode(layer, x, chunks, window=None, cache_window=None, capacity=None, **masks):
    """Run ``x`` through ``layer`` in consecutive chunks of the given sizes with one cache."""
    b, n, _ = x.shape
    cache = KVCache(1, b, layer.num_kv_heads, layer.head_dim, capacity or n, window=cache_window)
    outs, start = [], 0
    for size in chunks:
        part = {k: m[:, start : start + size] for k, m in masks.items()}
        outs.append(layer(x[:, start : start + size], cache=cache.layer(0), window=window, **part))
        start += size
    assert start == n and cache.length == n
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pe", LAYER_ENCODINGS)
@pytest.mark.parametrize("rope", [False, True], ids=["norope", "rope"])
@pytest.mark.parametrize("window", [None, 4], ids=["full", "window4"])
def test_decode_equals_full_forward(backend, pe, rope, window):
    layer = make_layer(pe, rope, backend, seed_of(pe, rope, window))
    x = torch.randn(2, 14, D_MODEL)
    with torch.no_grad():
        full = layer(x, window=window)
        # prefill 6, a chunk of 3, then one token at a time
        chunks = [6, 3] + [1] * 5
        stepped = decode(layer, x, chunks, window=window, cache_window=window)
    assert max_err(stepped, full) <= 1e-5


@settings(deadline=None, max_examples=15)
@given(
    chunks=st.lists(st.integers(1, 5), min_size=1, max_size=6),
    window=st.none() | st.integers(1, 8),
    pe=st.sampled_from(LAYER_ENCODINGS),
    rope=st.booleans(),
)
def test_any_chunking_equals_full_forward(chunks, window, pe, rope):
    layer = make_layer(pe, rope, "reference", seed_of(pe, rope))
    x = torch.randn(1, sum(chunks), D_MODEL, generator=torch.Generator().manual_seed(len(chunks)))
    with torch.no_grad():
        full = layer(x, window=window)
        stepped = decode(layer, x, chunks, window=window, cache_window=window)
    assert max_err(stepped, full) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_cache_keeps_only_window_and_streams_past_capacity(backend):
    layer = make_layer("alibi", True, backend, seed=1)
    x = torch.randn(1, 20, D_MODEL)
    cache = KVCache(1, 1, KV_HEADS, layer.head_dim, capacity=None, window=5)
    assert cache.layer(0).slots == 4  # a query sees itself and the 4 keys before it
    with torch.no_grad():
        full = layer(x, window=5)
        outs = [layer(x[:, :9], cache=cache.layer(0))]  # window taken from the cache
        outs += [layer(x[:, t : t + 1], cache=cache.layer(0)) for t in range(9, 20)]
    assert cache.length == 20 and cache.layer(0).kept == 4
    assert max_err(torch.cat(outs, 1), full) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rope", [False, True], ids=["norope", "rope"])
def test_decode_with_doc_ids_and_padding_equals_full_forward(backend, rope):
    layer = make_layer("t5", rope, backend, seed=2)
    x = torch.randn(2, 12, D_MODEL)
    doc_ids = torch.tensor([[0] * 5 + [1] * 4 + [2] * 3, [7] * 2 + [3] * 10])
    padding = torch.ones(2, 12, dtype=torch.bool)
    padding[1, :2] = False  # a left-padded row
    masks = {"doc_ids": doc_ids, "key_padding_mask": padding}
    with torch.no_grad():
        full = layer(x, **masks)
        stepped = decode(layer, x, [4, 1, 1, 3, 1, 1, 1], **masks)
        windowed_full = layer(x, window=3, **masks)
        windowed = decode(layer, x, [4, 1, 1, 3, 1, 1, 1], window=3, cache_window=3, **masks)
    assert max_err(stepped, full) <= 1e-5
    assert max_err(windowed, windowed_full) <= 1e-5


def test_within_doc_positions_restart_and_carry():
    doc_ids = torch.tensor([[4, 4, 4, 9, 9, 1]])
    pos, starts = within_doc_positions(doc_ids, offset=10)
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0]]
    assert starts.tolist() == [[10, 10, 10, 13, 13, 15]]
    # continuing document 1 (which started at 15) from position 16
    pos, _ = within_doc_positions(
        torch.tensor([[1, 1, 2]]), 16, torch.tensor([1]), torch.tensor([15])
    )
    assert pos.tolist() == [[1, 2, 0]]


def test_gradients_reach_new_tokens_through_the_cache():
    layer = make_layer("kerple", True, "reference", seed=3)
    x = torch.randn(1, 8, D_MODEL, requires_grad=True)
    g = torch.randn(1, 8, D_MODEL)
    (gx_full,) = torch.autograd.grad((layer(x) * g).sum(), x)
    cache = KVCache(1, 1, KV_HEADS, layer.head_dim, 8)
    (gx_cached,) = torch.autograd.grad((layer(x, cache=cache) * g).sum(), x)
    assert max_err(gx_cached, gx_full) <= 1e-5


def test_length_and_reset():
    layer = make_layer("t5", False, "reference", seed=4)
    x = torch.randn(1, 6, D_MODEL)
    cache = KVCache(2, 1, KV_HEADS, layer.head_dim, 16)
    with torch.no_grad():
        first = layer(x, cache=cache.layer(0))
        assert cache.layer(0).length == 6 and cache.length == 0  # layer 1 has seen nothing
        layer(x, cache=cache.layer(1))
        assert cache.length == 6
        cache.reset()
        assert cache.length == 0
        again = layer(x, cache=cache.layer(0))
    assert torch.equal(first, again)


def test_overflow_raises_and_leaves_cache_untouched():
    layer = make_layer("t5", False, "reference", seed=5)
    cache = KVCache(1, 1, KV_HEADS, layer.head_dim, capacity=5)
    with torch.no_grad():
        layer(torch.randn(1, 4, D_MODEL), cache=cache)
        with pytest.raises(ValueError, match="capacity=5"):
            layer(torch.randn(1, 2, D_MODEL), cache=cache)
        assert cache.length == 4
        layer(torch.randn(1, 1, D_MODEL), cache=cache)  # exactly full is fine
        with pytest.raises(ValueError, match="overflow"):
            layer(torch.randn(1, 1, D_MODEL), cache=cache)
    # a window does not lift an explicit capacity
    windowed = KVCache(1, 1, KV_HEADS, layer.head_dim, capacity=3, window=2)
    with torch.no_grad(), pytest.raises(ValueError, match="capacity=3"):
        layer(torch.randn(1, 4, D_MODEL), cache=windowed)


def test_failed_update_leaves_the_cache_untouched():
    """Every rejected append raises before anything is stored (the corpus of bad calls is in
    test_bad_inputs_models.py); the cache then decodes as if the bad call never happened."""
    layer = make_layer("t5", True, "reference", seed=7)
    x = torch.randn(1, 6, D_MODEL)
    cache = KVCache(1, 1, KV_HEADS, layer.head_dim, capacity=6)
    lc = cache.layer(0)
    good = torch.zeros(1, KV_HEADS, 1, layer.head_dim)
    with torch.no_grad():
        first = layer(x[:, :3], cache=lc)
        stored = lc.k[:, :, :3].clone()
        bad_calls = [
            lambda: lc.update(good.double(), good.double()),
            lambda: lc.update(good, good[..., :-1]),
            lambda: lc.update(good, good, doc_ids=torch.zeros(1, 1)),
            lambda: lc.update(good, good, key_padding_mask=torch.ones(1, 2, dtype=torch.bool)),
            lambda: lc.update(torch.zeros(1, KV_HEADS, 4, layer.head_dim), good),
            lambda: lc.update(*[torch.zeros(1, KV_HEADS, 4, layer.head_dim)] * 2),  # overflow
        ]
        for call in bad_calls:
            with pytest.raises((TypeError, ValueError)):
                call()
            assert lc.length == 3 and lc.kept == 3 and torch.equal(lc.k[:, :, :3], stored)
        rest = layer(x[:, 3:], cache=lc)
        full = layer(x)
    assert max_err(torch.cat([first, rest], 1), full) <= 1e-5


def test_misuse_errors_name_the_argument():
    layer = make_layer("alibi", False, "reference", seed=6)
    x = torch.randn(2, 3, D_MODEL)
    with torch.no_grad():
        with pytest.raises(ValueError, match="cache.layer"):
            layer(x, cache=KVCache(2, 2, KV_HEADS, layer.head_dim, 8))
        with pytest.raises(ValueError, match=r"\(B, Hkv, D\)"):
            layer(x, cache=KVCache(1, 3, KV_HEADS, layer.head_dim, 8))  # wrong batch size
        with pytest.raises(TypeError, match="dtype"):
            layer(x, cache=KVCache(1, 2, KV_HEADS, layer.head_dim, 8, dtype=torch.float64))
        with pytest.raises(TypeError, match="cache"):
            layer(x, cache="cache")
        cache = KVCache(1, 2, KV_HEADS, layer.head_dim, 8, window=2)
        with pytest.raises(ValueError, match="window=3"):
            layer(x, cache=cache, window=3)
        cache = KVCache(1, 2, KV_HEADS, layer.head_dim, 8)
        layer(x, cache=cache, doc_ids=torch.zeros(2, 3, dtype=torch.long))
        with pytest.raises(ValueError, match="doc_ids"):
            layer(x, cache=cache)  # doc_ids in one call and not the next
        with pytest.raises(ValueError, match="key_padding_mask"):
            layer(
                x,
                cache=cache,
                doc_ids=torch.zeros(2, 3, dtype=torch.long),
                key_padding_mask=torch.ones(2, 9, dtype=torch.bool),
            )
    with pytest.raises(ValueError, match="index"):
        KVCache(2, 1, 1, 16, 4).layer(2)
