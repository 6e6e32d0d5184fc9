"""TinyLM: cached decoding == full forward, generation (seeds, greedy, top-k), save/load, errors."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from cases import LAYER_ENCODINGS
from oracle import max_err

from relattn.cache import KVCache
from relattn.models import TinyLM, TinyLMConfig
from relattn.models.sampling import sample_next
from relattn.nn import RelativeSelfAttention


def tiny(seed: int = 0, **kw) -> TinyLM:
    torch.manual_seed(seed)
    config = TinyLMConfig(**{"d_model": 32, "num_heads": 2, "num_layers": 2, **kw})
    model = TinyLM(config).eval()
    with torch.no_grad():  # position terms large enough to matter
        for block in model.blocks:
            if block.attn.pe is not None:
                for p in block.attn.pe.parameters():
                    p.add_(torch.randn_like(p) * 0.5)
    return model


def test_structure():
    model = tiny(pe="kerple", num_kv_heads=1)
    assert len(model.blocks) == 2
    for block in model.blocks:
        assert isinstance(block.attn, RelativeSelfAttention) and block.mlp is not None
    assert model.blocks[0].attn.pe is not model.blocks[1].attn.pe  # one encoding per layer
    logits = model(torch.randint(0, 256, (3, 7)))
    assert logits.shape == (3, 7, 256)
    # tied head: the embedding is the only vocab-sized matrix, counted once
    n = sum(p.numel() for name, p in model.named_parameters())
    assert model.num_parameters() == n
    assert sum(p.numel() == 256 * 32 for p in model.parameters()) == 1


@pytest.mark.parametrize("pe", LAYER_ENCODINGS)
@pytest.mark.parametrize("rope", [False, True], ids=["norope", "rope"])
def test_cached_decoding_equals_full_forward(pe, rope):
    """Through the whole model with backend="auto": a 66-token prefill is past the reference's
    tiny-input limit (so it runs chunked on CPU), the single tokens run the reference."""
    model = tiny(pe=pe, rope=rope, num_kv_heads=1)
    idx = torch.randint(0, 256, (2, 72))
    with torch.no_grad():
        for window in (None, 6):
            full = model(idx, window=window)
            cache = model.new_cache(2, capacity=72, window=window)
            steps = [model(idx[:, :66], cache=cache)]
            steps += [model(idx[:, t : t + 1], cache=cache) for t in range(66, 72)]
            assert cache.length == 72
            assert max_err(torch.cat(steps, 1), full) <= 1e-5, f"window={window}"


def test_bfloat16_model_prefill_cache_and_training():
    """TinyLM in bfloat16 at D = 64 (the CPU kernel's bf16 tiles where the CPU has them; decode
    for the single tokens): the logits of a full forward and of a cached prefill + steps are
    within 2x the error of the same bf16 model run by the chunked backend (against the model
    in float64, same weights), and a training step gives finite bf16 gradients to every
    parameter, the encoding's table included."""
    model = tiny(pe="t5", d_model=128, num_heads=2, num_kv_heads=1).to(torch.bfloat16)
    exact = tiny(pe="t5", d_model=128, num_heads=2, num_kv_heads=1).double()
    exact.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    chunked = tiny(pe="t5", d_model=128, num_heads=2, num_kv_heads=1, backend="chunked")
    chunked = chunked.to(torch.bfloat16)
    chunked.load_state_dict(model.state_dict())
    idx = torch.randint(0, 256, (1, 300))
    with torch.no_grad():
        truth = exact(idx)
        full = model(idx)
        cache = model.new_cache(1, capacity=300)
        steps = [model(idx[:, :294], cache=cache)]
        steps += [model(idx[:, t : t + 1], cache=cache) for t in range(294, 300)]
        cached = torch.cat(steps, 1)
        naive_err = max_err(chunked(idx), truth)
    assert full.dtype == cached.dtype == torch.bfloat16
    eps = torch.finfo(torch.bfloat16).eps * (1 + truth.abs().max().item())
    for name, got in (("full", full), ("cached", cached)):
        err = max_err(got, truth)
        assert err <= 2 * naive_err + eps, f"{name}: {err:.3g} vs chunked {naive_err:.3g}"
    model.train()
    logits = model(idx[:, :200])
    loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), idx[0, 1:200])
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.bfloat16, name
        assert torch.isfinite(p.grad).all(), name
    table = [p for n, p in model.named_parameters() if "pe" in n]
    assert table and all(p.grad.abs().sum() > 0 for p in table)


def test_generate_reproducible_under_seed_and_leaves_global_rng_alone():
    model = tiny()
    prompt = torch.randint(0, 256, (2, 5))
    state = torch.get_rng_state()
    a = model.generate(prompt, 12, seed=1)
    b = model.generate(prompt, 12, seed=1)
    c = model.generate(prompt, 12, seed=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert a.shape == (2, 17) and torch.equal(a[:, :5], prompt)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert int(a.min()) >= 0 and int(a.max()) < 256


def test_greedy_is_deterministic_and_matches_full_forward_argmax():
    model = tiny(pe="alibi", rope=True)
    prompt = torch.randint(0, 256, (6,))
    greedy = model.generate(prompt, 10, temperature=0.0, seed=1)
    assert greedy.shape == (16,)
    assert torch.equal(greedy, model.generate(prompt, 10, temperature=0, seed=2))
    assert torch.equal(greedy, model.generate(prompt, 10, top_k=1, seed=3))
    seq = prompt[None]
    with torch.no_grad():
        for _ in range(10):  # no cache: the whole sequence each step
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(greedy, seq[0])


def test_top_k_restricts_sampling():
    model = tiny()
    prompt = torch.randint(0, 256, (1, 4))
    with torch.no_grad():
        top3 = model(prompt)[0, -1].topk(3).indices
    firsts = {int(model.generate(prompt, 1, top_k=3, seed=s)[0, -1]) for s in range(20)}
    assert firsts <= set(top3.tolist())


def test_generate_edge_cases_and_mode():
    model = tiny(max_seq_len=12)
    prompt = torch.randint(0, 256, (2, 4))
    assert torch.equal(model.generate(prompt, 0), prompt)
    assert model.generate(prompt, 8, seed=0).shape == (2, 12)  # exactly max_seq_len
    model.train()
    model.generate(prompt, 2, seed=0)
    assert model.training  # mode restored


@pytest.mark.parametrize(
    "dtype",
    [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32],
)
def test_any_integer_dtype_gives_the_same_ids(dtype):
    model = tiny()
    prompt = torch.tensor([[3, 100, 127], [0, 1, 2]])
    want = model.generate(prompt, 4, seed=5)
    got = model.generate(prompt.to(dtype), 4, seed=5)
    assert got.dtype == torch.int64 and torch.equal(got, want)
    with torch.no_grad():
        assert torch.equal(model(prompt.to(dtype)), model(prompt))


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-30])
def test_tiny_temperature_is_greedy(temperature):
    model = tiny()
    prompt = torch.randint(0, 256, (2, 4))
    greedy = model.generate(prompt, 6, temperature=0)
    assert torch.equal(model.generate(prompt, 6, temperature=temperature, seed=3), greedy)


def test_huge_temperature_is_uniform_and_finite():
    model = tiny(vocab_size=4)
    prompt = torch.zeros(1, 1, dtype=torch.long)
    draws = {int(model.generate(prompt, 1, temperature=1e308, seed=s)[0, -1]) for s in range(40)}
    assert draws == {0, 1, 2, 3}


@pytest.mark.parametrize("temperature, top_k", [(1.0, None), (0.5, None), (2.0, 3), (1e-3, None)])
def test_sampling_follows_softmax_of_logits_over_temperature(temperature, top_k):
    """20,000 draws from fixed logits: every token's frequency within 5 standard errors of
    softmax(logits / T) (restricted to the top k), computed independently in float64."""
    logits64 = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0], dtype=torch.float64)
    if temperature < 0.01:
        logits64 = logits64 * temperature  # near-ties, so a small temperature still spreads them
    n = 20_000
    gen = torch.Generator().manual_seed(0)
    tokens = sample_next(logits64.float().expand(n, -1), temperature, top_k, gen)[:, 0]
    counts = torch.bincount(tokens, minlength=5).double()
    p = torch.softmax(logits64 / temperature, dim=0)
    if top_k is not None:
        keep = torch.zeros_like(p, dtype=torch.bool)
        keep[logits64.topk(top_k).indices] = True
        p = torch.where(keep, p, 0.0)
        p = p / p.sum()
    se = (n * p * (1 - p)).sqrt()
    assert ((counts - n * p).abs() <= 5 * se + 1e-9).all(), (counts / n, p)


def test_seed_range():
    model = tiny()
    prompt = torch.zeros(1, 2, dtype=torch.long)
    a = model.generate(prompt, 3, seed=2**63 - 1)
    assert torch.equal(a, model.generate(prompt, 3, seed=2**63 - 1))
    for seed in (2**63, 2**64, -1):
        with pytest.raises(ValueError, match="seed"):
            model.generate(prompt, 3, seed=seed)


@pytest.mark.parametrize("pe, rope", [("t5", False), ("alibi", True), ("kerple", False),
                                      ("offset", True), ("none", True)])  # fmt: skip
def test_save_load_round_trip(tmp_path, pe, rope):
    model = tiny(pe=pe, rope=rope, num_kv_heads=1, vocab_size=100)
    model.save(tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} == {"config.json", "model.safetensors"}
    loaded = TinyLM.load(tmp_path / "m")
    assert loaded.config == model.config
    idx = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(idx), model(idx))


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        TinyLM.load(tmp_path / "nothing")
    model = tiny()
    model.save(tmp_path)
    config = tmp_path / "config.json"
    good = config.read_text()
    config.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        TinyLM.load(tmp_path)
    config.write_text(json.dumps({**json.loads(good), "heads": 3}))
    with pytest.raises(ValueError, match="heads"):
        TinyLM.load(tmp_path)
    config.write_text(json.dumps({**json.loads(good), "pe": "rotary"}))
    with pytest.raises(ValueError, match="config.pe"):
        TinyLM.load(tmp_path)
    config.write_text(json.dumps({**json.loads(good), "d_model": 64}))
    with pytest.raises(ValueError, match="different saves.*d_model=64"):
        TinyLM.load(tmp_path)
    config.write_text(good)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="safetensors"):
        TinyLM.load(tmp_path)


def test_missing_safetensors_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match=r"relattn\[models\]"):
        tiny().save(tmp_path)


def test_cache_and_input_errors():
    model = tiny()
    cache = model.new_cache(1, capacity=4)
    assert isinstance(cache, KVCache) and cache.num_layers == 2
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="capacity=4"):
            model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="layers"):
            model(torch.zeros(1, 1, dtype=torch.long), cache=KVCache(3, 1, 2, 16, 8))
        with pytest.raises(ValueError, match="idx"):
            model(torch.full((1, 2), 256))
        with pytest.raises(ValueError, match="idx"):
            model(torch.zeros(4, dtype=torch.long))


def test_config_edited_after_construction_is_checked_by_the_model():
    config = TinyLMConfig(d_model=32, num_heads=2)
    config.num_heads = 3
    with pytest.raises(ValueError, match="config.d_model"):
        TinyLM(config)
    config.num_heads, config.rope = 2, "yes"
    with pytest.raises(TypeError, match="config.rope"):
        TinyLM(config)


def test_text_to_ids_and_back():
    """Byte ids of UTF-8 text, and text of byte ids (invalid UTF-8 becomes U+FFFD); the first
    names, encode and decode, are the same functions."""
    import relattn.models as models
    from relattn.models import ids_to_text, text_to_ids

    ids = text_to_ids("héllo")
    assert ids.dtype == torch.long and ids.tolist() == list("héllo".encode())
    assert ids_to_text(ids) == "héllo" and ids_to_text([104, 105]) == "hi"
    assert ids_to_text(torch.tensor([0xC3])) == "\ufffd"
    assert models.encode is text_to_ids and models.decode is ids_to_text
    with pytest.raises(TypeError, match="text must be a str; got bytes"):
        text_to_ids(b"hi")
    with pytest.raises(ValueError, match=r"ids must be one sequence \(N,\)"):
        ids_to_text(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"ids must be byte values: integers in \[0, 256\)"):
        ids_to_text([104, 256])
