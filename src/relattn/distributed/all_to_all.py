"""All-to-all (Ulysses) attention: trade the sequence split for a head split and back.

Each rank holds all heads of N/W tokens. One ``all_to_all`` hands every rank all N tokens of
H/W heads (q, k and v packed in one exchange); the rank runs the ordinary fused attention on
its heads with the matching rows of the encoding's table, and a second ``all_to_all`` returns
each token's output to the rank that holds it. Backward mirrors it: the output gradient goes
to the heads' ranks, the fused backward runs once per rank, and dq, dk, dv come back. The
table's gradient is nonzero only in this rank's rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ._block import _block_backward, _block_forward
from .ring import STATS


@dataclass
class Plan:
    group: object
    rank: int
    world: int
    # Index maps along N (None for the contiguous layout, already in order): global position g
    # sits at rank-major index to_global[g]; rank-major index i holds position to_rank_major[i].
    to_global: Tensor | None
    to_rank_major: Tensor | None
    lo: int
    scale: float
    causal: bool
    window: int
    backend: str
    doc_ids: Tensor | None  # (B, N), global order
    key_padding_mask: Tensor | None


def _all_to_all(plan: Plan, x: Tensor) -> Tensor:
    """Exchange slices ``x[w]`` (to rank w) for the slices every rank has for this one."""
    x = x.contiguous()
    out = torch.empty_like(x)
    STATS["bytes_sent"] += x.numel() * x.element_size() * (plan.world - 1) // plan.world
    dist.all_to_all_single(out, x, group=plan.group)
    return out


def seq_to_heads(plan: Plan, x: Tensor) -> Tensor:
    """``(B, W, h, n, D)`` (slice w: the heads of rank w) -> ``(B, h, N, D)`` in position order."""
    got = _all_to_all(plan, x.transpose(0, 1))  # (W, B, h, n, D): got[w] = rank w's tokens
    w, b, h, n, d = got.shape
    full = got.permute(1, 2, 0, 3, 4).reshape(b, h, w * n, d)
    if plan.to_global is not None:
        full = full.index_select(2, plan.to_global)
    return full


def heads_to_seq(plan: Plan, y: Tensor) -> Tensor:
    """``(B, h, N, D)`` in position order -> ``(B, W, h, n, D)`` (slice w: the heads of rank w)."""
    if plan.to_rank_major is not None:
        y = y.index_select(2, plan.to_rank_major)
    b, h, big_n, d = y.shape
    w = plan.world
    send = y.view(b, h, w, big_n // w, d).permute(2, 0, 1, 3, 4)  # (W, B, h, n, D)
    return _all_to_all(plan, send).transpose(0, 1)


def _by_rank(x: Tensor, w: int) -> Tensor:
    """``(B, H, n, D)`` -> ``(B, W, H/W, n, D)``."""
    b, h, n, d = x.shape
    return x.view(b, w, h // w, n, d)


class AllToAllAttention(torch.autograd.Function):
    """``out (B, Hq, n, D)`` of this rank's tokens over the whole sequence; see the module."""

    @staticmethod
    def forward(ctx, q, k, v, table, slopes, plan: Plan):
        w = plan.world
        hq, hkv = q.shape[1] // w, k.shape[1] // w
        packed = torch.cat([_by_rank(q, w), _by_rank(k, w), _by_rank(v, w)], dim=2)
        qh, kh, vh = seq_to_heads(plan, packed).split([hq, hkv, hkv], dim=1)
        heads = slice(plan.rank * hq, (plan.rank + 1) * hq)
        table_h = table[heads] if table is not None else None
        slopes_h = slopes[heads] if slopes is not None else None
        out_h, lse_h = _block_forward(
            qh, kh, vh, table_h, slopes_h, plan.doc_ids, plan.key_padding_mask,
            plan.lo, plan.scale, plan.causal, 0, plan.window, plan.backend,
        )  # fmt: skip
        ctx.plan, ctx.heads = plan, heads
        ctx.save_for_backward(qh, kh, vh, out_h, lse_h, table_h, slopes_h, table)
        b, _, n, d = q.shape
        return heads_to_seq(plan, out_h).reshape(b, w * hq, n, d)

    @staticmethod
    def backward(ctx, grad_out):
        qh, kh, vh, out_h, lse_h, table_h, slopes_h, table = ctx.saved_tensors
        plan: Plan = ctx.plan
        w = plan.world
        dout_h = seq_to_heads(plan, _by_rank(grad_out.contiguous(), w))
        dqh, dkh, dvh, dt = _block_backward(
            dout_h, qh, kh, vh, out_h, lse_h, table_h, slopes_h, plan.doc_ids,
            plan.key_padding_mask, plan.lo, plan.scale, plan.causal, 0, plan.window,
            plan.backend, partial=False,
        )  # fmt: skip
        hq, hkv = qh.shape[1], kh.shape[1]
        back = heads_to_seq(plan, torch.cat([dqh, dkh, dvh], dim=1))  # (B, W, hq+2hkv, n, D)
        b, _, _, n, d = back.shape
        dq, dk, dv = (x.reshape(b, w * x.shape[2], n, d) for x in back.split([hq, hkv, hkv], dim=2))
        dtable = None
        if table is not None and ctx.needs_input_grad[3]:
            dtable = torch.zeros_like(table)
            dtable[ctx.heads] = dt
        return dq, dk, dv, dtable, None, None
