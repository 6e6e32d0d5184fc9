"""Sampling from a TinyLM one token at a time with the KV cache, for streaming output."""

from __future__ import annotations

import codecs
from collections.abc import Iterator

import torch
from torch import Tensor

from ..models import TinyLM

__all__ = ["sample_bytes", "sample_text"]


@torch.no_grad()
def sample_bytes(
    model: TinyLM,
    prompt: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
) -> Iterator[int]:
    """Yield ``max_new_tokens`` sampled ids after ``prompt``, one as soon as it is drawn.

    One prefill fills the cache, then each step feeds one token. The cache holds exactly the
    positions this call needs (the model has no absolute positions, so no checkpoint setting
    limits the length). Logits are shifted by their maximum before the temperature divides
    them, so a tiny temperature approaches greedy decoding instead of overflowing.

    Args:
        model: a :class:`relattn.models.TinyLM`.
        prompt: ``(N,)`` ids, ``N >= 1``.
        max_new_tokens: how many ids to yield.
        temperature: ``0`` is greedy; otherwise divides the logits.
        top_k: sample among the ``top_k`` most likely ids only.
        seed: seeds a private generator (the global RNG when None).
    """
    model.eval()
    device = model.embed.weight.device
    idx = prompt.to(device=device, dtype=torch.long).view(1, -1)
    if max_new_tokens <= 0:
        return
    cache = model.new_cache(1, capacity=idx.shape[1] + max_new_tokens - 1)
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    logits = model(idx, cache=cache)[:, -1]
    for step in range(max_new_tokens):
        token = _draw(logits[0].float(), temperature, top_k, generator)
        yield token
        if step + 1 < max_new_tokens:
            logits = model(torch.tensor([[token]], device=device), cache=cache)[:, -1]


def _draw(logits: Tensor, temperature: float, top_k: int | None, generator) -> int:
    if temperature == 0:
        return int(logits.argmax())
    # float64: a temperature like 1e-300 is 0 in float32 and would turn the logits into NaN
    logits = (logits.double() - logits.max().double()) / temperature
    if top_k is not None and top_k < logits.numel():
        kth = logits.topk(top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_text(model: TinyLM, prompt: str, max_new_tokens: int, **kwargs) -> Iterator[str]:
    """:func:`sample_bytes` decoded as UTF-8 text piece by piece (a character split across
    bytes appears once complete; invalid bytes become U+FFFD)."""
    from relattn.models import text_to_ids

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in sample_bytes(model, text_to_ids(prompt), max_new_tokens, **kwargs):
        piece = decoder.decode(bytes([token]))
        if piece:
            yield piece
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail
