"""The numbers ``relattn explain`` shows: q, k, v (seeded per word, or a trained model's own),
the dot products, the PE term, the scores, the weights and the outputs, for every query and head.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

import relattn
from relattn.models import TinyLM
from relattn.pe import PositionEncoding, RoPE, TokenTerm

__all__ = ["Explanation", "embed", "explain", "from_model", "seeded"]


@dataclass
class Explanation:
    """Everything ``explain`` shows, for all queries and heads (``N`` tokens, ``H`` heads)."""

    tokens: list[str]
    scale: float
    mask: Tensor  # (N, N) bool, key j visible to query i
    dot: Tensor  # (H, N, N) q_i·k_j (after RoPE's rotation when RoPE is used)
    pe: Tensor  # (H, N, N) PE(i, j), the sum of the additive encodings' terms (0 without one)
    scores: Tensor  # (H, N, N) scale·q·k + PE
    weights: Tensor  # (H, N, N) α from relattn.attention_weights
    output: Tensor  # (H, N, D)
    buckets: Tensor | None  # (N, N) bucket of each Δ, when an encoding has buckets (T5)


def seeded(seed: int, *labels: str) -> torch.Generator:
    """A CPU generator seeded by a stable hash (crc32) of ``seed`` and ``labels``."""
    key = "\x00".join([str(seed), *labels]).encode("utf-8")
    return torch.Generator().manual_seed(zlib.crc32(key))


def embed(tokens: list[str], num_heads: int, head_dim: int, seed: int) -> tuple[Tensor, ...]:
    """Seeded random q, k, v of shape ``(1, H, N, D)``; equal words get equal vectors."""
    per_word = [
        torch.randn(3, num_heads, head_dim, generator=seeded(seed, "word", w)) for w in tokens
    ]
    qkv = torch.stack(per_word, dim=2)  # (3, H, N, D)
    return tuple(x.unsqueeze(0) for x in qkv)


def explain(
    tokens: list[str],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    encodings: Sequence[PositionEncoding | RoPE | TokenTerm],
    scale: float | None = None,
) -> Explanation:
    """Scores, PE and weights of causal attention over ``tokens``.

    Args:
        tokens: the N token labels.
        q: ``(1, H, N, D)``; k, v: ``(1, Hkv, N, D)`` with ``Hkv`` dividing H.
        encodings: what ``relattn.attention`` takes as ``pe`` (rotations, additive tables and
            the terms the tokens set, e.g. ``QueryConditionedBias(...)(r)``).
        scale: multiplies ``q·k``; default ``1/√D``.

    The weights and outputs are :func:`relattn.attention_weights`'s and
    :func:`relattn.attention`'s; the dot products and PE terms shown beside them are computed
    here from the same modules (the tests check that they add up to the library's weights).
    """
    num_heads, n, d = q.shape[1:]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if k.shape[1] != num_heads:  # grouped-query attention: each kv head serves a group
        k = k.repeat_interleave(num_heads // k.shape[1], dim=1)
        v = v.repeat_interleave(num_heads // v.shape[1], dim=1)
    rotations = [m for m in encodings if isinstance(m, RoPE)]
    additive = [m for m in encodings if isinstance(m, PositionEncoding)]
    terms = [m for m in encodings if isinstance(m, TokenTerm)]
    qr, kr = q, k
    for rot in rotations:
        qr, kr = rot(qr, kr)
    with torch.no_grad():
        dot = (qr @ kr.transpose(-1, -2))[0]
        pe = torch.zeros(num_heads, n, n)
        for enc in additive:
            pe = pe + enc.bias(n, n).float()
        for term in terms:  # each query's own term (its r, or the gates up to it)
            pe = pe + term.bias(n, n)[0].float()
        scores = scale * dot + pe
        weights = relattn.attention_weights(q, k, encodings or None, scale=scale)[0]
        output = relattn.attention(q, k, v, encodings or None, scale=scale)[0]
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    buckets = None
    for enc in additive:
        of = getattr(enc, "buckets", None)  # T5's bucket of each offset
        if callable(of):
            buckets = of(torch.arange(n)[:, None] - torch.arange(n)[None, :])
    return Explanation(tokens, scale, mask, dot, pe, scores, weights, output, buckets)


def from_model(model: TinyLM, ids: Tensor, tokens: list[str], layer: int) -> Explanation:
    """:func:`explain` with a trained TinyLM's own queries, keys and values at ``layer``.

    Args:
        model: a :class:`relattn.models.TinyLM`.
        ids: ``(1, N)`` token ids (bytes).
        tokens: the N labels shown for them.
        layer: which block's attention.
    """
    from relattn.demo.probe import block, layer_input

    attn = block(model, layer).attn
    x = layer_input(model, ids, layer)
    with torch.no_grad():
        q, k, v = attn.project(x)
        encodings = attn.position_terms(x)  # RoPE, the table, or the term the tokens set
    return explain(tokens, q.float(), k.float(), v.float(), encodings, attn.scale)
