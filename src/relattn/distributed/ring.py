"""Ring attention: keys and values travel around the group while each rank computes.

Step s of the ring: rank r holds the keys/values of rank ``r - s`` (mod W) and attends its
queries to them with the fused op at the *global* offset ``q_offset = first query position -
first key position``, while the next block is already on its way (``batch_isend_irecv``). The
partial outputs merge by their log-sum-exp. Chunk pairs that the causal or window mask hides
entirely are never computed, and the ring stops after the last step any rank needs.

Backward repeats the walk, keys and values again overlapped with compute. dK/dV of a block
travel one step behind it: each rank adds its queries' share into the buffer the accumulator
arrived in and passes it on; after the last step it goes straight to the block's owner. That
hop is not overlapped: it keeps two dK/dV buffers per rank instead of three (measured in
docs/context-parallel.md). Each block's backward uses the global output and the block's
share ``α = exp(lse_block - lse)`` of the softmax mass (see ``_block``).

Documents (``doc_ids``) are contiguous runs of positions, so between two disjoint chunks only
one document can connect them: the first query's when the keys come earlier, the last query's
when they come later. Such a pair is computed as the rows of that document against its keys,
one batch row at a time, with no per-key document test at all.

Terms that depend on the tokens: a block's band takes the rows' ``r`` (this rank's) and reads
the band's weight at the block's global offsets; the forget gate's global ``F`` (see
``_token``) of the key shard travels with its keys and values, dF of those keys travels back
with dK/dV, and dr, dF of the queries and the weight's share stay on the rank.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..backends.base import Backend, TokenTerms
from ..backends.base import Call as Prepared
from ..masks import doc_bounds, offset_bounds
from ._block import _block_backward, _block_forward, block_call
from .layout import chunks

_NEG_INF = float("-inf")

# What the benchmark reads: bytes this process sent and seconds it spent in attention kernels.
STATS = {"bytes_sent": 0, "compute_s": 0.0}


@dataclass
class Call:
    """One fused call: rows of a local query chunk against keys of a visiting key chunk."""

    qi: int  # query chunk, index in this rank's shard
    kj: int  # key chunk, index in the visiting shard
    batch: slice
    rows: slice  # query rows within the chunk
    cols: slice  # keys within the chunk
    q_offset: int  # global position of the first row minus that of the first key
    doc_ids: Tensor | None = None
    key_padding_mask: Tensor | None = None


@dataclass
class Plan:
    """Everything a ring call needs besides the tensors; identical on every rank but ``calls``."""

    group: dist.ProcessGroup | None
    rank: int
    world: int
    n_local: int
    chunk: int  # tokens per chunk
    steps: int  # ring steps (≤ W; fewer when a window hides far blocks)
    lo: int
    scale: float
    causal: bool
    window: int
    backend: Backend
    calls: list[list[Call]] = field(default_factory=list)  # per step

    def block(
        self, call: Call, q: Tensor, k: Tensor, v: Tensor, table, slopes,
        token: TokenTerms | None = None,
    ) -> Prepared:  # fmt: skip
        """The prepared call of one block (see :func:`relattn.distributed._block.block_call`)."""
        return block_call(
            self.backend, q, k, v, table, slopes, self.lo, self.scale, self.causal,
            call.q_offset, self.window, call.doc_ids, call.key_padding_mask, token,
        )  # fmt: skip


def pair_visible(qs: int, nq: int, ks: int, nk: int, causal: bool, window: int) -> bool:
    """Whether queries at positions ``qs ..`` see any key at ``ks ..`` by offset alone."""
    lo, hi = offset_bounds(nq, nk, causal, qs - ks, window)
    return lo <= hi


def ring_steps(world: int, n_local: int, layout: str, causal: bool, window: int) -> int:
    """The number of ring steps after which no rank sees any later visiting block."""
    steps = 1
    for r in range(world):
        mine = chunks(r, world, n_local, layout)
        for s in range(1, world):
            theirs = chunks((r - s) % world, world, n_local, layout)
            pairs = [(a, b) for a in mine for b in theirs]
            if any(pair_visible(*a, *b, causal, window) for a, b in pairs):
                steps = max(steps, s + 1)
    return steps


def plan_calls(
    plan: Plan, layout: str, doc_ids: Tensor | None, key_padding_mask: Tensor | None
) -> None:
    """Fill ``plan.calls`` from the global ``(B, N)`` doc ids and padding mask (or None)."""
    starts = ends = None
    if doc_ids is not None:
        starts, ends = _doc_runs(doc_ids)
    mine = chunks(plan.rank, plan.world, plan.n_local, layout)
    plan.calls = []
    for s in range(plan.steps):
        theirs = chunks((plan.rank - s) % plan.world, plan.world, plan.n_local, layout)
        step = []
        for qi, (qs, nq) in enumerate(mine):
            for kj, (ks, nk) in enumerate(theirs):
                if not pair_visible(qs, nq, ks, nk, plan.causal, plan.window):
                    continue
                if doc_ids is None or qs == ks:
                    docs = doc_ids[:, qs : qs + nq] if doc_ids is not None else None
                    kpm = _padding(key_padding_mask, slice(None), ks, ks + nk)
                    whole = slice(None)
                    rows, cols = slice(0, nq), slice(0, nk)
                    step.append(Call(qi, kj, whole, rows, cols, qs - ks, docs, kpm))
                    continue
                for b in range(doc_ids.shape[0]):
                    call = _document_call(plan, qi, kj, b, qs, nq, ks, nk, starts, ends)
                    if call is not None:
                        p0, p1 = ks + call.cols.start, ks + call.cols.stop
                        call.key_padding_mask = _padding(key_padding_mask, call.batch, p0, p1)
                        step.append(call)
        plan.calls.append(step)


def _doc_runs(doc_ids: Tensor) -> tuple[list[list[int]], list[list[int]]]:
    """Per batch row and position: the first position of its document and one past the last."""
    start, end = doc_bounds(doc_ids)
    return start.tolist(), end.tolist()


def _document_call(plan, qi, kj, b, qs, nq, ks, nk, starts, ends) -> Call | None:
    """The one (rows, keys) rectangle of batch row b that two disjoint chunks share, or None."""
    if ks < qs:  # keys earlier: only the first query's document reaches back into them
        st, en = starts[b][qs], ends[b][qs]
        if st >= ks + nk:
            return None
        rows, cols = slice(0, min(nq, en - qs)), slice(max(st, ks) - ks, nk)
    else:  # keys later: only the last query's document reaches forward into them
        st, en = starts[b][qs + nq - 1], ends[b][qs + nq - 1]
        if en <= ks:
            return None
        rows, cols = slice(max(st, qs) - qs, nq), slice(0, min(en, ks + nk) - ks)
    q0, k0 = qs + rows.start, ks + cols.start
    if not pair_visible(q0, rows.stop - rows.start, k0, cols.stop - cols.start, plan.causal,
                        plan.window):  # fmt: skip
        return None
    return Call(qi, kj, slice(b, b + 1), rows, cols, q0 - k0)


def _padding(key_padding_mask: Tensor | None, batch: slice, p0: int, p1: int) -> Tensor | None:
    if key_padding_mask is None:
        return None
    kpm = key_padding_mask[batch, p0:p1]
    return None if bool(kpm.all()) else kpm.contiguous()


# ----------------------------------------------------------------------------- communication


def _exchange(plan: Plan, send, recv, to: int, frm: int, tag: int) -> list:
    """Start sending the tensors ``send`` to group rank ``to`` and receiving ``recv`` (same
    shapes) from ``frm``."""
    g = plan.group
    to_g = dist.get_global_rank(g, to) if g is not None else to
    frm_g = dist.get_global_rank(g, frm) if g is not None else frm
    ops = []
    for i, (x, y) in enumerate(zip(send, recv, strict=True)):
        STATS["bytes_sent"] += x.numel() * x.element_size()
        ops.append(dist.P2POp(dist.isend, x, to_g, group=g, tag=4 * tag + i))
        ops.append(dist.P2POp(dist.irecv, y, frm_g, group=g, tag=4 * tag + i))
    return dist.batch_isend_irecv(ops)


def _wait(works: list) -> None:
    for w in works:
        w.wait()


class _Visiting:
    """The keys and values a rank attends to at each ring step (and the forget gate's F at
    those keys, ``(B, Hq, n)``, when the call has one): its own at step 0 (sent on as they
    are, copied only if not contiguous), then blocks received into at most two rotating
    buffers. ``kv`` is ``(k, v)`` or ``(k, v, F)``."""

    def __init__(self, plan: Plan, *tensors: Tensor) -> None:
        self.plan, self.own = plan, tuple(x.contiguous() for x in tensors)
        self.kv: tuple[Tensor, ...] = self.own
        self.spare: list[tuple[Tensor, ...]] = []
        self.incoming: tuple[Tensor, ...] | None = None
        self.works: list = []

    def send_on(self) -> None:
        """Start passing the current block to the next rank and receiving the next one."""
        self.incoming = (
            self.spare.pop() if self.spare else tuple(torch.empty_like(x) for x in self.kv)
        )
        nxt, prv = (self.plan.rank + 1) % self.plan.world, (self.plan.rank - 1) % self.plan.world
        self.works = _exchange(self.plan, self.kv, self.incoming, nxt, prv, 0)

    def advance(self) -> None:
        _wait(self.works)
        if self.incoming is None:  # the last step: nothing was sent on, nothing comes
            self.works = []
            return
        if self.kv is not self.own:
            self.spare.append(self.kv)
        self.kv, self.incoming, self.works = self.incoming, None, []


# ----------------------------------------------------------------------------- the function


def _merge(out: Tensor, lse: Tensor, o: Tensor, lse_o: Tensor) -> None:
    """``(out, lse) ← the softmax over both key sets``, in place (views of the accumulators)."""
    new = torch.logaddexp(lse, lse_o)
    safe = torch.where(new == _NEG_INF, 0.0, new)  # rows with no key so far stay 0, not NaN
    out.mul_(torch.exp(lse - safe)[..., None])
    out.add_(o.to(out.dtype) * torch.exp(lse_o - safe)[..., None])
    lse.copy_(new)


def _chunk(x: Tensor, j: int, c: int) -> Tensor:
    """Chunk j (``c`` tokens) of a shard ``(..., n, D)``: a view."""
    return x[..., j * c : (j + 1) * c, :]


def _rows(x: Tensor, j: int, c: int, call: Call, cols: bool = False) -> Tensor:
    """The block's rows (``cols``: its keys) of chunk j of a per-position ``(B, H, n)``."""
    return x[..., j * c : (j + 1) * c][call.batch, :, call.cols if cols else call.rows]


def _token(call: Call, c: int, r, weight, f, f_keys) -> TokenTerms | None:
    """The block's :class:`TokenTerms`: its rows' r ``(B, Hq, rows, R)``, the weight, F at its
    rows (``f``, this rank's) and at its keys (``f_keys``, the visiting shard's); or None."""
    if r is None and f is None:
        return None
    rows = _chunk(r, call.qi, c)[call.batch, :, call.rows] if r is not None else None
    fq = _rows(f, call.qi, c, call) if f is not None else None
    fk = _rows(f_keys, call.kj, c, call, cols=True) if f_keys is not None else None
    return TokenTerms(rows, weight, fq, fk)


class RingAttention(torch.autograd.Function):
    """``out (B, Hq, n, D)`` of this rank's queries over the whole sequence; see the module."""

    @staticmethod
    def forward(ctx, q, k, v, table, slopes, r, weight, f, plan: Plan):
        """``r (B, Hq, n, R)``, ``weight (Hw, R, W)``: the band (or None); ``f (B, Hq, n)``:
        the forget gate's global F at this rank's positions (or None)."""
        bsz, hq, n, d = q.shape
        c = plan.chunk
        compute = torch.promote_types(q.dtype, torch.float32)
        out = torch.zeros(bsz, hq, n, d, dtype=compute, device=q.device)
        lse = torch.full((bsz, hq, n), _NEG_INF, dtype=torch.float32, device=q.device)
        visiting = _Visiting(plan, k, v, *((f,) if f is not None else ()))
        block_lse = []
        for s in range(plan.steps):
            if s + 1 < plan.steps:
                visiting.send_on()
            t0 = time.perf_counter()
            for call in plan.calls[s]:
                kc, vc = (_chunk(x, call.kj, c)[call.batch, :, call.cols] for x in visiting.kv[:2])
                qc = _chunk(q, call.qi, c)[call.batch, :, call.rows]
                f_keys = visiting.kv[2] if f is not None else None
                token = _token(call, c, r, weight, f, f_keys)
                o, lse_o = _block_forward(plan.block(call, qc, kc, vc, table, slopes, token))
                rows_out = _chunk(out, call.qi, c)[call.batch, :, call.rows]
                rows_lse = lse[..., call.qi * c : (call.qi + 1) * c][call.batch, :, call.rows]
                _merge(rows_out, rows_lse, o, lse_o)
                block_lse.append(lse_o)
            STATS["compute_s"] += time.perf_counter() - t0
            visiting.advance()
        del visiting
        ctx.plan = plan
        ctx.block_lse = block_lse
        ctx.save_for_backward(q, k, v, out, lse, table, slopes, r, weight, f)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse, table, slopes, r, weight, f = ctx.saved_tensors
        plan: Plan = ctx.plan
        c = plan.chunk
        compute = out.dtype
        rank, w = plan.rank, plan.world
        nxt, prv = (rank + 1) % w, (rank - 1) % w
        want_table = table is not None and ctx.needs_input_grad[3]
        do = grad_out.to(compute)
        dq = torch.zeros_like(out)
        dtable = None
        if want_table:
            dtable = torch.zeros(table.shape, dtype=torch.float32, device=q.device)
        dr = torch.zeros(r.shape, dtype=compute, device=q.device) if r is not None else None
        dweight = None
        if weight is not None:
            dweight = torch.zeros(weight.shape, dtype=compute, device=q.device)
        dfq = torch.zeros(f.shape, dtype=compute, device=q.device) if f is not None else None
        visiting = _Visiting(plan, k, v, *((f,) if f is not None else ()))
        # dK/dV of the visiting block (and dF of its keys) accumulate in the buffers that
        # brought them from the previous rank: two sets in all (the one filling, the one in
        # flight), at the price of waiting for it at the start of the step instead of
        # overlapping that hop.
        acc: tuple[Tensor, ...] | None = None
        spare: tuple[Tensor, ...] | None = None
        incoming: tuple[Tensor, ...] | None = None
        works: list = []
        block_lse = iter(ctx.block_lse)
        for s in range(plan.steps):
            if s + 1 < plan.steps:
                visiting.send_on()
            if s == 0:
                acc = (torch.zeros((2, *k.shape), dtype=compute, device=k.device),)
                if f is not None:
                    acc += (torch.zeros(f.shape, dtype=compute, device=f.device),)
            else:
                _wait(works)
                acc, spare = incoming, acc
            assert acc is not None  # step 0 made it; every later step received one
            t0 = time.perf_counter()
            for call in plan.calls[s]:
                lse_o = next(block_lse)
                lse_rows = lse[..., call.qi * c : (call.qi + 1) * c][call.batch, :, call.rows]
                alpha = torch.exp(lse_o - torch.where(lse_rows == _NEG_INF, 0.0, lse_rows))
                alpha = torch.where(lse_rows == _NEG_INF, 0.0, alpha)
                g = _chunk(do, call.qi, c)[call.batch, :, call.rows] * alpha[..., None]
                kc, vc = (_chunk(x, call.kj, c)[call.batch, :, call.cols] for x in visiting.kv[:2])
                qc = _chunk(q, call.qi, c)[call.batch, :, call.rows]
                oc = _chunk(out, call.qi, c)[call.batch, :, call.rows]
                f_keys = visiting.kv[2] if f is not None else None
                token = _token(call, c, r, weight, f, f_keys)
                block = plan.block(call, qc, kc, vc, table, slopes, token)
                dq_, dk_, dv_, dt_, *dtoken = _block_backward(
                    block, g.to(q.dtype), oc.to(q.dtype), lse_o, partial=True
                )
                del g
                _chunk(dq, call.qi, c)[call.batch, :, call.rows] += dq_
                _chunk(acc[0][0], call.kj, c)[call.batch, :, call.cols] += dk_
                _chunk(acc[0][1], call.kj, c)[call.batch, :, call.cols] += dv_
                if want_table:
                    assert dtable is not None and dt_ is not None  # both exist for a table
                    dtable += dt_
                if dtoken:
                    dr_, dw_, dfq_, dfk_ = dtoken
                    if dr is not None:
                        _chunk(dr, call.qi, c)[call.batch, :, call.rows] += dr_
                        dweight += dw_
                    if dfq is not None:
                        _rows(dfq, call.qi, c, call).add_(dfq_)
                        _rows(acc[1], call.kj, c, call, cols=True).add_(dfk_)
                del dq_, dk_, dv_, dt_, dtoken
            STATS["compute_s"] += time.perf_counter() - t0
            last = s + 1 == plan.steps
            # Along the ring to the next rank; after the last step, straight to the block's owner.
            to, frm = (nxt, prv) if not last else ((rank - s) % w, (rank + s) % w)
            if to != rank:
                if spare is None:
                    incoming = tuple(torch.empty_like(x) for x in acc)
                else:
                    incoming = spare
                works = _exchange(plan, list(acc), list(incoming), to, frm, 1)
            else:
                incoming, works = acc, []
            visiting.advance()
        _wait(works)
        del visiting, acc, spare
        acc_in = incoming
        assert acc_in is not None  # plan.steps >= 1
        dk, dv = acc_in[0][0].to(k.dtype), acc_in[0][1].to(v.dtype)
        if dtable is not None:
            dtable = dtable.to(table.dtype)
        df = None
        if dfq is not None:
            df = (dfq + acc_in[1]).to(f.dtype)  # its rows' share and its keys', from every rank
        if dr is not None and dweight is not None and r is not None and weight is not None:
            dr, dweight = dr.to(r.dtype), dweight.to(weight.dtype)
        return dq.to(q.dtype), dk, dv, dtable, None, dr, dweight, df, None
