"""Drawing the next token from logits: temperature, top-k and greedy in one overflow-free rule."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sample_next"]


def sample_next(
    logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> Tensor:
    """One token per row, drawn from ``softmax(logits / temperature)`` restricted to the top k.

    Uses the Gumbel-max rule: ``argmax(logits / T + G)`` with ``G = -log(E)``, ``E ~ Exp(1)``, is
    a draw from ``softmax(logits / T)``. For ``T < 1`` the same argmax is taken of
    ``logits + T·G``, so no temperature overflows (``T = 1e-300`` is greedy up to ties, as its
    distribution is) and ``T = 0`` is exactly greedy.

    Args:
        logits: ``(B, V)``.
        temperature: finite, ``>= 0``.
        top_k: keep the ``top_k`` largest logits per row (None: all).
        generator: the random source (None: the global one).

    Returns:
        ``(B, 1)`` int64 token ids.
    """
    logits = logits.float()
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    noise = torch.empty_like(logits).exponential_(generator=generator)
    # exponential_ can return 0 (one draw in ~2**24): G would be inf, and inf + (-inf) = NaN
    # would let argmax pick a token top-k removed.
    gumbel = -noise.clamp_(min=torch.finfo(noise.dtype).tiny).log()
    if temperature >= 1:
        scores = logits / temperature + gumbel
    else:
        scores = logits + temperature * gumbel
    return scores.argmax(dim=-1, keepdim=True)
