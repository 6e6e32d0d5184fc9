"""Held-out perplexity at several evaluation lengths, on the same bytes for every model.

Protocol: the first ``total`` bytes of the held-out stream are cut into non-overlapping windows
of length ``n`` (``total`` is a multiple of every ``n``). Each window is run through the model
from an empty context, and the loss is averaged over every position of every window. Longer
windows therefore also contain more positions far from the start, which is exactly where a
model trained on short windows has never been.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models import TinyLM
from .data import eval_windows


def eval_total(lengths: list[int], target: int) -> int:
    """The number of held-out bytes to evaluate on: ``target`` rounded down to a multiple of the
    longest length (which every other length divides), but at least two longest windows."""
    longest = max(lengths)
    for n in lengths:
        if longest % n:
            raise ValueError(f"every length must divide the longest; got {lengths}")
    return max(2, target // longest) * longest


@torch.no_grad()
def perplexity(
    model: TinyLM, stream: Tensor, length: int, total: int, tokens_per_batch: int = 8192
) -> dict:
    """Mean next-byte loss of ``model`` over non-overlapping windows of ``length`` bytes.

    Args:
        model: maps ``(B, N)`` int64 bytes to ``(B, N, V)`` logits.
        stream: the held-out bytes (uint8).
        length: window length N.
        total: bytes evaluated (a multiple of ``length``).
        tokens_per_batch: windows are batched up to this many tokens.

    Returns:
        ``{"length", "windows", "tokens", "loss" (nats/byte), "ppl", "bpb", "seconds"}``.
    """
    was_training = model.training
    model.eval()
    x, y = eval_windows(stream, length, total)
    per_batch = max(1, tokens_per_batch // length)
    nll = 0.0
    start = time.perf_counter()
    for i in range(0, x.shape[0], per_batch):
        logits = model(x[i : i + per_batch])
        nll += F.cross_entropy(
            logits.float().flatten(0, 1), y[i : i + per_batch].flatten(), reduction="sum"
        ).item()
    model.train(was_training)
    loss = nll / y.numel()
    return {
        "length": length,
        "windows": int(x.shape[0]),
        "tokens": int(y.numel()),
        "loss": loss,
        "ppl": math.exp(loss),
        "bpb": loss / math.log(2),
        "seconds": time.perf_counter() - start,
    }


def evaluate(
    model: TinyLM, stream: Tensor, lengths: list[int], total: int, progress=None
) -> list[dict]:
    """:func:`perplexity` at each length; ``progress(done, result)`` is called after each."""
    results = []
    for n in lengths:
        results.append(perplexity(model, stream, n, total))
        if progress is not None:
            progress(len(results), results[-1])
    return results
