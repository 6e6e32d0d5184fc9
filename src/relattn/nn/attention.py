"""Causal self-attention with a relative position encoding, as a layer.

q, k, v = x·W_qkv           (one fused projection; GQA: Hkv key/value heads)
q, k    = RoPE(q), RoPE(k)   (optional)
y       = attention(q, k, v, PE)  — see relattn.attention
out     = Dropout(y·W_out)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .. import backends
from .. import pe as encodings
from .._validate import check_bool, check_float, check_int, check_optional_int
from ..cache import KVCache, LayerCache
from ..functional import attention
from ..masks import within_doc_positions
from ..pe import PositionEncoding, RoPE

if TYPE_CHECKING:
    from ..distributed import ContextParallel

__all__ = ["RelativeSelfAttention"]


class RelativeSelfAttention(nn.Module):
    """Multi-head self-attention whose only position signal is a relative encoding.

    Args:
        d_model: model width; a multiple of ``num_heads``.
        num_heads: query heads H (head dim ``D = d_model / H``).
        num_kv_heads: key/value heads Hkv (GQA); must divide H. Default H.
        pe: ``"none"``, a name from :func:`relattn.pe.names` (built with its defaults; the
            name ``"rope"`` means ``pe="none", rope=True``), or a
            :class:`relattn.pe.PositionEncoding` instance with ``num_heads == H``.
        rope: also rotate q and k by RoPE (True, or a :class:`relattn.pe.RoPE` of head dim D).
        scale: multiplies ``q·k``; default ``1/√D`` (T5 uses 1.0).
        causal: mask keys after the query; False for an encoder layer.
        dropout: applied to the output projection. Dropout on the attention weights would need
            the weights materialized, which the fused kernels never do, so it is not offered.
        bias: biases in the qkv and output projections.
        backend: passed to :func:`relattn.attention`.

    Attributes:
        pe: the additive encoding module, or None. rope: the RoPE module, or None.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        pe: str | PositionEncoding | None = "t5",
        rope: bool | RoPE = False,
        dropout: float = 0.0,
        bias: bool = False,
        backend: str = "auto",
        scale: float | None = None,
        causal: bool = True,
    ) -> None:
        super().__init__()
        check_int("d_model", d_model, min=1)
        check_int("num_heads", num_heads, min=1)
        if d_model % num_heads:
            raise ValueError(
                f"d_model must be a multiple of num_heads; got d_model={d_model}, "
                f"num_heads={num_heads}"
            )
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        check_int("num_kv_heads", num_kv_heads, min=1)
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_kv_heads must divide num_heads; got num_kv_heads={num_kv_heads}, "
                f"num_heads={num_heads}"
            )
        check_float("dropout", dropout, min=0.0, max=1.0, max_open=True)
        check_bool("bias", bias)
        if not isinstance(backend, str) or backend not in backends.names():
            raise ValueError(f"backend must be one of {backends.names()}; got {backend!r}")
        self.d_model = d_model
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = d_model // num_heads
        self.backend = backend
        self.scale = None if scale is None else check_float("scale", scale)
        self.causal = check_bool("causal", causal)

        self.pe: PositionEncoding | None
        self.rope: RoPE | None
        if pe is None or isinstance(pe, str):
            built = encodings.create(pe or "none", num_heads, self.head_dim)
            if isinstance(built, RoPE):
                built, rope = None, rope if isinstance(rope, RoPE) else True
            if built is not None and not isinstance(built, PositionEncoding):
                raise TypeError(
                    f"pe={pe!r} built a {type(built).__name__}, not a PositionEncoding or RoPE"
                )
            self.pe = built
        elif isinstance(pe, PositionEncoding):
            if pe.num_heads != num_heads:
                raise ValueError(
                    f"pe {type(pe).__name__} has num_heads={pe.num_heads}; the layer has "
                    f"num_heads={num_heads}"
                )
            self.pe = pe
        elif isinstance(pe, RoPE):
            raise TypeError(
                "pe must be an additive encoding; pass RoPE as rope=True (or rope=RoPE)"
            )
        else:
            raise TypeError(
                f"pe must be 'none', one of {encodings.names()} or a relattn.pe encoding; "
                f"got {type(pe).__name__}"
            )
        if isinstance(rope, RoPE):
            if rope.head_dim != self.head_dim:
                raise ValueError(
                    f"rope has head_dim={rope.head_dim}; the layer's head dim is {self.head_dim}"
                )
            self.rope = rope
        elif isinstance(rope, bool):
            self.rope = RoPE(self.head_dim) if rope else None
        else:
            raise TypeError(f"rope must be a bool or a relattn.pe.RoPE; got {type(rope).__name__}")

        self.qkv = nn.Linear(d_model, (num_heads + 2 * num_kv_heads) * self.head_dim, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The fused projection split into heads, before RoPE.

        Args:
            x: ``(B, N, d_model)``.

        Returns:
            ``q: (B, H, N, D)``, ``k: (B, Hkv, N, D)``, ``v: (B, Hkv, N, D)``.
        """
        b, n, _ = x.shape
        h, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([h * d, hkv * d, hkv * d], dim=-1)
        q = q.view(b, n, h, d).transpose(1, 2)
        k = k.view(b, n, hkv, d).transpose(1, 2)
        v = v.view(b, n, hkv, d).transpose(1, 2)
        return q, k, v

    def forward(
        self,
        x: Tensor,
        *,
        cache: LayerCache | KVCache | None = None,
        doc_ids: Tensor | None = None,
        window: int | None = None,
        key_padding_mask: Tensor | None = None,
        context_parallel: ContextParallel | None = None,
    ) -> Tensor:
        """Attend causally over ``x`` (and the cached past).

        Args:
            x: ``(B, N, d_model)``.
            cache: this layer's cache, ``kv_cache.layer(i)`` (a one-layer KVCache also works).
                The new keys are appended; queries sit at the positions after the cached ones.
            doc_ids: ``(B, N)`` integer document id per token (packed sequences; each document
                one contiguous run). Tokens attend within their document only, and RoPE
                positions restart at 0 on each document.
            window: sliding window W (a token sees the W most recent positions, itself
                included). With a windowed cache, defaults to the cache's window.
            key_padding_mask: ``(B, N)`` bool, True for real tokens.
            context_parallel: a :class:`relattn.distributed.ContextParallel`: ``x``, ``doc_ids``
                and ``key_padding_mask`` are this rank's shard of the sequence (no cache).

        Returns:
            ``(B, N, d_model)``. A token that sees no key gets ``out_proj(0)``.
        """
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.d_model:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (B, N, d_model={self.d_model}); got {got}")
        if x.shape[1] == 0:
            raise ValueError(f"x must hold at least one token; got shape {tuple(x.shape)}")
        b, n, _ = x.shape
        q, k, v = self.project(x)

        window = check_optional_int("window", window, min=1)
        layer_cache = _layer_cache(cache)
        if doc_ids is not None and (not isinstance(doc_ids, Tensor) or doc_ids.shape != (b, n)):
            got = tuple(doc_ids.shape) if isinstance(doc_ids, Tensor) else type(doc_ids).__name__
            raise ValueError(f"doc_ids must have shape (B, N) = ({b}, {n}); got {got}")
        if context_parallel is not None and layer_cache is not None:
            raise ValueError("cache and context_parallel cannot be combined (a cache decodes)")
        if self.rope is not None:
            pos: Tensor | int
            if context_parallel is not None:
                pos = context_parallel.positions(n, x.device, doc_ids)
            elif layer_cache is not None:
                pos = layer_cache.positions(doc_ids)
            elif doc_ids is not None:
                pos = within_doc_positions(doc_ids.to(torch.long))[0]
            else:
                pos = 0
            q, k = self.rope.rotate(q, pos), self.rope.rotate(k, pos)

        q_offset = 0
        if layer_cache is not None:
            if layer_cache.window is not None:
                if window is None:
                    window = layer_cache.window
                elif window > layer_cache.window:
                    raise ValueError(
                        f"window={window} is wider than the cache's window={layer_cache.window}, "
                        "which has dropped the older keys"
                    )
            view = layer_cache.update(k, v, doc_ids, key_padding_mask)
            k, v, q_offset = view.k, view.v, view.q_offset
            doc_ids, key_padding_mask = view.doc_ids, view.key_padding_mask

        if context_parallel is not None:
            y = context_parallel.attention(
                q, k, v, self.pe, causal=self.causal, scale=self.scale, window=window,
                doc_ids=doc_ids, key_padding_mask=key_padding_mask, backend=self.backend,
            )  # fmt: skip
        else:
            y = attention(
                q,
                k,
                v,
                self.pe,
                causal=self.causal,
                scale=self.scale,
                q_offset=q_offset,
                backend=self.backend,
                window=window,
                doc_ids=doc_ids,
                key_padding_mask=key_padding_mask,
            )
        y = y.transpose(1, 2).reshape(b, n, self.d_model)
        return self.dropout(self.out_proj(y))

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_heads={self.num_heads}, "
            f"num_kv_heads={self.num_kv_heads}, backend={self.backend!r}, causal={self.causal}"
            + ("" if self.scale is None else f", scale={self.scale}")
        )


def _layer_cache(cache) -> LayerCache | None:
    if cache is None or isinstance(cache, LayerCache):
        return cache
    if isinstance(cache, KVCache):
        if cache.num_layers != 1:
            raise ValueError(
                f"cache is a KVCache of {cache.num_layers} layers; pass this layer's view, "
                "cache.layer(i)"
            )
        return cache.layer(0)
    raise TypeError(f"cache must be a KVCache layer view or None; got {type(cache).__name__}")
