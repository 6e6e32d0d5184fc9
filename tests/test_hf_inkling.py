"""The Inkling families (inkling, inkling2, inkling2_loop) through relattn: the same logits,
gradients and cached generations as the model's own eager path, the query-conditioned band
read from the model's own ``proj`` parameter, and no dense ``(B, H, Nq, Nk)`` bias built.

Every model is a tiny random one built from a config here (nothing is downloaded): sliding and
global layers, GQA (4 query heads over 2 key/value heads), a window of 8 tokens, band extents
of 8 (sliding) and 24 (global), and global log-scaling from position 5 so that it is active.
The bands' ``proj`` is scaled up so that a wrong offset or extent shows in the logits.
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from test_hf_models import assert_close  # noqa: E402
from transformers import masking_utils  # noqa: E402

import relattn  # noqa: E402
from relattn.backends.base import Backend, Layout  # noqa: E402
from relattn.backends.reference import scores_and_weights, token_gradients  # noqa: E402
from relattn.integrations.transformers import _inkling, apply  # noqa: E402

# The Inkling families arrived in transformers 5.25 (``make test`` also runs the floor, 5.24).
modeling_inkling = pytest.importorskip("transformers.models.inkling.modeling_inkling")
modeling_inkling2 = pytest.importorskip("transformers.models.inkling2.modeling_inkling2")
modeling_inkling2_loop = pytest.importorskip(
    "transformers.models.inkling2_loop.modeling_inkling2_loop"
)

VOCAB = 96
FAMILIES = ("inkling", "inkling2", "inkling2_loop")
MODELING = {
    "inkling": modeling_inkling,
    "inkling2": modeling_inkling2,
    "inkling2_loop": modeling_inkling2_loop,
}
BIAS_CLASS = {
    "inkling": "InklingRelativeLogits",
    "inkling2": "Inkling2RelativePositionBias",
    "inkling2_loop": "Inkling2LoopRelativePositionBias",
}


def _common(**kw) -> dict:
    return dict(
        vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=16,
        sliding_window_size=8, d_rel=4, rel_extent=24, log_scaling_n_floor=5,
        log_scaling_alpha=0.5, n_routed_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, attn_implementation="eager", **kw,
    )  # fmt: skip


def build(family: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A tiny random causal LM of ``family`` in eval mode on its eager path."""
    torch.manual_seed(seed)
    t = transformers
    if family == "inkling":
        cfg = t.InklingTextConfig(
            **_common(
                num_hidden_layers=3, layer_types=["hybrid_sliding", "hybrid", "hybrid_sliding"],
                intermediate_size=64, n_shared_experts=1,
                mlp_layer_types=["dense", "sparse", "dense"],
            )
        )  # fmt: skip
        model = t.InklingForCausalLM(cfg)
    elif family == "inkling2":
        cfg = t.Inkling2TextConfig(
            **_common(
                num_hidden_layers=4, n_layers_per_attn_res_block=2, unpadded_vocab_size=VOCAB,
                layer_types=["hybrid_sliding", "hybrid", "hybrid_sliding", "hybrid"],
            )
        )  # fmt: skip
        model = t.Inkling2ForCausalLM(cfg)
    elif family == "inkling2_loop":  # layers 1 and 2 run twice, each pass with its own cache
        cfg = t.Inkling2LoopTextConfig(
            **_common(
                num_hidden_layers=4, n_layers_per_attn_res_block=1, unpadded_vocab_size=VOCAB,
                layer_types=["hybrid_sliding", "hybrid", "hybrid_sliding", "hybrid"],
                loop_layer_index_start=1, loop_layer_index_end=3, loop_num_passes=2,
                loop_gate_rank=8,
            )
        )  # fmt: skip
        model = t.Inkling2LoopForCausalLM(cfg)
    else:
        raise ValueError(family)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".proj") and p.dim() == 2:  # the bands' (d_rel, extent) banks
                p.mul_(50.0)
    return model.eval()


def inputs(seed: int = 1, left_pad: int = 7) -> dict:
    """A batch of 2 × 40 tokens, the second row left-padded (as generate pads)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :left_pad] = 0
    return dict(input_ids=ids, attention_mask=mask)


def loss_of(model, batch: dict) -> torch.Tensor:
    where = batch["attention_mask"].bool()
    logits = model(**batch).logits
    target = batch["input_ids"].roll(-1, dims=1)
    return torch.nn.functional.cross_entropy(logits[where], target[where])


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request):
    """(family, the model on its eager path, an applied deep copy)."""
    model = build(request.param)
    return request.param, model, apply(copy.deepcopy(model))


# ----------------------------------------------------------------------------- parity


def test_logits_match(pair):
    family, model, applied = pair
    batch = inputs()
    where = batch["attention_mask"].bool()
    with torch.no_grad():
        want, got = model(**batch).logits, applied(**batch).logits
    assert_close(got[where], want[where], 1e-5, family)
    with torch.no_grad():  # the padding is applied: without the mask the padded row changes
        other = applied(input_ids=batch["input_ids"]).logits
    assert (other[1] - got[1])[where[1]].abs().max() > 1e-4


def test_the_band_matters(pair):
    """A perturbed ``proj`` moves the logits of both paths the same way (so the parity above
    is not that of a negligible term)."""
    family, model, applied = pair
    batch = {"input_ids": inputs()["input_ids"]}
    m, a = copy.deepcopy(model), copy.deepcopy(applied)
    with torch.no_grad():
        before = a(**batch).logits
        for mm in (m, a):
            for name, p in mm.named_parameters():
                if name.endswith(".proj") and p.dim() == 2:
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
        want, got = m(**batch).logits, a(**batch).logits
    assert (got - before).abs().max() > 1e-3 * before.abs().max()
    assert_close(got, want, 1e-5, f"{family} perturbed")


def test_gradients_match(pair):
    family, model, applied = pair
    batch = inputs()
    grads = []
    for m in (model, applied):
        m.train()  # attention dropout is 0: training mode must not trip the check
        m.zero_grad()
        loss_of(m, batch).backward()
        m.eval()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    want, got = grads
    assert got.keys() == want.keys()
    assert any(n.endswith(".proj") and want[n].abs().max() > 0 for n in want)
    for name in want:
        assert_close(got[name], want[name], 1e-5, f"{family} grad {name}")


def test_generation_matches_with_cache(pair, monkeypatch):
    family, model, applied = pair
    batch = inputs()
    gen = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False)
    want = model.generate(**batch, **gen)
    calls = []
    real = _inkling.band_attention

    def spy(q, k, v, r, weight, **kw):
        calls.append((q.shape[2], k.shape[2], kw["q_offset"], kw["window"]))
        return real(q, k, v, r, weight, **kw)

    monkeypatch.setattr(_inkling, "band_attention", spy)
    got = applied.generate(**batch, **gen)
    assert torch.equal(got, want), f"{family}: {got.tolist()} != {want.tolist()}"
    # decoding steps: one query row after the cache; a sliding layer's cache keeps W - 1 keys
    assert (1, 40 + 15, 40 + 14, None) in calls
    assert (1, 8, 7, 8) in calls


def test_no_dense_bias_is_built(pair, monkeypatch):
    """Training step and generation: neither the model's bias module, nor its dense relative
    distances (Inkling2), nor an N×N mask is built on the relattn path."""
    family, model, applied = pair
    modeling = MODELING[family]

    def forbidden(*args, **kwargs):
        raise AssertionError("a dense bias, distance grid or mask was built on the relattn path")

    monkeypatch.setattr(getattr(modeling, BIAS_CLASS[family]), "forward", forbidden)
    if family != "inkling":
        switch = modeling.get_relative_distance
        assert switch.__wrapped__ is not None
        monkeypatch.setattr(switch, "__wrapped__", forbidden)
    for name in ("eager", "sdpa"):
        monkeypatch.setitem(masking_utils.AttentionMaskInterface._global_mapping, name, forbidden)
    batch = inputs()
    applied.zero_grad()
    loss_of(applied, batch).backward()
    applied.generate(**batch, max_new_tokens=3, do_sample=False)


def test_the_band_is_the_models_parameter():
    """apply() adds no parameter and no state; a training step moves the model's own ``proj``
    and the applied model's logits follow it."""
    model = build("inkling2")
    keys, n_params = list(model.state_dict()), len(list(model.parameters()))
    apply(model)
    assert list(model.state_dict()) == keys and len(list(model.parameters())) == n_params
    batch = inputs()
    proj = model.model.layers[1].self_attn.relative_position_bias.proj
    before = proj.detach().clone()
    with torch.no_grad():
        logits_before = model(**batch).logits
    model.zero_grad()
    loss_of(model, batch).backward()
    assert proj.grad is not None and proj.grad.abs().max() > 0
    torch.optim.SGD([proj], lr=10.0).step()
    assert not torch.equal(proj.detach(), before)
    with torch.no_grad():
        assert not torch.allclose(model(**batch).logits, logits_before)


def test_unapplied_models_keep_the_dense_distances():
    """The distance switch installed by apply() changes nothing for a model not applied."""
    apply(build("inkling2"))
    model = build("inkling2")
    q = torch.zeros(1, 5, 8)
    grid = modeling_inkling2.get_relative_distance(q, None, is_sliding=True)
    assert torch.equal(grid, torch.arange(5)[:, None] - torch.arange(5)[None, :])
    assert not relattn.integrations.transformers.is_applied(model)


# ----------------------------------------------------------------------------- sinks, fused


class _FusedBackend(Backend):
    """A fused-style backend (autograd False) whose backward, like a flash kernel's, recomputes
    the weights from the given log-sum-exp and takes the row term from the given ``out``: the
    contract the sink's backward relies on. Materializing; tests only."""

    name = "test_fused_lse"
    layout = Layout(q="strided", kv="strided")
    token_terms = True
    row_term_from_out = True
    devices = ("cpu",)
    dtypes = (torch.float32, torch.float64)
    top_priority = 0.0

    def priority(self, q, k, problem):
        return None  # never auto

    def unsupported(self, q, k, problem):
        return None

    def forward(self, call):
        with torch.no_grad():
            scores, _, p = scores_and_weights(
                call.q, call.k, call.table, call.slopes, call.problem, call.token
            )
            group = call.q.shape[1] // call.k.shape[1]
            v = call.v.to(p.dtype).repeat_interleave(group, dim=1)
            return (p @ v).to(call.q.dtype), torch.logsumexp(scores, dim=-1)

    def backward(self, call, grad_out, out, lse):
        q, k, v, table, slopes, problem = call[:6]
        scores, mask, _ = scores_and_weights(q, k, table, slopes, problem, call.token)
        p = torch.where(mask, torch.exp(scores - lse[..., None]), 0.0)
        group = q.shape[1] // k.shape[1]
        kk, vv = (t.to(p.dtype).repeat_interleave(group, dim=1) for t in (k, v))
        do = grad_out.to(p.dtype)
        ds = p * (do @ vv.transpose(-1, -2) - (do * out.to(p.dtype)).sum(-1, keepdim=True))
        dq = problem.scale * ds @ kk
        dk = (problem.scale * ds.transpose(-1, -2) @ q.to(p.dtype)).unflatten(1, (-1, group))
        dv = (p.transpose(-1, -2) @ do).unflatten(1, (-1, group))
        rows = torch.arange(q.shape[2])[:, None]
        delta = problem.q_offset + rows - torch.arange(k.shape[2])
        dt = q.dtype
        grads = dq.to(dt), dk.sum(2).to(dt), dv.sum(2).to(dt), None
        return (*grads, *token_gradients(call.token, delta, ds))


def _cpu_token_backends() -> list[str]:
    from relattn.backends import cpu_kernel

    names = ["chunked", "decode"]
    return names + (["cpu_kernel"] if cpu_kernel.available() else [])


@pytest.mark.parametrize("backend", [_FusedBackend.name, *_cpu_token_backends()])
def test_sinks_through_a_fused_backward(monkeypatch, backend):
    """Inkling2's sinks through each fused backend's backward (one whose backward takes lse and
    out as given, as flash kernels do; the CPU kernel, which does too; chunked and decode, which
    recompute their own softmax and row term): logits and every gradient match the eager
    model's."""
    if backend == _FusedBackend.name:
        registry = relattn.backends._REGISTRY
        monkeypatch.setitem(registry, _FusedBackend.name, _FusedBackend())  # removed afterwards
        relattn.backends._CANDIDATES.clear()
    monkeypatch.setattr(_inkling, "BACKEND", backend)
    model = build("inkling2")
    applied = apply(copy.deepcopy(model))
    used = []
    real = _inkling._SinkAttention.apply

    def spy(*args):
        used.append(args[0].backend.name)
        return real(*args)

    monkeypatch.setattr(_inkling._SinkAttention, "apply", spy)
    batch = inputs()
    grads = []
    for m in (model, applied):
        m.zero_grad()
        loss_of(m, batch).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert used and set(used) == {backend}
    want, got = grads
    assert got.keys() == want.keys()
    for name in want:
        assert_close(got[name], want[name], 1e-5, f"fused sink grad {name}")
    assert any("sink_proj" in n and want[n].abs().max() > 0 for n in want)


def test_sliding_masks_are_recognised():
    """The mask hook takes transformers' causal sliding-window mask function for a window of
    the config's size, and refuses another window or a non-causal one."""
    config = build("inkling").config
    mu = masking_utils
    assert _inkling.sliding_mask_ok(mu.sliding_window_causal_mask_function(8), config)
    assert not _inkling.sliding_mask_ok(mu.sliding_window_causal_mask_function(9), config)
    assert not _inkling.sliding_mask_ok(mu.causal_mask_function, config)
    assert not _inkling.sliding_mask_ok(mu.sliding_window_bidirectional_mask_function(8), config)
