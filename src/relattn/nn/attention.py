"""Causal self-attention with a relative position encoding, as a layer.

q, k, v = x·W_qkv           (one fused projection; GQA: Hkv key/value heads)
q, k    = RoPE(q), RoPE(k)   (optional)
PE      = a table encoding, or a term the tokens set (pe="inkling": r = x·W_r, the banded
          bias's latents; pe="fox": log f = log σ(x·w_f + b), the forget gate)
y       = attention(q, k, v, PE)  — see relattn.attention
out     = Dropout(y·W_out)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import backends
from .. import pe as encodings
from .._validate import check_bool, check_float, check_int, check_optional_int
from ..cache import KVCache, LayerCache
from ..functional import attention
from ..masks import within_doc_positions
from ..pe import PositionEncoding, RoPE
from ..pe.token import ForgetGate, GateTerm, QueryConditionedBias, TokenTerm

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
            :class:`relattn.pe.PositionEncoding` instance with ``num_heads == H``. A term
            the tokens set -- ``"inkling"`` or a :class:`relattn.pe.QueryConditionedBias`
            (``num_heads == H``), ``"fox"`` or a :class:`relattn.pe.ForgetGate` -- gets its
            projection from the layer's input: ``r_proj`` (``d_model -> H·rank``, the banded
            bias's latents r) or ``gate_proj`` (``d_model -> H`` with a bias, ``log f =
            logsigmoid(gate_proj(x))``; the bias starts at 3 .. 6 across heads, gates near 1).
        rope: also rotate q and k by RoPE (True, or a :class:`relattn.pe.RoPE` of head dim D).
        scale: multiplies ``q·k``; default ``1/√D`` (T5 uses 1.0).
        causal: mask keys after the query; False for an encoder layer.
        dropout: applied to the output projection. Dropout on the attention weights would need
            the weights materialized, which the fused kernels never do, so it is not offered.
        bias: biases in the qkv and output projections.
        backend: passed to :func:`relattn.attention`.

    Attributes:
        pe: the additive encoding module (a table encoding, a QueryConditionedBias or a
            ForgetGate), or None. rope: the RoPE module, or None.
        r_proj: ``nn.Linear(d_model, H·rank)`` for a QueryConditionedBias, else None.
        gate_proj: ``nn.Linear(d_model, H)`` for a ForgetGate, else None.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        pe: str | PositionEncoding | QueryConditionedBias | ForgetGate | None = "t5",
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

        self.pe: PositionEncoding | QueryConditionedBias | ForgetGate | None
        self.rope: RoPE | None
        if pe is None or isinstance(pe, str):
            built = encodings.create(pe or "none", num_heads, self.head_dim)
            if isinstance(built, RoPE):
                built, rope = None, rope if isinstance(rope, RoPE) else True
            if built is not None and not isinstance(built, _LAYER_PE):
                raise TypeError(
                    f"pe={pe!r} built a {type(built).__name__}, not a PositionEncoding, RoPE, "
                    "QueryConditionedBias or ForgetGate"
                )
            pe = built
        if pe is None:
            self.pe = None
        elif isinstance(pe, (PositionEncoding, QueryConditionedBias)):
            if pe.num_heads != num_heads:
                raise ValueError(
                    f"pe {type(pe).__name__} has num_heads={pe.num_heads}; the layer has "
                    f"num_heads={num_heads}"
                )
            self.pe = pe
        elif isinstance(pe, ForgetGate):
            self.pe = pe
        elif isinstance(pe, RoPE):
            raise TypeError(
                "pe must be an additive encoding; pass RoPE as rope=True (or rope=RoPE)"
            )
        else:
            raise TypeError(
                f"pe must be 'none', one of {encodings.names()}, a relattn.pe encoding, a "
                f"QueryConditionedBias or a ForgetGate; got {type(pe).__name__}"
            )
        # The projections of the terms the tokens set (their encodings own what is learned
        # per offset; the layer computes the per-token inputs from x).
        self.r_proj: nn.Linear | None = None
        self.gate_proj: nn.Linear | None = None
        if isinstance(self.pe, QueryConditionedBias):
            self.r_proj = nn.Linear(d_model, num_heads * self.pe.rank, bias=bias)
        elif isinstance(self.pe, ForgetGate):
            self.gate_proj = nn.Linear(d_model, num_heads, bias=True)
            self.reset_gate_bias()
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

    def reset_gate_bias(self) -> None:
        """The forget gate projection's bias set to 3 .. 6 across the heads (FoX's choice:
        gates ``σ(b) ≈ 0.95 .. 0.998`` at the start, so attention starts long-range, each head
        with its own decay); a no-op without a forget gate."""
        if self.gate_proj is not None and self.gate_proj.bias is not None:
            with torch.no_grad():
                self.gate_proj.bias.copy_(torch.linspace(3.0, 6.0, self.num_heads))

    def log_forget(self, x: Tensor) -> Tensor:
        """The forget gate's ``log f = logsigmoid(gate_proj(x))`` per head.

        Args:
            x: ``(B, N, d_model)``.

        Returns:
            ``(B, H, N)`` in float32 (float64 for a float64 layer), ``<= 0``.
        """
        if self.gate_proj is None:
            raise ValueError("log_forget needs a layer with pe='fox' (a ForgetGate)")
        logits = self.gate_proj(x)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return F.logsigmoid(logits).transpose(1, 2)

    def latents(self, x: Tensor) -> Tensor:
        """The banded bias's latents ``r = r_proj(x)`` per head.

        Args:
            x: ``(B, N, d_model)``.

        Returns:
            ``(B, H, N, rank)``.
        """
        if self.r_proj is None or not isinstance(self.pe, QueryConditionedBias):
            raise ValueError("latents needs a layer with pe='inkling' (a QueryConditionedBias)")
        b, n, _ = x.shape
        return self.r_proj(x).view(b, n, self.num_heads, self.pe.rank).transpose(1, 2)

    def position_terms(self, x: Tensor) -> list[PositionEncoding | RoPE | TokenTerm]:
        """What the layer passes as ``pe`` to :func:`relattn.attention` for ``x`` attended
        alone (no cache): RoPE, then the table encoding or the term the tokens set (for tools
        that recompute the attention weights, e.g. :func:`relattn.attention_weights`).

        Args:
            x: ``(B, N, d_model)``, the layer's input.
        """
        terms: list[PositionEncoding | RoPE | TokenTerm] = []
        if self.rope is not None:
            terms.append(self.rope)
        if isinstance(self.pe, QueryConditionedBias):
            terms.append(self.pe(self.latents(x)))
        elif isinstance(self.pe, ForgetGate):
            terms.append(self.pe(self.log_forget(x)))
        elif self.pe is not None:
            terms.append(self.pe)
        return terms

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

        pe: PositionEncoding | TokenTerm | None = None
        log_f = None
        if isinstance(self.pe, QueryConditionedBias):
            pe = self.pe(self.latents(x))  # the new queries' latents: nothing to cache
        elif isinstance(self.pe, ForgetGate):
            log_f = self.log_forget(x)
            if layer_cache is None:
                pe = self.pe(log_f)
        else:
            pe = self.pe

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
            view = layer_cache.update(k, v, doc_ids, key_padding_mask, log_f)
            k, v, q_offset = view.k, view.v, view.q_offset
            doc_ids, key_padding_mask = view.doc_ids, view.key_padding_mask
            if view.gate is not None:
                # F at every kept and new key, from log_f the cache checked (no second check)
                pe = GateTerm(view.gate)

        if context_parallel is not None:
            y = context_parallel.attention(
                q, k, v, pe, causal=self.causal, scale=self.scale, window=window,
                doc_ids=doc_ids, key_padding_mask=key_padding_mask, backend=self.backend,
            )  # fmt: skip
        else:
            y = attention(
                q,
                k,
                v,
                pe,
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


_TOKEN_PE = (QueryConditionedBias, ForgetGate)
_LAYER_PE = (PositionEncoding, *_TOKEN_PE)


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
