"""Exact attention block by block in plain PyTorch: the memory-light CPU backend.

A block of up to ``BLOCK_M`` query rows is scored against every key it can see in one matmul
(``scale·q·kᵀ + bias``), so no online softmax is needed and no N×N tensor ever exists: the live
scores are ``O(H·BLOCK_M·N)``. Blocks of keys that no row of the block can see (above the
causal diagonal, outside the window, in another document) are never computed.

The bias of a query block is a Toeplitz slice of one per-call *band*

    band[h, r, u] = E[h, Δ]   with   Δ = e_max - (u - r),

where ``E`` is the table extended over every offset a block can touch, ``-inf`` for offsets that
causality or the window hide (so those masks cost nothing). Query row ``r0 + r`` against key
``c`` reads column ``u = e_max - q_offset - r0 + c``: a contiguous column slice of the same band
for every block, fused into the score matmul with ``baddbmm``. The backward pass accumulates
``dS`` into a band-shaped buffer through the same slices and takes the diagonal sums once at the
end (a skewed strided view), giving ``g[h, Δ] = Σ_{b, i - j = Δ} ∂L/∂score``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Query rows per block. 256 keeps the matmuls efficient while the band stays O(H·256·N).
BLOCK_M = 256
# Scores per matmul batch: about 4 MiB of fp32, so a block's scores stay in the L2/L3 cache
# between the matmul, the softmax and the product with v.
_SCORES_PER_STEP = 1 << 20

_NEG_INF = float("-inf")
# Above this |lse| a float32 lse is off by more than ~1e-6 relative and backward renormalizes.
_LSE_EXACT = 16.0


def unsupported(q: Tensor, k: Tensor) -> str | None:
    """None: pure PyTorch runs on any device and floating dtype."""
    return None


# ----------------------------------------------------------------------------- the plan


@dataclass
class _Block:
    r0: int  # first query row
    m: int  # rows in this block
    c0: int  # first key any row may see (before per-batch document narrowing)
    c1: int  # one past the last such key
    maybe_empty: bool  # some row may see no key at all


@dataclass
class _Plan:
    blocks: list[_Block]
    e_min: int  # smallest offset any computed block touches
    e_max: int  # largest
    doc_start: list[list[int]] | None  # per batch, per key position: start of its document
    doc_end: list[list[int]] | None  # one past its end
    pad_prefix: list[list[int]] | None  # per batch: number of padded keys before position c


def _key_range(pos_lo: int, pos_hi: int, nk: int, causal: bool, window: int) -> tuple[int, int]:
    """Keys ``[c0, c1)`` visible (by Δ rules alone) to some query at positions pos_lo..pos_hi."""
    c0 = max(0, pos_lo - window + 1) if window > 0 else 0
    if causal:
        c1 = pos_hi + 1
    elif window > 0:
        c1 = pos_hi + window
    else:
        c1 = nk
    return c0, min(max(c1, 0), nk)


def _plan(
    nq: int,
    nk: int,
    causal: bool,
    q_offset: int,
    window: int,
    doc_ids: Tensor | None,
    key_padding_mask: Tensor | None,
) -> _Plan:
    blocks = []
    e_min, e_max = None, None
    for r0 in range(0, nq, BLOCK_M):
        m = min(BLOCK_M, nq - r0)
        c0, c1 = _key_range(q_offset + r0, q_offset + r0 + m - 1, nk, causal, window)
        if c1 <= c0:
            continue  # every row of the block sees no key: out 0, lse -inf
        # Each row's visible interval moves monotonically with its position, so only the
        # first and last rows of a block can be empty.
        first = _key_range(q_offset + r0, q_offset + r0, nk, causal, window)
        last = _key_range(q_offset + r0 + m - 1, q_offset + r0 + m - 1, nk, causal, window)
        maybe_empty = first[1] <= first[0] or last[1] <= last[0] or key_padding_mask is not None
        blocks.append(_Block(r0, m, c0, c1, maybe_empty))
        lo_b, hi_b = q_offset + r0 - (c1 - 1), q_offset + r0 + m - 1 - c0
        e_min = lo_b if e_min is None else min(e_min, lo_b)
        e_max = hi_b if e_max is None else max(e_max, hi_b)
    doc_start = doc_end = pad_prefix = None
    if doc_ids is not None and blocks:
        pos = torch.arange(nk, device=doc_ids.device).expand_as(doc_ids)
        new = torch.ones_like(doc_ids, dtype=torch.bool)
        new[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        start = torch.where(new, pos, 0).cummax(dim=1).values
        ends = torch.ones_like(new)
        ends[:, :-1] = new[:, 1:]
        end = torch.where(ends, pos + 1, nk).flip(1).cummin(dim=1).values.flip(1)
        doc_start, doc_end = start.tolist(), end.tolist()
    if key_padding_mask is not None and blocks:
        pad = (~key_padding_mask).to(torch.int64).cumsum(dim=1)
        pad_prefix = torch.nn.functional.pad(pad, (1, 0)).tolist()
    return _Plan(blocks, e_min or 0, e_max or 0, doc_start, doc_end, pad_prefix)


def _batch_range(plan: _Plan, blk: _Block, b: int, q_offset: int) -> tuple[int, int, bool]:
    """Keys ``[c0, c1)`` of a block for batch b, and whether an extra mask step is needed."""
    c0, c1 = blk.c0, blk.c1
    need_mask = False
    if plan.doc_start is not None:
        p_first, p_last = q_offset + blk.r0, q_offset + blk.r0 + blk.m - 1
        c0 = max(c0, plan.doc_start[b][p_first])
        c1 = min(c1, plan.doc_end[b][p_last])
        need_mask = plan.doc_start[b][p_first] != plan.doc_start[b][p_last]
    if plan.pad_prefix is not None and c1 > c0:
        need_mask = need_mask or plan.pad_prefix[b][c1] != plan.pad_prefix[b][c0]
    return c0, c1, need_mask


def _band(
    plan: _Plan,
    table: Tensor | None,
    slopes: Tensor | None,
    lo: int,
    causal: bool,
    window: int,
    hq: int,
    rows: int,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """``band[h, r, r + j] = E[h, e_max - j]``: shape ``(Hq, rows, n_e + rows - 1)``."""
    n_e = plan.e_max - plan.e_min + 1
    delta = torch.arange(plan.e_max, plan.e_min - 1, -1, device=device)  # column j -> Δ
    visible = torch.ones_like(delta, dtype=torch.bool)
    if causal:
        visible &= delta >= 0
    if window > 0:
        visible &= delta < window
        if not causal:
            visible &= delta > -window
    if table is not None:
        col = delta - lo
        visible &= (col >= 0) & (col < table.shape[1])
        ext = table.to(dtype)[:, col.clamp(0, table.shape[1] - 1)]
    elif slopes is not None:
        ext = -slopes.to(dtype)[:, None] * delta.abs().to(dtype)[None, :]
    else:
        ext = torch.zeros(hq, n_e, dtype=dtype, device=device)
    ext = ext.masked_fill(~visible, _NEG_INF)
    band = torch.empty(hq, rows, n_e + rows - 1, dtype=dtype, device=device)
    _skew(band, n_e).copy_(ext[:, None, :].expand(hq, rows, n_e))
    return band


def _skew(band: Tensor, n_e: int) -> Tensor:
    """The view ``s[h, r, j] = band[h, r, r + j]``: column j of s is the offset ``e_max - j``."""
    h, rows, width = band.shape
    return band.as_strided((h, rows, n_e), (rows * width, width + 1, 1))


def _head_step(hkv: int, group: int, m: int, keys: int) -> int:
    """How many kv heads to score in one batched matmul."""
    return max(1, min(hkv, _SCORES_PER_STEP // max(1, group * m * keys)))


def _extra_mask(
    doc_ids: Tensor | None,
    key_padding_mask: Tensor | None,
    b: int,
    q_offset: int,
    blk: _Block,
    c0: int,
    c1: int,
) -> Tensor:
    """``(m, c1 - c0)`` bool, True where doc_ids / key_padding_mask hide the key."""
    hidden = None
    if doc_ids is not None:
        p = q_offset + blk.r0
        hidden = doc_ids[b, p : p + blk.m, None] != doc_ids[b, None, c0:c1]
    if key_padding_mask is not None:
        pad = ~key_padding_mask[b, None, c0:c1]
        hidden = pad if hidden is None else hidden | pad
    return hidden


def _check(q: Tensor, k: Tensor, table: Tensor | None, slopes: Tensor | None) -> None:
    hq = q.shape[1]
    if table is not None and slopes is not None:
        raise ValueError("table and slopes must not both be given")
    if table is not None and (table.dim() != 2 or table.shape[0] != hq):
        raise ValueError(f"table must have shape (Hq={hq}, T); got {tuple(table.shape)}")
    if slopes is not None and tuple(slopes.shape) != (hq,):
        raise ValueError(f"slopes must have shape (Hq={hq},); got {tuple(slopes.shape)}")
    if hq % k.shape[1]:
        raise ValueError(f"q's heads Hq={hq} must be a multiple of k's Hkv={k.shape[1]}")


# ----------------------------------------------------------------------------- forward


def forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    table: Tensor | None,
    slopes: Tensor | None,
    doc_ids: Tensor | None,
    key_padding_mask: Tensor | None,
    lo: int,
    scale: float,
    causal: bool,
    q_offset: int,
    window: int,
) -> tuple[Tensor, Tensor]:
    """Returns ``(out (B, Hq, Nq, D) in q's dtype, lse (B, Hq, Nq) float32)``.

    q: ``(B, Hq, Nq, D)``; k, v: ``(B, Hkv, Nk, D)``; table ``(Hq, T)`` or slopes ``(Hq,)``.
    """
    _check(q, k, table, slopes)
    bsz, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    compute = torch.promote_types(q.dtype, torch.float32)
    plan = _plan(nq, nk, causal, q_offset, window, doc_ids, key_padding_mask)
    out = torch.zeros(bsz, hq, nq, d, dtype=compute, device=q.device)
    lse = torch.full((bsz, hq, nq), _NEG_INF, dtype=torch.float32, device=q.device)
    if not plan.blocks:
        return out.to(q.dtype), lse
    rows = max(blk.m for blk in plan.blocks)
    band = _band(plan, table, slopes, lo, causal, window, hq, rows, compute, q.device)
    qs = (q.to(compute) * scale).view(bsz, hkv, group, nq, d)  # scale folded into q once
    kc, vc = k.to(compute), v.to(compute)
    lse_c = lse.view(bsz, hkv, group, nq)
    out_g = out.view(bsz, hkv, group, nq, d)
    in_place_softmax = q.device.type == "cpu"
    for b in range(bsz):
        for blk in plan.blocks:
            c0, c1, need_mask = _batch_range(plan, blk, b, q_offset)
            if c1 <= c0:
                continue
            m, rs, keys = blk.m, slice(blk.r0, blk.r0 + blk.m), c1 - c0
            u0 = plan.e_max - q_offset - blk.r0 + c0
            hidden = None
            if need_mask:
                hidden = _extra_mask(doc_ids, key_padding_mask, b, q_offset, blk, c0, c1)
            step = _head_step(hkv, group, m, keys)
            for h0 in range(0, hkv, step):
                h1 = min(hkv, h0 + step)
                hs = h1 - h0
                bias = band[h0 * group : h1 * group, :m, u0 : u0 + keys]
                bias = bias.reshape(hs, group * m, keys)
                qb = qs[b, h0:h1, :, rs].reshape(hs, group * m, d)
                s = torch.baddbmm(bias, qb, kc[b, h0:h1, c0:c1].transpose(1, 2))
                if hidden is not None:
                    s.view(hs, group, m, keys).masked_fill_(hidden, _NEG_INF)
                row_max, arg = s.max(dim=-1)
                if in_place_softmax:
                    torch.ops.aten._softmax.out(s, -1, False, out=s)
                else:
                    s = torch.softmax(s, dim=-1)
                # softmax at the argmax is exp(0)/Σ = 1/Σ, so lse = max + log Σ needs no
                # extra pass over the scores.
                p_max = s.gather(-1, arg[..., None]).squeeze(-1)
                block_lse = row_max - p_max.log()
                if blk.maybe_empty:
                    empty = row_max == _NEG_INF
                    s.masked_fill_(empty[..., None], 0.0)
                    block_lse.masked_fill_(empty, _NEG_INF)
                o = torch.bmm(s, vc[b, h0:h1, c0:c1])
                out_g[b, h0:h1, :, rs] = o.view(hs, group, m, d)
                lse_c[b, h0:h1, :, rs] = block_lse.view(hs, group, m).to(torch.float32)
    return out.to(q.dtype), lse


# ----------------------------------------------------------------------------- backward


def backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    table: Tensor | None,
    slopes: Tensor | None,
    doc_ids: Tensor | None,
    key_padding_mask: Tensor | None,
    lo: int,
    scale: float,
    causal: bool,
    q_offset: int,
    window: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Returns ``(dq, dk, dv, dtable)`` shaped like q, k, v and table (None without a table).

    The probabilities are recomputed block by block from ``lse``; nothing N×N is stored.
    """
    _check(q, k, table, slopes)
    bsz, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    compute = torch.promote_types(q.dtype, torch.float32)
    plan = _plan(nq, nk, causal, q_offset, window, doc_ids, key_padding_mask)
    dq = torch.zeros(bsz, hq, nq, d, dtype=compute, device=q.device)
    dk = torch.zeros(bsz, hkv, nk, d, dtype=compute, device=q.device)
    dv = torch.zeros(bsz, hkv, nk, d, dtype=compute, device=q.device)
    dtable = None
    if table is not None:
        dtable = torch.zeros(table.shape, dtype=compute, device=q.device)
    if not plan.blocks:
        return _finish(dq, dk, dv, dtable, q, table)
    rows = max(blk.m for blk in plan.blocks)
    band = _band(plan, table, slopes, lo, causal, window, hq, rows, compute, q.device)
    gband = torch.zeros_like(band) if table is not None else None
    qs = (q.to(compute) * scale).view(bsz, hkv, group, nq, d)
    kc, vc = k.to(compute), v.to(compute)
    do = grad_out.to(compute).view(bsz, hkv, group, nq, d)
    # D_i = Σ_d dO·O: the softmax backward's row term. Empty rows (lse = -inf) get
    # lse = +inf so that exp(s - lse) is exactly 0 there.
    delta = (grad_out.to(compute) * out.to(compute)).sum(-1).view(bsz, hkv, group, nq)
    lse_c = lse.to(compute).masked_fill(lse == _NEG_INF, float("inf"))
    lse_c = lse_c.view(bsz, hkv, group, nq)
    dq_g = dq.view(bsz, hkv, group, nq, d)
    # lse is float32 by contract, so exp(s - lse) carries lse's rounding (|lse|·2^-24) as a
    # per-row scale error. Where that matters (float64, or rows of very large scores) the
    # rows are renormalized exactly.
    finite = lse[lse.isfinite()]
    renormalize = compute == torch.float64 or (
        finite.numel() > 0 and finite.abs().max().item() > _LSE_EXACT
    )
    for b in range(bsz):
        for blk in plan.blocks:
            c0, c1, need_mask = _batch_range(plan, blk, b, q_offset)
            if c1 <= c0:
                continue
            m, rs, keys = blk.m, slice(blk.r0, blk.r0 + blk.m), c1 - c0
            u0 = plan.e_max - q_offset - blk.r0 + c0
            hidden = None
            if need_mask:
                hidden = _extra_mask(doc_ids, key_padding_mask, b, q_offset, blk, c0, c1)
            step = _head_step(hkv, group, m, keys)
            for h0 in range(0, hkv, step):
                h1 = min(hkv, h0 + step)
                hs = h1 - h0
                bias = band[h0 * group : h1 * group, :m, u0 : u0 + keys]
                bias = bias.reshape(hs, group * m, keys)
                qb = qs[b, h0:h1, :, rs].reshape(hs, group * m, d)
                kb, vb = kc[b, h0:h1, c0:c1], vc[b, h0:h1, c0:c1]
                dob = do[b, h0:h1, :, rs].reshape(hs, group * m, d)
                p = torch.baddbmm(bias, qb, kb.transpose(1, 2))
                if hidden is not None:
                    p.view(hs, group, m, keys).masked_fill_(hidden, _NEG_INF)
                p.sub_(lse_c[b, h0:h1, :, rs].reshape(hs, group * m, 1)).exp_()
                row_delta = delta[b, h0:h1, :, rs].reshape(hs, group * m, 1)
                if renormalize:
                    # Scaling dO and D by 1/Σ_j p is the same as rescaling each row of p to
                    # sum to 1, at O(M·D) instead of O(M·N) cost.
                    total = p.sum(dim=-1, keepdim=True)
                    inv = total.masked_fill_(total == 0, 1.0).reciprocal_()
                    dob, row_delta = dob * inv, row_delta * inv
                ds = torch.bmm(dob, vb.transpose(1, 2))
                ds.sub_(row_delta).mul_(p)
                dv[b, h0:h1, c0:c1].baddbmm_(p.transpose(1, 2), dob)
                dk[b, h0:h1, c0:c1].baddbmm_(ds.transpose(1, 2), qb)
                dq_g[b, h0:h1, :, rs] = torch.bmm(ds, kb).view(hs, group, m, d)
                if gband is not None:
                    gband[h0 * group : h1 * group, :m, u0 : u0 + keys] += ds.view(
                        hs * group, m, keys
                    )
    dq.mul_(scale)
    if gband is not None:
        n_e = plan.e_max - plan.e_min + 1
        g = _skew(gband, n_e).sum(dim=1).flip(-1)  # column i is the offset e_min + i
        a, z = max(lo, plan.e_min), min(lo + table.shape[1] - 1, plan.e_max)
        if a <= z:
            dtable[:, a - lo : z - lo + 1] = g[:, a - plan.e_min : z - plan.e_min + 1]
    return _finish(dq, dk, dv, dtable, q, table)


def _finish(dq, dk, dv, dtable, q, table):
    dtable = dtable.to(table.dtype) if dtable is not None else None
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype), dtable
