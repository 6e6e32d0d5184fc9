"""The position encodings of transformers' models as relattn tables.

T5's bias is read from the model's own ``relative_attention_bias`` weight (never copied); the
ALiBi families get their slopes computed the way each model computes them.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import Tensor, nn

from ...pe import PositionEncoding, T5Bias
from ...pe.base import offsets

__all__ = [
    "SharedT5Bias",
    "SlopesALiBi",
    "bloom_alibi_slopes",
    "falcon_alibi_slopes",
    "mpt_alibi_slopes",
]


class SharedT5Bias(T5Bias):
    """T5's bucketed bias whose weight *is* a transformers attention module's
    ``relative_attention_bias.weight`` (shape ``(num_buckets, H)``), read transposed on every
    call: gradients land on the model's weight and checkpoints save it as usual.

    The module it reads from is held without being registered as a submodule, so the model's
    ``state_dict`` and parameter list do not change.

    Args:
        attention: a T5-family attention module with ``relative_attention_bias`` (an
            ``nn.Embedding(num_buckets, H)``) and ``relative_attention_max_distance``.
        bidirectional: buckets for keys after the query (T5 encoders) or not (decoders).
    """

    _source: nn.Module  # set with object.__setattr__: not a registered submodule

    def __init__(self, attention: nn.Module, bidirectional: bool) -> None:
        nn.Module.__init__(self)  # T5Bias.__init__ would create a weight of its own
        embedding = getattr(attention, "relative_attention_bias", None)
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(
                "attention must have a relative_attention_bias nn.Embedding (a T5 attention "
                f"layer with has_relative_attention_bias=True); got {type(attention).__name__}"
            )
        num_buckets, num_heads = embedding.weight.shape
        self.num_heads = num_heads
        self.num_buckets = num_buckets
        # a plain int attribute of T5 attention layers (the stubs say Tensor | Module)
        self.max_distance = int(cast(int, attention.relative_attention_max_distance))
        self.bidirectional = bool(bidirectional)
        object.__setattr__(self, "_source", attention)

    @property
    def weight(self) -> Tensor:
        """The model's weight viewed as ``(H, num_buckets)`` (no copy)."""
        embedding = self._source.relative_attention_bias
        assert isinstance(embedding, nn.Embedding)  # checked in __init__
        return embedding.weight.t()

    @weight.setter
    def weight(self, value: Tensor) -> None:
        raise AttributeError(
            "SharedT5Bias.weight is the model's relative_attention_bias weight; set that instead"
        )


class SlopesALiBi(PositionEncoding):
    """``PE(i, j) = -m_h · |i - j|`` with given per-head slopes (fixed, float32).

    Stand-in for ``relattn.pe.ALiBi(num_heads, slopes=...)``. The slopes are not a registered
    buffer, so ``model.to(torch.bfloat16)`` cannot round them; each table is built on the device
    of ``device_of``'s first parameter (the attention layer the encoding serves), or on the
    slopes' device when ``device_of`` is None.

    Args:
        slopes: ``(H,)`` slopes ``m_h``.
        device_of: a module whose parameters' device the tables follow.
    """

    # set through __dict__ / object.__setattr__: neither a buffer nor a submodule
    _slopes: Tensor
    _device_of: nn.Module | None

    def __init__(self, slopes: Tensor, device_of: nn.Module | None = None) -> None:
        super().__init__()
        if not isinstance(slopes, Tensor) or slopes.dim() != 1 or slopes.numel() < 1:
            raise ValueError(f"slopes must be a 1-D tensor of length H >= 1; got {slopes!r}")
        self.num_heads = slopes.numel()
        self.__dict__["_slopes"] = slopes.detach().to(torch.float32).clone()
        object.__setattr__(self, "_device_of", device_of)

    @property
    def slopes(self) -> Tensor:
        """The per-head slopes ``m_h``, shape ``(H,)``, float32."""
        return self._slopes

    def table(self, lo: int, hi: int) -> Tensor:
        device = self._slopes.device
        if self._device_of is not None:
            device = next(self._device_of.parameters()).device
        m = self._slopes.to(device)
        return -m[:, None] * offsets(lo, hi, device=device).abs().to(torch.float32)[None, :]

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}"


def bloom_alibi_slopes(num_heads: int) -> Tensor:
    """BLOOM's slopes (the ALiBi paper's), computed in float32 as BLOOM does: powers of
    ``2^(-8/c)`` for the largest power of two ``c <= H``, then every other power of
    ``2^(-4/c)`` for the remaining heads.

    Returns:
        ``(H,)`` float32.
    """
    closest = 2 ** math.floor(math.log2(num_heads))
    start = torch.tensor(2.0 ** (-8.0 / closest), dtype=torch.float32)
    slopes = torch.pow(start, torch.arange(1, closest + 1, dtype=torch.int32))
    if closest != num_heads:
        extra = torch.tensor(2.0 ** (-4.0 / closest), dtype=torch.float32)
        rest = min(closest, num_heads - closest)
        powers = torch.arange(1, 2 * rest, 2, dtype=torch.int32)
        slopes = torch.cat([slopes, torch.pow(extra, powers)])
    return slopes


def mpt_alibi_slopes(num_heads: int, alibi_bias_max: float = 8.0) -> Tensor:
    """MPT's slopes: ``2^(-alibi_bias_max·i/P)`` for ``i = 1..P`` with ``P`` the power of two
    at or above H; for other head counts the odd-indexed slopes come first, then the even ones,
    cut to H.

    Returns:
        ``(H,)`` float32.
    """
    p = 2 ** math.ceil(math.log2(num_heads))
    exponents = torch.arange(1, p + 1, dtype=torch.int64).float() * (alibi_bias_max / p)
    slopes = 1.0 / torch.pow(2, exponents)
    if p != num_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:num_heads]
    return slopes


def falcon_alibi_slopes(num_heads: int, head_dim: int) -> Tensor:
    """Falcon's effective slopes: BLOOM's, rounded to bfloat16 (as Falcon builds its ALiBi
    tensor), divided by ``√head_dim`` (Falcon adds ALiBi before scaling the scores, relattn
    after).

    Returns:
        ``(H,)`` float32.
    """
    return bloom_alibi_slopes(num_heads).bfloat16().float() / math.sqrt(head_dim)
