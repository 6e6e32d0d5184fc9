"""The Inkling families (``inkling``, ``inkling2``, ``inkling2_loop``) through relattn.

Each Inkling attention layer adds a query-conditioned banded bias to its scores: per query row
i and head h a latent ``r[b, h, i, :]`` of ``d_rel`` numbers (a projection of the layer input)
mixes the rows of a bank ``P = proj`` of shape ``(d_rel, extent)``, shared by the heads::

    PE(b, h, i, j) = Σ_c r[b, h, i, c] · P[c, Δ]   for 0 ≤ Δ = pos_i − pos_j < extent, else 0

transformers materializes it as a dense ``(B, H, Nq, Nk)`` ``position_bias`` and adds it in
eager attention. Here it is relattn's :class:`relattn.pe.QueryConditionedBias` term, whose
weight is the layer's own ``proj`` parameter (read in place, so gradients land on it).

What differs between the three families (transformers 5.25):

* ``inkling``: q and k RMS-normalized per head (weighted), ``scale = 1/D``; k and v pass a
  short causal convolution whose state lives in the cache; ``r = r_proj(x)``. Global layers
  with ``log_scaling_n_floor`` multiply q and the bias of row i by
  ``tau_i = 1 + alpha·log(max((pos_i + 1)/n_floor, 1))`` (pos_i the cache position): folded
  here into q and r (``(tau·r)·P = tau·(r·P)``).
* ``inkling2`` and ``inkling2_loop``: ``scale = 1/√D``; q, k and r pass a learned per-head
  scale and an L2 clip (the model's own modules, called as they are), and the global layers'
  log-scaling (by ``position_ids``) is already applied there to q and r; keys and values of
  global layers are projected from their own inputs with a token-dependent convolution; every
  layer has a per-query, per-head **attention sink** ``s = sink_proj(x)``: one extra logit with
  a zero value in the softmax, i.e. ``out = out_keys · σ(lse − s)``; the output projection is
  gated by the layer input. ``inkling2_loop`` runs a span of layers several times, each pass
  with its own cache layers (``cache_offset``).

In all three, sliding layers (``layer_types[i] == "hybrid_sliding"``) see keys with
``Δ < sliding_window_size`` and their band's extent is ``sliding_window_size``; global layers
see every earlier key and their extent is ``rel_extent``. GQA: keys and values have their own
head count, never repeated here.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ... import attention
from ...pe.token import BandTerm
from ._forwards import check_call, key_padding

__all__ = [
    "band_attention",
    "inkling2_forward",
    "inkling_forward",
]


# ----------------------------------------------------------------------------- the band term

#: The relattn backend the Inkling layers ask for (``"auto"``; tests name others).
BACKEND = "auto"


def band_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    r: Tensor,
    weight: Tensor,
    *,
    scale: float,
    q_offset: int,
    window: int | None,
    key_padding_mask: Tensor | None,
    sinks: Tensor | None = None,
) -> Tensor:
    """Causal attention with the banded bias ``Σ_c r[b,h,i,c]·weight[c, Δ]`` (0 ≤ Δ < extent)
    and, when ``sinks`` ``(B, Hq, Nq)`` is given, one extra logit per row with a zero value.

    Shapes: q ``(B, Hq, Nq, D)``, k and v ``(B, Hkv, Nk, D)``, r ``(B, Hq, Nq, rank)``,
    ``weight`` ``(rank, extent)``: the model's parameter itself, read in place (the term holds
    it; gradients land on it). Returns ``(B, Hq, Nq, D)`` in q's dtype."""
    term = BandTerm(r, weight)
    if sinks is None:
        return attention(
            q, k, v, term,
            causal=True, scale=scale, q_offset=q_offset, window=window,
            key_padding_mask=key_padding_mask, backend=BACKEND,
        )  # fmt: skip
    return _sink_attention(q, k, v, term, r, weight, sinks, scale, q_offset, window,
                           key_padding_mask)  # fmt: skip


def _sink_attention(q, k, v, term, r, weight, sinks, scale, q_offset, window, kpm) -> Tensor:
    """Attention whose softmax has one more logit per row, ``sinks[b, h, i]``, with value 0.

    With ``lse`` the rows' log-sum-exp over the keys, the sink keeps ``1 − w`` of the weight,
    ``w = exp(lse − logaddexp(lse, s)) = σ(lse − s)``: ``out = out_keys · w``. Its backward is
    the usual softmax backward run with the full log-sum-exp ``logaddexp(lse, s)`` and the
    output ``out`` (``dS = P'∘(dP − rowsum(dO∘out))`` with ``P' = exp(S − lse_full)``: exactly
    the sink softmax's), and ``∂L/∂s = −(1 − w)·rowsum(dO∘out)``."""
    from ...call import prepare, run

    call = prepare(q, k, v, term, True, scale, q_offset, window, None, kpm, BACKEND, True)
    tensors = (q, k, v, r, weight, sinks)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if not grad or call.backend.autograd:
        out, lse = run(call)
        assert lse is not None  # prepare(..., lse=True)
        return _with_sink(out, lse, sinks)
    return _SinkAttention.apply(call, *tensors)


def _with_sink(out: Tensor, lse: Tensor, sinks: Tensor) -> Tensor:
    lse = lse.to(torch.float32 if out.dtype != torch.float64 else out.dtype)
    w = torch.exp(lse - torch.logaddexp(lse, sinks.to(lse.dtype)))  # 0 for a row with no key
    return (out * w[..., None]).to(out.dtype)


class _SinkAttention(torch.autograd.Function):
    """``out · σ(lse − s)`` through a fused backend's forward and backward (see
    :func:`_sink_attention`); the band's gradients come back from the backend as ``dr`` and
    ``dweight``."""

    @staticmethod
    def forward(ctx, call, q, k, v, r, weight, sinks):
        impl = call.backend
        out, lse = impl.forward(call)
        stat = lse.dtype
        full = torch.logaddexp(lse, sinks.to(stat))
        out = (out * torch.exp(lse - full)[..., None]).to(out.dtype).contiguous()
        ctx.call = call
        ctx.shapes = (weight.shape,)
        ctx.dtypes = (r.dtype, weight.dtype, sinks.dtype)
        ctx.save_for_backward(out, lse, full)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        out, lse, full = ctx.saved_tensors
        call = ctx.call
        grad_out = grad_out.contiguous()
        # The sink softmax's backward is the keys' softmax backward with P' = w·P (w = σ(lse -
        # s), P the keys' own softmax) and the row term rowsum(dO ∘ out): context
        # parallelism's contract for a block (grad_out = w·dO, out = the whole output, lse the
        # block's own), which every backend meets there (the CPU kernel itself; chunked and
        # triton, which recompute their own row term, through the blockwise stand-in).
        from ...distributed._block import _block_backward

        w = torch.exp(lse - full)[..., None]
        scaled = (grad_out.to(w.dtype) * w).to(grad_out.dtype)
        grads = _block_backward(call, scaled, out, lse.contiguous(), partial=True)
        dq, dk, dv, _dtable, dr, dweight = grads[:6]
        row = (grad_out.to(full.dtype) * out.to(full.dtype)).sum(-1)
        dsinks = -(1.0 - torch.exp(lse - full)) * row
        r_dtype, weight_dtype, sinks_dtype = ctx.dtypes
        dweight = dweight.reshape(ctx.shapes[0]).to(weight_dtype)
        return None, dq, dk, dv, dr.to(r_dtype), dweight, dsinks.to(sinks_dtype)


# ----------------------------------------------------------------------------- caches


def _offsets(cache, layer_idx: int, nq: int) -> int:
    """The cache position of this call's first query (0 without a cache), read before the
    cache is updated; refuses caches whose keys are not the contiguous run ending at the
    newest token (static caches keep a buffer of their maximum length or a rolling one)."""
    if cache is None:
        return 0
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if layers is not None and layer_idx < len(layers):
        layer = layers[layer_idx]
        if not isinstance(layer, DynamicLayer):
            raise NotImplementedError(
                f"relattn's Inkling integration runs with a dynamic cache (the default of "
                f"generate); got a {type(layer).__name__} at layer {layer_idx}"
            )
    return int(cache.get_query_offset(layer_idx))


def _merge(out: Tensor) -> Tensor:
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d)


# ----------------------------------------------------------------------------- inkling


def inkling_forward(self, hidden_states, attention_mask, conv_mask=None, cache=None, **kwargs):
    """InklingAttention through relattn: returns ``(output, None)``.

    q, k per-head RMS norm, ``scale = 1/D``, the band of ``rel_logits_proj.proj``, sliding
    layers windowed; the global layers' log-scaling folded into q and r in float32 (as the
    model does it to q and the bias)."""
    check_call(self, kwargs.get("output_attentions"), self.attention_dropout)
    input_shape = hidden_states.shape[:-1]
    b, nq = input_shape
    hidden_shape = (*input_shape, -1, self.head_dim)
    q = self.q_proj(hidden_states)
    k = self.k_sconv(self.k_proj(hidden_states), cache=cache, conv_mask=conv_mask)
    v = self.v_sconv(self.v_proj(hidden_states), cache=cache, conv_mask=conv_mask)
    r = self.r_proj(hidden_states)
    q = self.q_norm(q.view(hidden_shape)).transpose(1, 2)
    k = self.k_norm(k.view(hidden_shape)).transpose(1, 2)
    v = v.view(hidden_shape).transpose(1, 2)
    r = r.view(*input_shape, self.num_heads, -1).transpose(1, 2)
    start = _offsets(cache, self.layer_idx, nq)
    if cache is not None:
        k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
    config = self.config
    if not self.is_sliding and config.log_scaling_n_floor is not None:
        positions = torch.arange(start, start + nq, device=q.device)
        tau = 1.0 + config.log_scaling_alpha * torch.log(
            ((positions + 1).float() / config.log_scaling_n_floor).clamp(min=1.0)
        )
        tau = tau.view(1, 1, -1, 1)
        q = (q.float() * tau).to(q.dtype)
        r = (r.float() * tau).to(r.dtype)
    kpm = key_padding(attention_mask, b, k.shape[2], type(self).__name__)
    out = band_attention(
        q, k, v, r, self.rel_logits_proj.proj,
        scale=self.scaling, q_offset=k.shape[2] - nq, window=self.sliding_window,
        key_padding_mask=kpm,
    )  # fmt: skip
    return self.o_proj(_merge(out)), None


# ----------------------------------------------------------------------------- inkling2


def inkling2_forward(
    self,
    hidden_states,
    attention_mask=None,
    relative_distance=None,
    conv_mask=None,
    cache=None,
    key_hidden_states=None,
    value_hidden_states=None,
    cache_offset=0,
    **kwargs,
):
    """Inkling2 (and Inkling2-Loop) sliding and full attention through relattn: returns
    ``(output, None)``.

    The model's own q, k, v projections (scale, L2 clip, convolutions, log-scaling), the band
    ``relative_position_bias`` (its linear, its norm, its ``proj``), the sink logits
    ``sink_proj(x)``, ``scale = 1/√D``, and the gated output projection. ``relative_distance``
    (the model's dense ``(Nq, Nk)`` offsets) is not read: relattn counts offsets itself."""
    check_call(self, kwargs.get("output_attentions"), self.attention_dropout)
    layer = self.layer_idx + cache_offset
    key_hidden_states = hidden_states if key_hidden_states is None else key_hidden_states
    value_hidden_states = hidden_states if value_hidden_states is None else value_hidden_states
    b, nq = hidden_states.shape[:2]
    position_ids = kwargs["position_ids"]
    q = self.q_proj(hidden_states, position_ids)
    k = self.k_proj(
        key_hidden_states, cache=cache, conv_mask=conv_mask, cache_offset=cache_offset, **kwargs
    )
    v = self.v_proj(
        value_hidden_states, cache=cache, conv_mask=conv_mask, cache_offset=cache_offset, **kwargs
    )
    _offsets(cache, layer, nq)
    if cache is not None:
        k, v = cache.update(k, v, layer, kwargs=kwargs)
    bias = self.relative_position_bias
    r = bias.linear(hidden_states).view(b, nq, bias.num_heads, -1)
    r = bias.norm(r, position_ids).transpose(1, 2)
    sinks = self.sink_proj(hidden_states).transpose(1, 2)
    kpm = key_padding(attention_mask, b, k.shape[2], type(self).__name__)
    out = band_attention(
        q, k, v, r, bias.proj,
        scale=self.scaling, q_offset=k.shape[2] - nq, window=self.sliding_window,
        key_padding_mask=kpm, sinks=sinks,
    )  # fmt: skip
    return self.o_proj(_merge(out), hidden_states), None


# ----------------------------------------------------------------------------- model-level


class _EagerConfig:
    """A config seen through ``_attn_implementation = "eager"`` (everything else delegated)."""

    __slots__ = ("_config",)
    _attn_implementation = "eager"

    def __init__(self, config) -> None:
        object.__setattr__(self, "_config", config)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._config, name)


def _eager_config(self):
    return _EagerConfig(self.__dict__["config"])


#: Inkling2's block and message attention residuals attend over the depth of the network (a few
#: block states per token, no positions) through transformers' attention interface, which has
#: no "relattn": they keep their eager path.
EAGER_CONFIG = property(_eager_config)

# Set while an applied Inkling2 text model runs: the model's dense relative distances are
# not built (nothing reads them on the relattn path).
_SKIP_DISTANCE: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "relattn_skip_distance", default=False
)


def without_distance(self, *args, **kwargs):
    """An applied Inkling2 text model's forward: the original, with the module function that
    builds the dense ``(Nq, Nk)`` relative distances returning None."""
    token = _SKIP_DISTANCE.set(True)
    try:
        return self._relattn_original.forward(self, *args, **kwargs)
    finally:
        _SKIP_DISTANCE.reset(token)


def install_distance_switch(modeling) -> None:
    """Wrap ``modeling.get_relative_distance`` (once) so that it builds nothing while an
    applied model runs (:func:`without_distance`); unchanged for every other model."""
    original = getattr(modeling, "get_relative_distance", None)
    if original is None:
        raise NotImplementedError(
            f"{modeling.__name__} has no get_relative_distance, which relattn's integration "
            "replaces"
        )
    if getattr(original, "_relattn_switch", False):
        return

    def get_relative_distance(*args, **kwargs):
        if _SKIP_DISTANCE.get():
            return None
        return original(*args, **kwargs)

    get_relative_distance._relattn_switch = True  # type: ignore[attr-defined]
    get_relative_distance.__wrapped__ = original  # type: ignore[attr-defined]
    get_relative_distance.__doc__ = original.__doc__
    modeling.get_relative_distance = get_relative_distance


def check_inkling_config(config) -> None:
    """Refuse configurations this bridge does not handle."""
    extent = config.rel_extent
    window = config.sliding_window_size
    for name, value in (("rel_extent", extent), ("sliding_window_size", window)):
        if not (isinstance(value, int) and value >= 1):
            raise NotImplementedError(f"Inkling with {name}={value!r}: expected an int >= 1")
    if getattr(config, "log_scaling_n_floor", None) is not None and not math.isfinite(
        float(config.log_scaling_alpha)
    ):
        raise NotImplementedError(
            f"Inkling with log_scaling_alpha={config.log_scaling_alpha!r}: expected a finite number"
        )


def sliding_mask_ok(mask_function: Callable, config) -> bool:
    """Whether ``mask_function`` is causal with the config's sliding window (``Δ < W``), probed
    on positions 0 … 2W+1 (a packed-sequence remap or a custom mask differs there)."""
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or window < 1:
        return False
    n = 2 * window + 2
    q_idx = torch.arange(n).view(n, 1)
    kv_idx = torch.arange(n).view(1, n)
    zero = torch.zeros((), dtype=torch.long)
    try:
        got = mask_function(zero, zero, q_idx, kv_idx)
    except Exception:  # a mask function that needs other arguments: not the plain one
        return False
    want = (kv_idx <= q_idx) & (kv_idx > q_idx - window)
    return isinstance(got, Tensor) and bool(torch.equal(got.expand(n, n).to(torch.bool), want))
