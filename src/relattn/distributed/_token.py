"""The forget gate's F over a sharded sequence.

Each rank passes the forget gate of its own tokens, ``ForgetGate()(log_f)`` on its shard
``log_f (B, Hq, N/W)``: the cumulative sum over the shard, in the shard's order. The gate needs
the global ``F[p] = Σ_{t <= p} log f_t``, so every chunk of the shard (one for the contiguous
layout, two for zigzag) gets its own cumulative sum plus the totals of all the chunks before it
in the sequence, on whichever ranks they lie: an exclusive prefix sum over the chunks' totals,
gathered from every rank. The gather is differentiable (its backward sums the gradients of
every rank's copy of the totals), so ``log f`` on an earlier rank receives the gradient of the
later positions it shifts.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .layout import chunks, world


class _GatherTotals(torch.autograd.Function):
    """``(W, *x.shape)``: every rank's ``x``; backward: this rank's slot of the summed
    gradients of all ranks (an all-reduce)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group) -> Tensor:
        rank, size = world(group)
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.group, ctx.rank = group, rank
        return torch.stack(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank], None


def global_cumulative(local: Tensor, group, layout: str) -> Tensor:
    """The global ``F`` ``(B, Hq, n)`` at this rank's positions from its shard's own cumulative
    sum ``local`` ``(B, Hq, n)`` (``cumsum(log_f, -1)`` of the shard; differentiable).

    A collective: every rank of ``group`` calls it (and, when ``local`` needs a gradient, the
    backward's all-reduce) in the same order.
    """
    rank, size = world(group)
    n = local.shape[-1]
    mine = chunks(rank, size, n, layout)
    parts, totals = [], []
    offset = 0
    for _, c in mine:
        seg = local[..., offset : offset + c]
        if offset:
            seg = seg - local[..., offset - 1 : offset]  # the chunk's own cumulative sum
        parts.append(seg)
        totals.append(seg[..., -1])
        offset += c
    gathered = _GatherTotals.apply(torch.stack(totals, dim=-1), group)  # (W, B, Hq, chunks)
    ordered: list[Tensor | None] = [None] * (size * len(mine))
    for r in range(size):
        for j, (start, c) in enumerate(chunks(r, size, n, layout)):
            ordered[start // c] = gathered[r, ..., j]
    assert all(t is not None for t in ordered), "the layout's chunks cover every slot"
    seq = torch.stack(ordered, dim=-1)  # type: ignore[arg-type]  # (B, Hq, 2W or W)
    before = torch.cat([torch.zeros_like(seq[..., :1]), seq[..., :-1].cumsum(-1)], dim=-1)
    out = [seg + before[..., start // c, None] for seg, (start, c) in zip(parts, mine, strict=True)]
    return torch.cat(out, dim=-1)
