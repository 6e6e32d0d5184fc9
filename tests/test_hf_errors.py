"""relattn's transformers integration: what it refuses (with a clear error) and the
conversions for users who port a model to relattn's own layers by hand."""

from __future__ import annotations

import copy
import inspect
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from test_hf_models import VOCAB, assert_close, build, inputs, real  # noqa: E402
from transformers.models.t5 import modeling_t5  # noqa: E402

import relattn  # noqa: E402
import relattn.integrations.transformers as rh  # noqa: E402
from relattn.integrations.transformers import apply  # noqa: E402


def test_refuses_what_is_not_a_transformers_model():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        apply(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="ignore_attention_dropout must be a bool"):
        apply(build("t5"), ignore_attention_dropout="yes")


def test_refuses_an_unlisted_family():
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2)
    with pytest.raises(NotImplementedError, match="'gpt2'.*"):
        apply(transformers.GPT2LMHeadModel(cfg))


def test_refuses_an_untested_transformers_version():
    from relattn.integrations.transformers._apply import check_version

    check_version(transformers.__version__)
    for version in ("4.46.0", "5.23.1", "6.0.0"):
        with pytest.raises(NotImplementedError, match=f"installed transformers is {version}"):
            check_version(version)


def test_refuses_a_changed_layer_signature(monkeypatch):
    def forward(self, hidden_states, past_key_values=None):
        return hidden_states

    monkeypatch.setattr(modeling_t5.T5Attention, "forward", forward)
    with pytest.raises(NotImplementedError, match=r"T5Attention.forward in transformers .* takes"):
        apply(build("t5"))


def test_refusal_names_the_checked_versions_and_what_to_do(monkeypatch):
    from transformers.models.falcon import modeling_falcon

    def forward(self, hidden_states, attention_mask, sliding_bias=None, **kwargs):
        return hidden_states

    monkeypatch.setattr(modeling_falcon.FalconAttention, "forward", forward)
    with pytest.raises(NotImplementedError) as e:
        apply(build("falcon"))
    message = str(e.value)
    assert "takes ['sliding_bias'], which relattn does not know" in message
    assert "checked on 5.24.0, 5.25.0" in message
    assert "pip install 'transformers==5.25.0'" in message


def test_a_signature_from_another_release_is_bound_by_name(monkeypatch):
    """A forward whose parameters moved (Falcon 5.24 had ``alibi`` second; 5.25 dropped it) is
    called through the installed signature: positional and keyword calls reach the same
    arguments, and a value where the prepared model passes None is refused."""
    from transformers.models.falcon import modeling_falcon

    model = build("falcon")
    want = apply(copy.deepcopy(model))

    def forward(
        self,
        hidden_states,
        alibi,
        attention_mask,
        layer_past=None,
        use_cache=False,
        output_attentions=False,
        position_ids=None,
        position_embeddings=None,
        **kwargs,
    ):
        raise AssertionError("replaced by apply()")

    monkeypatch.setattr(modeling_falcon.FalconAttention, "forward", forward)
    applied = apply(copy.deepcopy(model))
    layer = applied.transformer.h[0].self_attention
    assert list(inspect.signature(type(layer).forward).parameters) == list(
        inspect.signature(forward).parameters
    )
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        by_name = layer(hidden_states=x, alibi=None, attention_mask=None)[0]
        by_position = layer(x, None, None)[0]
        assert torch.equal(by_name, by_position)
        installed = want.transformer.h[0].self_attention  # this transformers' own signature
        alibi = (
            {"alibi": None} if "alibi" in inspect.signature(installed.forward).parameters else {}
        )
        assert torch.equal(by_name, installed(hidden_states=x, attention_mask=None, **alibi)[0])
    with pytest.raises(NotImplementedError, match="given alibi=<a value>"):
        layer(x, torch.zeros(2, 4, 1, 5), None)


@pytest.mark.parametrize("family", ["t5", "bloom", "mpt", "falcon"])
def test_refuses_output_attentions(family):
    model = apply(build(family))
    with pytest.raises(NotImplementedError, match="output_attentions=True"):
        model(**inputs(family), output_attentions=True)
    fresh = build(family, attn="eager")
    fresh.config.output_attentions = True
    with pytest.raises(NotImplementedError, match="output_attentions=True"):
        apply(fresh)


def test_attention_dropout_in_training_is_refused_unless_ignored():
    torch.manual_seed(0)
    cfg = transformers.T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=16, num_layers=1, num_heads=4,
        dropout_rate=0.1, decoder_start_token_id=0, pad_token_id=0,
    )  # fmt: skip
    model = transformers.T5ForConditionalGeneration(cfg)
    batch = inputs("t5")
    applied = apply(copy.deepcopy(model)).train()
    with pytest.raises(NotImplementedError, match="dropout p=0.1.*ignore_attention_dropout"):
        applied(**batch)
    applied.eval()(**batch)  # no dropout in eval mode
    apply(copy.deepcopy(model), ignore_attention_dropout=True).train()(**batch)


def test_refuses_family_configurations_it_cannot_match():
    falcon = transformers.FalconConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, alibi=False
    )
    with pytest.raises(NotImplementedError, match="alibi=False"):
        apply(transformers.FalconForCausalLM(falcon))
    mpt = transformers.MptConfig(
        vocab_size=VOCAB, d_model=16, n_layers=1, n_heads=2, attn_config={"alibi_bias_max": 4}
    )
    with pytest.raises(NotImplementedError, match="alibi_bias_max=4"):
        apply(transformers.MptForCausalLM(mpt))


def test_the_name_alone_is_refused_by_transformers(tmp_path):
    """apply() registers "relattn" for masks only, so asking transformers for it without
    apply() fails there instead of running eager layers on a key padding mask."""
    apply(build("bloom"))
    build("bloom").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match='attn_implementation="relattn"'):
        transformers.BloomForCausalLM.from_pretrained(tmp_path, attn_implementation="relattn")


def test_alibi_padding_with_holes():
    """BLOOM and Falcon count ALiBi distance over real tokens only: holes are refused. MPT
    counts positions, like relattn, and matches its eager path with holes too."""
    batch = inputs("bloom")
    batch["attention_mask"][0, 10:13] = 0
    with pytest.raises(NotImplementedError, match="row 0 has padding between real tokens"):
        apply(build("bloom"))(**batch)
    model = build("mpt")
    applied = apply(copy.deepcopy(model))
    where = real("mpt", batch)
    with torch.no_grad():
        assert_close(applied(**batch).logits[where], model(**batch).logits[where], 1e-5, "mpt")


def test_refuses_custom_and_packed_masks():
    model = apply(build("bloom"))
    batch = inputs("bloom")
    n = batch["input_ids"].shape[1]
    batch["attention_mask"] = torch.ones(2, 1, n, n)
    with pytest.raises(NotImplementedError, match="4-D mask"):
        model(**batch)
    falcon = apply(build("falcon"))
    ids = inputs("falcon")["input_ids"]
    packed = torch.cat([torch.arange(20), torch.arange(20)]).expand(2, -1)
    with pytest.raises(NotImplementedError, match="packed sequences"):
        falcon(input_ids=ids, position_ids=packed, use_cache=False)


def test_apply_is_idempotent():
    model = build("t5")
    once = apply(copy.deepcopy(model))
    assert rh.is_applied(once) and not rh.is_applied(model)
    twice = apply(apply(copy.deepcopy(model)))
    batch = inputs("t5")
    with torch.no_grad():
        assert torch.equal(once(**batch).logits, twice(**batch).logits)


# ----------------------------------------------------------------------------- conversions


def test_t5_bias_conversion_reproduces_a_t5_layer():
    """relattn.attention with the converted encoding is T5's encoder layer (scale 1, no mask,
    bidirectional buckets), checked against the layer's own eager forward."""
    torch.manual_seed(0)
    cfg = transformers.T5Config(
        d_model=32, d_kv=8, num_heads=4, relative_attention_num_buckets=16,
        relative_attention_max_distance=24, dropout_rate=0.0, attn_implementation="eager",
    )  # fmt: skip
    layer = modeling_t5.T5Attention(cfg, has_relative_attention_bias=True).eval()
    with torch.no_grad():
        layer.relative_attention_bias.weight.mul_(4.0)
    x = torch.randn(2, 50, 32)
    with torch.no_grad():
        want = layer(x)[0]
    bias = rh.t5_bias_from_transformers(layer)
    assert type(bias) is relattn.pe.T5Bias and bias.bidirectional
    assert bias.weight.data_ptr() != layer.relative_attention_bias.weight.data_ptr()
    q, k, v = (p(x).view(2, 50, 4, 8).transpose(1, 2) for p in (layer.q, layer.k, layer.v))
    out = relattn.attention(q, k, v, bias, causal=False, scale=1.0)
    with torch.no_grad():
        got = layer.o(out.transpose(1, 2).reshape(2, 50, 32))
    assert_close(got, want, 1e-5, "converted T5 layer")
    shared = rh.t5_bias_from_transformers(layer, share=True)
    shared.table(-60, 60).sum().backward()
    assert layer.relative_attention_bias.weight.grad.abs().sum() > 0
    with pytest.raises(TypeError, match="share must be a bool"):
        rh.t5_bias_from_transformers(layer, share=1)
    with pytest.raises(TypeError, match="relative_attention_bias"):
        rh.t5_bias_from_transformers(torch.nn.Linear(2, 2))


def test_alibi_conversion():
    for family, slopes in [
        ("bloom", rh.bloom_alibi_slopes(6)),
        ("mpt", rh.mpt_alibi_slopes(6)),
        ("falcon", rh.falcon_alibi_slopes(4, 8)),
    ]:
        pe = rh.alibi_from_transformers(build(family).config)
        assert torch.equal(pe.slopes, slopes)
        d = torch.arange(-3, 5).abs().float()
        assert torch.equal(pe.table(-3, 4), -slopes[:, None] * d[None, :])
    with pytest.raises(ValueError, match="BLOOM, MPT or Falcon"):
        rh.alibi_from_transformers(build("t5").config)
    with pytest.raises(ValueError, match="1-D tensor"):
        rh.SlopesALiBi(torch.ones(2, 2))
