"""Hugging Face transformers models with their attention computed by :func:`relattn.attention`.

    from relattn.integrations.transformers import apply
    model = apply(T5ForConditionalGeneration.from_pretrained(path))

:func:`apply` keeps the model's own parameters and checkpoints and never builds the N×N
position bias; see ``docs/huggingface.md`` for the families, what maps to what, and the
porting traps. transformers is imported only when a function here is called.

For users porting a model to relattn's own layers by hand, :func:`t5_bias_from_transformers`
and :func:`alibi_from_transformers` give the equivalent relattn encodings.
"""

from __future__ import annotations

import torch
from torch import nn

from ...pe import PositionEncoding, T5Bias
from ._apply import SUPPORTED_MODEL_TYPES, TESTED_RANGE, apply, is_applied
from ._encodings import (
    SharedT5Bias,
    SlopesALiBi,
    bloom_alibi_slopes,
    falcon_alibi_slopes,
    mpt_alibi_slopes,
)

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "TESTED_RANGE",
    "SharedT5Bias",
    "SlopesALiBi",
    "alibi_from_transformers",
    "apply",
    "bloom_alibi_slopes",
    "falcon_alibi_slopes",
    "is_applied",
    "mpt_alibi_slopes",
    "t5_bias_from_transformers",
]


def t5_bias_from_transformers(
    attention: nn.Module, *, bidirectional: bool | None = None, share: bool = False
) -> T5Bias:
    """The relattn encoding of a T5-family attention layer's ``relative_attention_bias``.

    Args:
        attention: a T5 / mT5 / UMT5 attention layer that owns ``relative_attention_bias``
            (in T5 and mT5: layer 0 of a stack, ``stack.block[0].layer[0].SelfAttention``).
        bidirectional: default ``not attention.is_decoder`` (encoders see keys after the query).
        share: True reads the layer's weight itself (:class:`SharedT5Bias`); False (default)
            returns a standalone :class:`relattn.pe.T5Bias` with a copy, transposed to its
            ``(H, num_buckets)`` layout.

    Returns:
        A :class:`relattn.pe.T5Bias` with ``num_heads = H``. Use it with ``scale=1.0`` (T5 does
        not scale q·k) and, for an encoder, ``causal=False``.
    """
    if not isinstance(share, bool):
        raise TypeError(f"share must be a bool; got {type(share).__name__}")
    if bidirectional is None:
        bidirectional = not bool(getattr(attention, "is_decoder", False))
    shared = SharedT5Bias(attention, bidirectional)
    if share:
        return shared
    bias = T5Bias(shared.num_heads, shared.num_buckets, shared.max_distance, bidirectional)
    with torch.no_grad():
        bias.weight.copy_(shared.weight)
    return bias


def alibi_from_transformers(config) -> PositionEncoding:
    """The ALiBi encoding a BLOOM, MPT or Falcon (``alibi=True``) model computes, as relattn
    adds it: after the ``scale·q·k`` product.

    Args:
        config: the model's transformers config.

    Returns:
        A :class:`SlopesALiBi` with the family's slopes: BLOOM's (the paper's), MPT's (from
        ``alibi_bias_max = 8``, which transformers' MPT uses), Falcon's (rounded to bfloat16,
        divided by √head_dim). Use it with ``scale = 1/√head_dim`` (MPT: its
        ``attn_config.softmax_scale`` when set) and ``causal=True``.
    """
    model_type = getattr(config, "model_type", None)
    if model_type == "bloom":
        return SlopesALiBi(bloom_alibi_slopes(config.n_head))
    if model_type == "mpt":
        return SlopesALiBi(mpt_alibi_slopes(config.n_heads))
    if model_type == "falcon" and getattr(config, "alibi", False):
        h = config.num_attention_heads
        return SlopesALiBi(falcon_alibi_slopes(h, config.hidden_size // h))
    raise ValueError(
        "config must be a BLOOM, MPT or Falcon (alibi=True) transformers config; got "
        f"model_type={model_type!r}"
    )
