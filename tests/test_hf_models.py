"""transformers models through relattn: same logits, gradients and generations as the model's own
eager path, for every supported family; no N×N bias or mask on the relattn path.

Every model is a tiny random one built from a config here (nothing is downloaded). Falcon is
compared with its SDPA path: its eager path in transformers 5.24 adds ALiBi twice (see
``test_falcon_eager_adds_alibi_twice``). ``make test`` runs these tests on the locked
transformers and again on the supported range's floor (``requirements/hf-floor.txt``).
"""

from __future__ import annotations

import copy
import inspect
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import masking_utils  # noqa: E402
from transformers.models.bloom import modeling_bloom  # noqa: E402
from transformers.models.falcon import modeling_falcon  # noqa: E402
from transformers.models.mpt import modeling_mpt  # noqa: E402

import relattn.integrations.transformers as rh  # noqa: E402
from relattn.integrations.transformers import _forwards, apply  # noqa: E402

VOCAB = 96
SEQ2SEQ = ("t5", "flan-t5", "mt5", "umt5")
CAUSAL = ("bloom", "mpt", "falcon", "falcon-new")
FAMILIES = SEQ2SEQ + CAUSAL


def _t5_kwargs(**kw) -> dict:
    return dict(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
        num_heads=4, relative_attention_num_buckets=16, relative_attention_max_distance=24,
        dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **kw,
    )  # fmt: skip


def build(family: str, seed: int = 0, attn: str | None = None) -> transformers.PreTrainedModel:
    """A tiny random model of ``family`` in eval mode, on its reference attention path (SDPA for
    Falcon, eager for the others) unless ``attn`` names another.

    Heads: 6 for BLOOM and MPT (their slope rules for a head count that is not a power of
    two); 4 for Falcon (power-of-two slopes are exact in bfloat16, see docs/huggingface.md).
    """
    torch.manual_seed(seed)
    t = transformers
    if attn is None:
        attn = "sdpa" if family.startswith("falcon") else "eager"
    if family == "t5":
        model = t.T5ForConditionalGeneration(t.T5Config(**_t5_kwargs(attn_implementation=attn)))
    elif family == "flan-t5":  # T5 v1.1 layout: gated GELU, untied head
        cfg = t.T5Config(
            **_t5_kwargs(
                feed_forward_proj="gated-gelu", tie_word_embeddings=False, attn_implementation=attn
            )
        )
        model = t.T5ForConditionalGeneration(cfg)
    elif family == "mt5":
        model = t.MT5ForConditionalGeneration(t.MT5Config(**_t5_kwargs(attn_implementation=attn)))
    elif family == "umt5":
        model = t.UMT5ForConditionalGeneration(t.UMT5Config(**_t5_kwargs(attn_implementation=attn)))
    elif family == "bloom":
        model = t.BloomForCausalLM(
            t.BloomConfig(
                vocab_size=VOCAB, hidden_size=48, n_layer=2, n_head=6, attn_implementation=attn
            )
        )
    elif family == "mpt":
        cfg = t.MptConfig(
            vocab_size=VOCAB, d_model=48, n_layers=2, n_heads=6, max_seq_len=128, use_cache=True,
            attn_implementation=attn,
        )  # fmt: skip
        model = t.MptForCausalLM(cfg)
    elif family == "falcon":  # multi-query: one key/value head
        cfg = t.FalconConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            alibi=True, multi_query=True, parallel_attn=False, bias=True, attn_implementation=attn,
        )  # fmt: skip
        model = t.FalconForCausalLM(cfg)
    elif family == "falcon-new":  # grouped keys and values, parallel attention and MLP
        cfg = t.FalconConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_kv_heads=2, alibi=True, new_decoder_architecture=True, bias=False,
            attn_implementation=attn,
        )  # fmt: skip
        model = t.FalconForCausalLM(cfg)
    else:
        raise ValueError(family)
    assert model.config._attn_implementation == attn
    with torch.no_grad():  # T5 biases large enough that a wrong bucket shows in the logits
        for name, p in model.named_parameters():
            if "relative_attention_bias" in name:
                p.mul_(4.0)
    return model.eval()


def inputs(family: str, seed: int = 1) -> dict:
    """A padded batch of 2: T5 pads on the right (encoder and decoder), the LMs on the left."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (2, 40), generator=g)
    mask = torch.ones_like(ids)
    if family in SEQ2SEQ:
        mask[1, 31:] = 0
        dec = torch.randint(2, VOCAB, (2, 33), generator=g)
        dec_mask = torch.ones_like(dec)
        dec_mask[0, 28:] = 0
        return dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec,
                    decoder_attention_mask=dec_mask)  # fmt: skip
    mask[1, :7] = 0
    return dict(input_ids=ids, attention_mask=mask)


def real(family: str, batch: dict) -> torch.Tensor:
    """Positions whose outputs are defined in every implementation: a left-padded position sees
    no key at all (relattn gives 0 there, transformers junk); T5's rows all see a key."""
    if family in SEQ2SEQ:
        return torch.ones_like(batch["decoder_input_ids"], dtype=torch.bool)
    return batch["attention_mask"].bool()


def assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float, label: str) -> None:
    err = (got.double() - want.double()).abs().max().item()
    tol = rtol * want.double().abs().max().item() + 1e-12
    assert err <= tol, f"{label}: max error {err:.3g} > {tol:.3g}"


def loss_of(family: str, model, batch: dict) -> torch.Tensor:
    where = real(family, batch)
    logits = model(**batch).logits
    target = batch["decoder_input_ids"] if family in SEQ2SEQ else batch["input_ids"]
    target = target.roll(-1, dims=1)
    return torch.nn.functional.cross_entropy(logits[where], target[where])


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request):
    """(family, the model on its reference path, an applied deep copy)."""
    model = build(request.param)
    return request.param, model, apply(copy.deepcopy(model))


# ----------------------------------------------------------------------------- parity


def test_logits_match(pair):
    family, model, applied = pair
    batch = inputs(family)
    where = real(family, batch)
    with torch.no_grad():
        want, got = model(**batch).logits, applied(**batch).logits
    assert_close(got[where], want[where], 1e-5, family)
    # the padding is really applied: without the mask, the padded row's logits change
    unmasked = {k: v for k, v in batch.items() if "attention_mask" not in k}
    with torch.no_grad():
        other = applied(**unmasked).logits
    assert (other[1] - got[1])[where[1]].abs().max() > 1e-4


def test_gradients_match(pair):
    family, model, applied = pair
    batch = inputs(family)
    grads = []
    for m in (model, applied):
        m.train()  # dropout is 0 in these configs; training mode must not trip the check
        m.zero_grad()
        loss_of(family, m, batch).backward()
        m.eval()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    want, got = grads
    assert got.keys() == want.keys() and len(want) == len(list(model.parameters()))
    for name in want:
        assert_close(got[name], want[name], 1e-5, f"{family} grad {name}")
    if family in SEQ2SEQ:
        assert any("relative_attention_bias" in n and want[n].abs().max() > 0 for n in want)


def test_generation_matches_with_cache(pair, monkeypatch):
    family, model, applied = pair
    batch = inputs(family)
    gen = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False)
    src = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    want = model.generate(**src, **gen)
    offsets = []
    real_attention = _forwards.attention

    def spy(q, k, v, pe, **kw):
        offsets.append((q.shape[2], kw.get("q_offset", 0)))
        return real_attention(q, k, v, pe, **kw)

    monkeypatch.setattr(_forwards, "attention", spy)
    got = applied.generate(**src, **gen)
    assert got.shape == want.shape and want.shape[1] >= 20
    assert torch.equal(got, want), f"{family}: {got.tolist()} != {want.tolist()}"
    # one query row at a time, placed after the cached keys
    assert (1, 19 if family in SEQ2SEQ else 40 + 18) in offsets


@pytest.mark.parametrize("family", ["t5", "bloom"])
def test_generation_with_a_static_cache(family):
    """A static cache holds max-length keys, most of them empty: q_offset comes from the tokens
    it has seen, not from its size."""
    model = build(family)
    applied = apply(copy.deepcopy(model))
    batch = inputs(family)
    src = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    gen = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, cache_implementation="static")
    assert torch.equal(applied.generate(**src, **gen), model.generate(**src, **gen))


def test_no_position_bias_or_mask_is_built(pair, monkeypatch):
    family, _, applied = pair

    def forbidden(*args, **kwargs):
        raise AssertionError("an N×N bias or mask was built on the relattn path")

    for name in ("eager", "sdpa"):
        monkeypatch.setitem(masking_utils.AttentionMaskInterface._global_mapping, name, forbidden)
    for module in (modeling_bloom, modeling_falcon):
        monkeypatch.setattr(module, "build_alibi_tensor", forbidden)
    monkeypatch.setattr(modeling_mpt, "build_mpt_alibi_tensor", forbidden)
    for layer in applied.modules():
        if hasattr(layer, "compute_bias"):
            monkeypatch.setattr(type(layer), "compute_bias", forbidden)
    batch = inputs(family)
    applied.zero_grad()
    loss_of(family, applied, batch).backward()
    src = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    applied.generate(**src, max_new_tokens=3, do_sample=False)


def test_bf16_within_the_conformance_criterion(pair):
    """Against the float64 model, relattn's bfloat16 logits err at most 2× the reference
    path's bfloat16 error, plus one bfloat16 unit at the logits' magnitude.

    Unpadded: transformers' BLOOM turns a fully masked row into NaN in float64 (its softmax runs
    in float32, where float64's minimum is -inf), and 0 × NaN then reaches every later row."""
    family, model, applied = pair
    batch = {k: torch.ones_like(v) if "mask" in k else v for k, v in inputs(family).items()}
    where = real(family, batch)
    with torch.no_grad():
        truth = copy.deepcopy(model).double()(**batch).logits[where]
        naive = copy.deepcopy(model).bfloat16()(**batch).logits[where]
        got = copy.deepcopy(applied).bfloat16()(**batch).logits[where]
    assert got.dtype == torch.bfloat16
    err = (got.double() - truth).abs().max().item()
    err_naive = (naive.double() - truth).abs().max().item()
    eps = torch.finfo(torch.bfloat16).eps * (1 + truth.abs().max().item())
    assert err <= 2 * err_naive + eps, f"{family}: {err:.3g} > 2 × {err_naive:.3g} + {eps:.3g}"


# ----------------------------------------------------------------------------- T5 specifics


def test_t5_bias_is_the_models_weight():
    model = build("t5")
    keys = list(model.state_dict())
    n_params = len(list(model.parameters()))
    apply(model)
    assert list(model.state_dict()) == keys and len(list(model.parameters())) == n_params
    for stack in (model.encoder, model.decoder):
        owner = stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight
        for block in stack.block:
            pe = block.layer[0].SelfAttention._relattn_pe
            assert isinstance(pe, rh.SharedT5Bias) and pe.weight.data_ptr() == owner.data_ptr()
            assert pe.bidirectional is (stack is model.encoder)
        if stack is model.decoder:
            assert all(b.layer[1].EncDecAttention._relattn_pe is None for b in stack.block)
    # a training step moves the model's own weight, and the logits follow it
    batch = inputs("t5")
    weight = model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
    before = weight.detach().clone()
    with torch.no_grad():
        logits_before = model(**batch).logits
    loss_of("t5", model, batch).backward()
    torch.optim.SGD([weight], lr=1.0).step()
    assert not torch.equal(weight.detach(), before)
    with torch.no_grad():
        assert not torch.allclose(model(**batch).logits, logits_before)


def test_umt5_reads_a_bias_per_layer():
    model = apply(build("umt5"))
    for block in model.encoder.block:
        layer = block.layer[0].SelfAttention
        assert (
            layer._relattn_pe.weight.data_ptr() == layer.relative_attention_bias.weight.data_ptr()
        )


def test_t5_compiles_without_graph_breaks():
    """dynamo traces the whole applied T5 (encoder, decoder, loss) as one graph; inductor
    compiles an applied encoder layer with fullgraph=True, forward and backward, and matches
    eager, gradient of the model's bias weight included."""
    applied = apply(build("t5"))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(applied)(**inputs("t5"))
    assert explained.graph_count == 1 and explained.graph_break_count == 0

    torch.manual_seed(0)
    cfg = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4,
        dropout_rate=0.0, attn_implementation="eager",
    )  # fmt: skip
    model = transformers.T5EncoderModel(cfg)
    applied = apply(copy.deepcopy(model))
    ids = inputs("t5")["input_ids"]
    torch._dynamo.reset()
    compiled = torch.compile(applied, fullgraph=True)
    outs = [compiled(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state]
    probe = torch.randn(outs[0].shape, generator=torch.Generator().manual_seed(0))
    for out in outs:  # not a function of the norm alone, which RMS normalization fixes
        (out * probe).sum().backward()
    assert_close(outs[0], outs[1], 1e-5, "compiled")
    grads = [m.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.grad
             for m in (applied, model)]  # fmt: skip
    assert_close(grads[0], grads[1], 1e-5, "compiled bias gradient")
    torch._dynamo.reset()


def test_save_pretrained_round_trip(tmp_path):
    applied = apply(build("t5"))
    batch = inputs("t5")
    loss_of("t5", applied, batch).backward()  # one step, so the saved weights are trained ones
    torch.optim.SGD(applied.parameters(), lr=0.1).step()
    applied.zero_grad()
    applied.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["T5ForConditionalGeneration"]
    assert "relattn" not in json.dumps(config)
    loaded = transformers.T5ForConditionalGeneration.from_pretrained(
        tmp_path, attn_implementation="eager"
    ).eval()
    assert not rh.is_applied(loaded) and rh.is_applied(applied)
    want = applied.state_dict()
    for name, t in loaded.state_dict().items():
        assert torch.equal(t, want[name]), name
    with torch.no_grad():
        logits = applied(**batch).logits
        assert_close(loaded(**batch).logits, logits, 1e-5, "loaded eager")
        assert_close(apply(loaded)(**batch).logits, logits, 1e-5, "loaded applied")


# ----------------------------------------------------------------------------- conventions


def test_falcon_eager_adds_alibi_twice():
    """transformers 5.24's eager Falcon adds ALiBi inside the scores and again through the mask
    (its layers take an ``alibi`` argument); SDPA adds it once. From 5.25 ALiBi reaches the
    layers through the mask alone, so eager adds it once too. relattn follows SDPA (and
    Falcon's original ALiBi) on either."""
    model, eager = build("falcon"), build("falcon", attn="eager")
    applied = apply(copy.deepcopy(model))
    batch = inputs("falcon")
    where = real("falcon", batch)
    with torch.no_grad():
        sdpa, eag, got = (m(**batch).logits[where] for m in (model, eager, applied))
    assert_close(got, sdpa, 1e-5, "relattn vs sdpa")
    if "alibi" in inspect.signature(modeling_falcon.FalconAttention.forward).parameters:
        assert (eag - sdpa).abs().max() > 1e-3
    else:
        assert_close(got, eag, 1e-5, "relattn vs eager")


@pytest.mark.parametrize("num_heads", [1, 4, 6, 8, 12, 16])
def test_slopes_are_the_models(num_heads):
    """Each family's slopes equal what its transformers module builds (read off its own ALiBi
    tensor for two positions: column 1 minus column 0 is the slope)."""
    ones = torch.ones(1, 2, dtype=torch.long)
    bloom = modeling_bloom.build_alibi_tensor(ones, num_heads, torch.float32)[:, 0]
    assert torch.equal(rh.bloom_alibi_slopes(num_heads), bloom[:, 1] - bloom[:, 0])
    mpt = modeling_mpt.build_mpt_alibi_tensor(num_heads, 2)[:, 0]
    assert torch.equal(rh.mpt_alibi_slopes(num_heads), mpt[:, 1] - mpt[:, 0])
    falcon = modeling_falcon.build_alibi_tensor(ones, num_heads, torch.float32)[:, 0]
    head_dim = 8
    want = (falcon[:, 1] - falcon[:, 0]) / head_dim**0.5
    assert torch.equal(rh.falcon_alibi_slopes(num_heads, head_dim), want)
