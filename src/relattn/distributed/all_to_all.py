"""All-to-all (Ulysses) attention: trade the sequence split for a head split and back.

Each rank holds all heads of N/W tokens. One ``all_to_all`` hands every rank all N tokens of
H/W heads (q, k and v packed in one exchange); the rank runs the ordinary fused attention on
its heads with the matching rows of the encoding's table, and a second ``all_to_all`` returns
each token's output to the rank that holds it. Backward mirrors it: the output gradient goes
to the heads' ranks, the fused backward runs once per rank, and dq, dk, dv come back. The
table's gradient is nonzero only in this rank's rows.

Terms that depend on the tokens split by heads too: r ``(B, Hq, n, R)`` and the forget gate's
global F ``(B, Hq, n)`` travel in one more exchange (packed as ``(B, Hq, n, R + 1)``), the
band's weight is sliced to this rank's heads (or shared whole), and dr, dF come back the same
way; the weight's gradient holds this rank's share.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..backends.base import Backend, Call, TokenTerms
from ._block import _block_backward, _block_forward, block_call
from .layout import chunks
from .ring import STATS


@dataclass
class Plan:
    group: dist.ProcessGroup | None
    rank: int
    world: int
    layout: str
    n_local: int
    lo: int
    scale: float
    causal: bool
    window: int
    backend: Backend
    doc_ids: Tensor | None  # (B, N), global order
    key_padding_mask: Tensor | None

    def block(
        self, q: Tensor, k: Tensor, v: Tensor, table, slopes, token: TokenTerms | None = None
    ) -> Call:
        """This rank's heads as one prepared call (no offset between its rows and keys)."""
        return block_call(
            self.backend, q, k, v, table, slopes, self.lo, self.scale, self.causal, 0,
            self.window, self.doc_ids, self.key_padding_mask, token,
        )  # fmt: skip


def _all_to_all(plan: Plan, x: Tensor) -> Tensor:
    """Exchange slices ``x[w]`` (to rank w) for the slices every rank has for this one."""
    out = torch.empty_like(x)
    STATS["bytes_sent"] += x.numel() * x.element_size() * (plan.world - 1) // plan.world
    dist.all_to_all_single(out, x, group=plan.group)
    return out


def _spans(plan: Plan):
    """``(rank, offset in its shard, global position, length)`` of every chunk."""
    for w in range(plan.world):
        offset = 0
        for start, c in chunks(w, plan.world, plan.n_local, plan.layout):
            yield w, offset, start, c
            offset += c


def seq_to_heads(plan: Plan, parts: list[Tensor]) -> list[Tensor]:
    """This rank's shards ``(B, H_i, n, D)`` of several tensors -> all N tokens, in position
    order, of this rank's heads of each: ``(B, H_i/W, N, D)``. One all-to-all for all of them."""
    b, n, d = parts[0].shape[0], parts[0].shape[2], parts[0].shape[3]
    w = plan.world
    heads = [x.shape[1] // w for x in parts]
    send = parts[0].new_empty(w, b, sum(heads), n, d)
    h0 = 0
    for x, h in zip(parts, heads, strict=True):
        send[:, :, h0 : h0 + h] = x.reshape(b, w, h, n, d).transpose(0, 1)
        h0 += h
    got = _all_to_all(plan, send)  # got[w]: rank w's tokens of this rank's heads
    full = got.new_empty(b, sum(heads), w * n, d)
    for r, offset, start, c in _spans(plan):
        full[:, :, start : start + c] = got[r, :, :, offset : offset + c]
    return list(full.split(heads, dim=1))


def heads_to_seq(plan: Plan, parts: list[Tensor]) -> list[Tensor]:
    """The inverse of :func:`seq_to_heads`: ``(B, h_i, N, D)`` -> ``(B, W·h_i, n, D)``."""
    b, d = parts[0].shape[0], parts[0].shape[3]
    w, n = plan.world, plan.n_local
    heads = [x.shape[1] for x in parts]
    send = parts[0].new_empty(w, b, sum(heads), n, d)
    h0 = 0
    for x, h in zip(parts, heads, strict=True):
        for r, offset, start, c in _spans(plan):
            send[r, :, h0 : h0 + h, offset : offset + c] = x[:, :, start : start + c]
        h0 += h
    got = _all_to_all(plan, send)  # got[w]: this rank's tokens of rank w's heads
    return [x.transpose(0, 1).reshape(b, w * x.shape[2], n, d) for x in got.split(heads, dim=2)]


def _pack(r: Tensor | None, f: Tensor | None) -> Tensor:
    """r ``(B, H, n, R)`` and F ``(B, H, n)`` (either may be None) as one ``(B, H, n, R + 1)``."""
    parts = ([r] if r is not None else []) + ([f[..., None]] if f is not None else [])
    return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]


def _unpack(x: Tensor, r: bool, f: bool) -> tuple[Tensor | None, Tensor | None]:
    """The inverse of :func:`_pack` (contiguous parts)."""
    rr = x[..., : x.shape[-1] - int(f)].contiguous() if r else None
    ff = x[..., -1].contiguous() if f else None
    return rr, ff


class AllToAllAttention(torch.autograd.Function):
    """``out (B, Hq, n, D)`` of this rank's tokens over the whole sequence; see the module."""

    @staticmethod
    def forward(ctx, q, k, v, table, slopes, r, weight, f, plan: Plan):
        """``r (B, Hq, n, R)``, ``weight (Hw, R, W)``: the band (or None); ``f (B, Hq, n)``:
        the forget gate's global F at this rank's positions (or None)."""
        hq = q.shape[1] // plan.world
        qh, kh, vh = seq_to_heads(plan, [q, k, v])
        heads = slice(plan.rank * hq, (plan.rank + 1) * hq)
        table_h = table[heads] if table is not None else None
        slopes_h = slopes[heads] if slopes is not None else None
        token = None
        if r is not None or f is not None:
            (packed,) = seq_to_heads(plan, [_pack(r, f)])
            r_h, f_h = _unpack(packed, r is not None, f is not None)
            w_h = weight[heads] if weight is not None and weight.shape[0] != 1 else weight
            token = TokenTerms(r_h, w_h, f_h, f_h)
        t0 = time.perf_counter()
        call = plan.block(qh, kh, vh, table_h, slopes_h, token)
        out_h, lse_h = _block_forward(call)
        STATS["compute_s"] += time.perf_counter() - t0
        ctx.plan, ctx.heads = plan, heads
        ctx.token = token is not None
        tok = call.token if call.token is not None else TokenTerms(None, None, None, None)
        ctx.save_for_backward(call.q, call.k, call.v, out_h, lse_h, call.table, call.slopes, table,
                              tok.r, tok.weight, tok.fq, weight)  # fmt: skip
        return heads_to_seq(plan, [out_h])[0]

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        qh, kh, vh, out_h, lse_h, table_h, slopes_h, table, r_h, w_h, f_h, weight = (
            ctx.saved_tensors
        )
        plan: Plan = ctx.plan
        (dout_h,) = seq_to_heads(plan, [grad_out])
        token = TokenTerms(r_h, w_h, f_h, f_h) if ctx.token else None
        t0 = time.perf_counter()
        call = plan.block(qh, kh, vh, table_h, slopes_h, token)
        dqh, dkh, dvh, dt, *dtoken = _block_backward(call, dout_h, out_h, lse_h, partial=False)
        STATS["compute_s"] += time.perf_counter() - t0
        dq, dk, dv = heads_to_seq(plan, [dqh, dkh, dvh])
        dtable = None
        if table is not None and ctx.needs_input_grad[3]:
            dtable = torch.zeros_like(table)
            assert dt is not None  # a backend's backward returns dtable for a table
            dtable[ctx.heads] = dt
        dr = dweight = df = None
        if dtoken:
            dr_h, dw_h, dfq_h, dfk_h = dtoken
            df_h = dfq_h + dfk_h if dfq_h is not None else None  # F is both the rows' and keys'
            (packed,) = heads_to_seq(plan, [_pack(dr_h, df_h)])
            dr, df = _unpack(packed, dr_h is not None, df_h is not None)
            if dw_h is not None:
                if weight.shape[0] == 1:
                    dweight = dw_h
                else:
                    dweight = torch.zeros_like(weight)
                    dweight[ctx.heads] = dw_h
        return dq, dk, dv, dtable, None, dr, dweight, df, None
