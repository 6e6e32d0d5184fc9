"""relattn's forward for each supported transformers attention layer.

Each function replaces the ``forward`` of one attention class (see ``_apply``) and keeps that
class's signature, projections, cache updates and return values; only the score computation
changes: ``relattn.attention`` with the layer's encoding (``self._relattn_pe``) instead of the
N×N bias. Written against transformers 5.24 and 5.25.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ... import attention


def key_padding(mask: Tensor | None, batch: int, nk: int, where: str) -> Tensor | None:
    """The ``(B, Nk)`` bool key padding mask from what transformers' mask utilities handed the
    layer (see ``_apply._relattn_mask``): None, an empty tensor (no padding), or ``(B, Nk)``."""
    if mask is None or mask.numel() == 0:
        return None
    if mask.dim() != 2:
        raise NotImplementedError(
            f"{where}: relattn takes padding as a 2-D (batch, key) attention_mask; got a "
            f"{mask.dim()}-D mask of shape {tuple(mask.shape)} (custom 4-D masks are not "
            "supported on the relattn path)"
        )
    if tuple(mask.shape) != (batch, nk):
        raise ValueError(
            f"{where}: attention_mask must cover every key, shape (batch, keys) = "
            f"({batch}, {nk}); got {tuple(mask.shape)}"
        )
    return mask if mask.dtype == torch.bool else mask != 0


def _past_length(cache, layer_idx: int | None) -> int:
    """Tokens already in ``cache`` for this layer before the update: relattn's ``q_offset``."""
    if cache is None:
        return 0
    return int(cache.get_seq_length(layer_idx))


def check_call(module, output_attentions: bool | None, dropout: float) -> None:
    """Refuse what relattn cannot compute: attention weights, or dropout on them in training."""
    where = type(module).__name__
    if output_attentions:
        raise NotImplementedError(
            f"{where}: output_attentions=True needs the attention weights, which relattn never "
            "materializes; call the model without it, or use a copy without apply() (eager)"
        )
    if module.training and dropout > 0 and not module.__dict__.get("_relattn_ignore_dropout"):
        raise NotImplementedError(
            f"{where}: attention-probability dropout p={dropout} is active in training mode, and "
            "relattn has no dropout on the attention weights; set that dropout to 0 in the "
            "model's config, or pass ignore_attention_dropout=True to apply() to train without it"
        )


def _merge(out: Tensor) -> Tensor:
    """``(B, H, N, D)`` -> ``(B, N, H·D)``."""
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d)


# ----------------------------------------------------------------------------- T5 family


def _t5_states(self, hidden_states, key_value_states, cache, kwargs):
    """T5's projections and cache handling (self- and cross-attention), as transformers does.

    Returns ``(q, k, v, past)``, heads first, ``past`` the self-attention cache length."""
    from transformers.cache_utils import EncoderDecoderCache

    b, n = hidden_states.shape[:2]
    d = self.key_value_proj_dim
    q = self.q(hidden_states).view(b, n, -1, d).transpose(1, 2)
    is_cross = key_value_states is not None
    is_updated = False
    current_cache = cache
    if isinstance(cache, EncoderDecoderCache):
        is_updated = cache.is_updated.get(self.layer_idx)
        current_cache = cache.cross_attention_cache if is_cross else cache.self_attention_cache
    past = 0 if is_cross else _past_length(current_cache, self.layer_idx)
    if is_cross and cache is not None and is_updated:
        k = current_cache.layers[self.layer_idx].keys
        v = current_cache.layers[self.layer_idx].values
    else:
        states = key_value_states if is_cross else hidden_states
        k = self.k(states).view(b, states.shape[1], -1, d).transpose(1, 2)
        v = self.v(states).view(b, states.shape[1], -1, d).transpose(1, 2)
        if cache is not None:
            k, v = current_cache.update(k, v, self.layer_idx, kwargs=kwargs)
            if is_cross and isinstance(cache, EncoderDecoderCache):
                cache.is_updated[self.layer_idx] = True
    return q, k, v, past


def _t5_attend(self, q, k, v, mask, past, is_cross):
    where = type(self).__name__
    kpm = key_padding(mask, q.shape[0], k.shape[2], where)
    if is_cross:  # no position term across the two sequences
        out = attention(q, k, v, None, causal=False, scale=self.scaling, key_padding_mask=kpm)
    else:
        out = attention(
            q, k, v, self._relattn_pe,
            causal=self.is_causal, scale=self.scaling, q_offset=past, key_padding_mask=kpm,
        )  # fmt: skip
    return self.o(_merge(out))


def t5_forward(
    self, hidden_states, mask=None, key_value_states=None, position_bias=None, cache=None, **kwargs
):
    """T5 / mT5 attention: returns ``(output, None, None)``; the stack passes the None along as
    ``position_bias``, so no layer ever builds one (every self-attention layer reads the table
    of the stack's layer 0 through ``_relattn_pe``)."""
    check_call(self, kwargs.get("output_attentions"), self.dropout)
    is_cross = key_value_states is not None
    q, k, v, past = _t5_states(self, hidden_states, key_value_states, cache, kwargs)
    return _t5_attend(self, q, k, v, mask, past, is_cross), None, None


def umt5_forward(
    self, hidden_states, encoder_hidden_states=None, cache=None, attention_mask=None, **kwargs
):
    """UMT5 attention (a bias per layer): returns ``(output, None)``."""
    check_call(self, kwargs.get("output_attentions"), self.dropout)
    is_cross = encoder_hidden_states is not None
    q, k, v, past = _t5_states(self, hidden_states, encoder_hidden_states, cache, kwargs)
    return _t5_attend(self, q, k, v, attention_mask, past, is_cross), None


# ----------------------------------------------------------------------------- ALiBi family


def _alibi_attend(self, q, k, v, attention_mask, past, scale):
    kpm = key_padding(attention_mask, q.shape[0], k.shape[2], type(self).__name__)
    pe = self._relattn_pe
    return attention(q, k, v, pe, causal=True, scale=scale, q_offset=past, key_padding_mask=kpm)


def bloom_forward(
    self,
    hidden_states,
    residual,
    alibi,
    attention_mask,
    layer_past=None,
    use_cache=False,
    output_attentions=False,
    **kwargs,
):
    """BLOOM attention: the fused qkv is laid out ``(H, 3, D)`` per token (BLOOM's
    ``_reshape``); scores ``q·k/√D + ALiBi``. Returns ``(output, None)``."""
    check_call(self, output_attentions, self.attention_dropout.p)
    q, k, v = self._reshape(self.query_key_value(hidden_states))
    past = _past_length(layer_past, self.layer_idx)
    if layer_past is not None:
        k, v = layer_past.update(k, v, self.layer_idx)
    context = _merge(_alibi_attend(self, q, k, v, attention_mask, past, self.inv_norm_factor))
    if self.pretraining_tp > 1 and self.slow_but_exact:
        # BLOOM's tensor-parallel emulation: the output projection summed slice by slice.
        width = self.hidden_size / self.pretraining_tp
        out = torch.zeros_like(context)
        for i in range(self.pretraining_tp):
            cols = slice(int(i * width), int((i + 1) * width))
            out = out + F.linear(context[:, :, cols], self.dense.weight[:, cols])
    else:
        out = self.dense(context)
    out = residual + F.dropout(out, p=self.hidden_dropout, training=self.training)
    return out, None


def mpt_forward(self, hidden_states, position_bias=None, cache=None, attention_mask=None, **kwargs):
    """MPT attention: scores ``softmax_scale·q·k + ALiBi``. Returns ``(output, None)``."""
    check_call(self, kwargs.get("output_attentions"), self.attn_dropout_p)
    b, n = hidden_states.shape[:2]
    qkv = self.Wqkv(hidden_states)
    if self.clip_qkv:
        qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
    q, k, v = (
        t.reshape(b, n, self.n_heads, self.head_dim).transpose(1, 2) for t in qkv.chunk(3, 2)
    )
    past = _past_length(cache, self.layer_idx)
    if cache is not None:
        k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
    out = _alibi_attend(self, q, k, v, attention_mask, past, self.softmax_scale)
    return self.out_proj(_merge(out)), None


def falcon_forward(
    self,
    hidden_states,
    attention_mask,
    position_ids=None,
    layer_past=None,
    use_cache=False,
    output_attentions=False,
    position_embeddings=None,
    **kwargs,
):
    """Falcon attention with ALiBi: scores ``(q·k + ALiBi)/√D``, i.e. relattn's
    ``scale = 1/√D`` with slopes divided by √D. Returns ``(output, None)``.

    The fused projection is split as the checkpoint lays it out (the same in every
    transformers version): per kv head its G queries, its key and its value
    (``new_decoder_architecture``); the queries then one key and one value (``multi_query``);
    else query, key and value interleaved per head. Keys and values keep their own heads
    (GQA), never repeated."""
    check_call(self, output_attentions, _dropout_p(self.attention_dropout))
    b, n = hidden_states.shape[:2]
    d, hq, hkv = self.head_dim, self.num_heads, self.num_kv_heads
    fused = self.query_key_value(hidden_states)
    if self.new_decoder_architecture:
        grouped = fused.view(b, n, hkv, hq // hkv + 2, d)
        q, k, v = grouped[:, :, :, :-2].flatten(2, 3), grouped[:, :, :, -2], grouped[:, :, :, -1]
    elif self.multi_query:
        q, k, v = fused.view(b, n, hq + 2, d).split([hq, 1, 1], dim=2)
    else:
        q, k, v = fused.view(b, n, hq, 3, d).unbind(3)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    past = _past_length(layer_past, self.layer_idx)
    if layer_past is not None:
        k, v = layer_past.update(k, v, self.layer_idx)
    out = _alibi_attend(self, q, k, v, attention_mask, past, self.inv_norm_factor)
    return self.dense(_merge(out)), None


def _dropout_p(dropout) -> float:
    """An attention dropout given as a module (transformers 5.24) or a probability (5.25)."""
    return float(dropout.p if isinstance(dropout, torch.nn.Dropout) else dropout)
