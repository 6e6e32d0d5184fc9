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
    "prompt, kwargs, error, match",
    [
        (torch.zeros(1, 3, dtype=torch.long), {"max_new_tokens": -1}, ValueError, "max_new_tokens"),
        (torch.zeros(1, 3, dtype=torch.long), {"temperature": -0.5}, ValueError, "temperature"),
        (torch.zeros(1, 3, dtype=torch.long), {"top_k": 0}, ValueError, "top_k"),
        (torch.tensor([[1, 256]]), {}, ValueError, "prompt_ids"),
        (torch.tensor([[-1, 2]]), {}, ValueError, "prompt_ids"),
        (torch.zeros(1, 0, dtype=torch.long), {}, ValueError, "empty"),
        (torch.zeros(1, 3), {}, TypeError, "prompt_ids"),
        (torch.zeros(1, 1, 3, dtype=torch.long), {}, ValueError, "prompt_ids"),
        (torch.zeros(1, 3, dtype=torch.long), {"max_new_tokens": 30}, ValueError, "max_seq_len"),
    ],
)
def test_generate_bad_arguments(prompt, kwargs, error, match):
    model = tiny(max_seq_len=32)
    with pytest.raises(error, match=match):
        model.generate(prompt, **{"max_new_tokens": 2, **kwargs})


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
    with pytest.raises(ValueError, match="does not match"):
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


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"vocab_size": 0}, "vocab_size"),
        ({"d_model": 30, "num_heads": 4}, "d_model"),
        ({"num_kv_heads": 3}, "num_kv_heads"),
        ({"pe": "rotary"}, "config.pe"),
        ({"rope": 1}, "config.rope"),
        ({"dropout": 1.5}, "dropout"),
        ({"backend": "gpu"}, "backend"),
        ({"max_seq_len": 0}, "max_seq_len"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        TinyLMConfig(**kwargs)
