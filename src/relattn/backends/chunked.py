"""Exact attention block by block in plain PyTorch: the memory-light CPU backend.

A block of up to ``BLOCK_M`` query rows is scored against every key it can see in one matmul
(``scale·q·kᵀ + bias``), so no online softmax is needed and no N×N tensor ever exists: the live
scores are ``O(H·BLOCK_M·N)``. Keys that no row of a block can see (above the causal diagonal,
outside the window, in another document) are never computed.

The bias is read straight from the table, without a gather. Extend the table over every offset
a block touches into ``F[h, x] = PE(Δ = e_max - x)``, with ``-inf`` for offsets that causality or
the window hide (so those masks cost nothing). A block's rows are processed in *reverse* order:
reversed row ``r'`` against key ``c`` then reads ``F[h, base + r' + c]``, so the block's bias is
the overlapping strided view ``F.as_strided((m, L), (1, 1))`` (a Toeplitz matrix costs no
memory). In the backward pass the same skew sends ``dS[r', c]`` to table column
``base + r' + c``, so a block's share of ``g[h, Δ] = Σ_{b, i - j = Δ} ∂L/∂score`` is the sums of
the anti-diagonals of its ``dS``, which are strided views of it (no scatter, no N-wide buffer).

The terms that depend on the tokens (``call.token``, see :mod:`relattn.backends.base`) use the
same skew. A block's reversed row ``r'`` against key ``kb0 + c`` has offset ``Δ = Δmax - (r' + c)``,
so the banded bias ``Σ_c r[i, c]·P[c, Δ]`` of the block's keys ``[kb0, kb1)`` that the band can
reach is ``RP[r', r' + c]`` with ``RP = r_block (m, R) @ P[:, Δmax, Δmax - 1, …]`` ``(m, R, X)``,
``X = m + kb1 - kb0 - 1``: one small matmul per block, read as the sheared strided view
``RP.as_strided((m, L), (X + 1, 1))``. P is kept reversed along Δ and zero-padded on both sides
(``_Token.ext``), so the columns a block needs are one slice, zero outside ``0 <= Δ < W``. The
backward pass writes dS into the same sheared view of a zeroed ``G (m, X)`` ("unshears" it), then
``dr = G·Pᵀ`` and ``dP += r_blockᵀ·G``. The forget gate ``±(fq_i - fk_j)`` is written with the
bias (its sign read through a Toeplitz view of the offsets' signs where a block has visible keys
after its queries); its gradients are signed row and column sums of dS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._machine import SCHEDULE
from ..masks import doc_bounds, key_span, offset_visible
from ..problem import Problem
from .base import Backend, Call, Layout, TokenTerms

# Query rows per block (live scores stay O(H·BLOCK_M·N)) and scores per batched matmul (so a
# step's scores stay in cache between the matmul, the softmax and the product with v): both
# from the machine's caches, read at import; the measurements are in relattn._machine.
BLOCK_M = SCHEDULE.block_m
_SCORES_PER_STEP = SCHEDULE.scores_per_step
_SCORES_PER_STEP_L2 = SCHEDULE.scores_per_step_l2

_NEG_INF = float("-inf")


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
        c0, c1 = key_span(q_offset + r0, q_offset + r0 + m - 1, nk, causal, window)
        if c1 <= c0:
            continue  # every row of the block sees no key: out 0, lse -inf
        # Each row's visible interval moves monotonically with its position, so only the
        # first and last rows of a block can be empty.
        first = key_span(q_offset + r0, q_offset + r0, nk, causal, window)
        last = key_span(q_offset + r0 + m - 1, q_offset + r0 + m - 1, nk, causal, window)
        maybe_empty = first[1] <= first[0] or last[1] <= last[0] or key_padding_mask is not None
        blocks.append(_Block(r0, m, c0, c1, maybe_empty))
        lo_b, hi_b = q_offset + r0 - (c1 - 1), q_offset + r0 + m - 1 - c0
        e_min = lo_b if e_min is None else min(e_min, lo_b)
        e_max = hi_b if e_max is None else max(e_max, hi_b)
    doc_start = doc_end = pad_prefix = None
    if doc_ids is not None and blocks:
        start, end = doc_bounds(doc_ids)
        doc_start, doc_end = start.tolist(), end.tolist()
    if key_padding_mask is not None and blocks:
        pad = (~key_padding_mask).to(torch.int64).cumsum(dim=1)
        pad_prefix = torch.nn.functional.pad(pad, (1, 0)).tolist()
    return _Plan(blocks, e_min or 0, e_max or 0, doc_start, doc_end, pad_prefix)


def _batch_range(plan: _Plan, blk: _Block, b: int, q_offset: int) -> tuple[int, int, bool]:
    """Keys ``[c0, c1)`` of a block for batch b, and whether an extra mask step is needed."""
    c0, c1 = blk.c0, blk.c1
    need_mask = False
    if plan.doc_start is not None and plan.doc_end is not None:  # set together
        p_first, p_last = q_offset + blk.r0, q_offset + blk.r0 + blk.m - 1
        c0 = max(c0, plan.doc_start[b][p_first])
        c1 = min(c1, plan.doc_end[b][p_last])
        need_mask = plan.doc_start[b][p_first] != plan.doc_start[b][p_last]
    if plan.pad_prefix is not None and c1 > c0:
        need_mask = need_mask or plan.pad_prefix[b][c1] != plan.pad_prefix[b][c0]
    return c0, c1, need_mask


def _offset_terms(
    plan: _Plan,
    table: Tensor | None,
    slopes: Tensor | None,
    lo: int,
    causal: bool,
    window: int,
    hq: int,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """``F[h, x] = PE_h(Δ = e_max - x)``, ``-inf`` where Δ is hidden: shape ``(Hq, n_e)``."""
    delta = torch.arange(plan.e_max, plan.e_min - 1, -1, device=device)
    visible = offset_visible(delta, causal, window)
    if table is not None:
        col = delta - lo
        visible &= (col >= 0) & (col < table.shape[1])
        ext = table.to(dtype)[:, col.clamp(0, table.shape[1] - 1)]
    elif slopes is not None:
        ext = -slopes.to(dtype)[:, None] * delta.abs().to(dtype)[None, :]
    else:
        ext = torch.zeros(hq, delta.numel(), dtype=dtype, device=device)
    return ext.masked_fill(~visible, _NEG_INF).contiguous()


def _toeplitz(terms: Tensor, heads: slice, m: int, keys: int, base: int) -> Tensor:
    """The view ``t[h, r', c] = terms[h, base + r' + c]`` of shape ``(heads, m, keys)``."""
    rows = terms[heads]
    return rows.as_strided(
        (rows.shape[0], m, keys), (rows.stride(0), 1, 1), rows.storage_offset() + base
    )


def _head_step(hkv: int, group: int, m: int, keys: int) -> int:
    """How many kv heads to score in one batched matmul."""
    per_head = max(1, group * m * keys)
    small = 4 * per_head <= _SCORES_PER_STEP_L2  # several heads' blocks fit in the L2
    budget = _SCORES_PER_STEP_L2 if small else _SCORES_PER_STEP
    return max(1, min(hkv, budget // per_head))


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
    assert hidden is not None, "called only where doc_ids or key_padding_mask hides a key"
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


def _workspace(plan: _Plan, hkv: int, group: int, dtype, device) -> Tensor:
    """One flat buffer for a block's scores, reused by every block: fresh multi-MiB
    allocations would fault their pages in again on every block."""
    most = 0
    for blk in plan.blocks:
        keys = blk.c1 - blk.c0
        most = max(most, _head_step(hkv, group, blk.m, keys) * group * blk.m * keys)
    return torch.empty(most, dtype=dtype, device=device)


def _probabilities(
    work: Tensor,
    terms: Tensor,
    base: int,
    qb: Tensor,
    kt: Tensor,
    hidden: Tensor | None,
    group: int,
    h0: int,
    m: int,
    with_max: bool = True,
    token: _Token | None = None,
    at: tuple[int, int, int, int] = (0, 0, 0, 0),
) -> tuple[Tensor, Tensor | None]:
    """Softmax over the keys of one block (rows reversed), in place in ``work``.

    Args:
        qb: ``(hs, G·m, D)`` scaled queries, rows reversed; kt: ``(hs, D, L)`` keys transposed.
        hidden: ``(m, L)`` bool in reversed row order: extra keys to hide, or None.
        token: the call's token terms, added to the scores, or None.
        at: ``(b, r0, c0, base)`` of the block, where ``token`` reads its rows and keys.

    Returns:
        ``p (hs, G·m, L)`` and the row maxima of the scores ``(hs, G·m, 1)`` (None unless
        ``with_max``); rows that see no key have max ``-inf`` and NaN in p, which the caller
        clears.
    """
    hs, keys = kt.shape[0], kt.shape[-1]
    s = work[: hs * group * m * keys].view(hs, group * m, keys)
    bias = _toeplitz(terms, slice(h0 * group, (h0 + hs) * group), m, keys, base)
    if token is None:
        s.view(hs, group, m, keys).copy_(bias.view(hs, group, m, keys))
        s.baddbmm_(qb, kt)
    else:
        b, r0, c0, _ = at
        token.fill(s.view(hs, group, m, keys), bias.view(hs, group, m, keys), b, h0, r0, c0, base)
        s.baddbmm_(qb, kt)
        token.add_band(s.view(hs * group, m, keys), b, h0, r0, c0)
    if hidden is not None:
        s.view(hs, group, m, keys).masked_fill_(hidden, _NEG_INF)
    row_max = s.amax(dim=-1, keepdim=True) if with_max else None
    if s.device.type == "cpu":
        torch.ops.aten._softmax.out(s, -1, False, out=s)  # row-wise kernel: safe in place
    else:
        s = torch.softmax(s, dim=-1)
    return s, row_max


def _steps(plan, bsz, hkv, group, q_offset, doc_ids, key_padding_mask):
    """Every (batch, query block, kv-head range) a pass visits, as
    ``(b, blk, c0, c1, base, hidden, h0, h1)``: keys ``[c0, c1)``, the Toeplitz view's first
    column ``base``, the extra doc/padding mask in reversed row order (or None), and kv heads
    ``[h0, h1)`` scored in one batched matmul."""
    for b in range(bsz):
        for blk in plan.blocks:
            c0, c1, need_mask = _batch_range(plan, blk, b, q_offset)
            if c1 <= c0:
                continue
            base = plan.e_max - q_offset - blk.r0 - blk.m + 1 + c0
            hidden = None
            if need_mask:
                hidden = _extra_mask(doc_ids, key_padding_mask, b, q_offset, blk, c0, c1).flip(0)
            step = _head_step(hkv, group, blk.m, c1 - c0)
            for h0 in range(0, hkv, step):
                yield b, blk, c0, c1, base, hidden, h0, min(hkv, h0 + step)


def _reversed_rows(x: Tensor, b: int, h0: int, h1: int, rs: slice) -> Tensor:
    """``x[b, h0:h1, :, rs]`` (kv head, group, row, ...) with rows reversed, as (hs, G·m, ...)."""
    block = x[b, h0:h1, :, rs].flip(2)
    return block.reshape(block.shape[0], -1, *block.shape[3:])


def _unpack(p: Problem):
    return p.lo, p.scale, p.causal, p.q_offset, p.window, p.doc_ids, p.key_padding_mask


def _layout(q: Tensor, k: Tensor, p: Problem):
    """``((B, Hq, Nq, D), (Hkv, Nk), group, compute dtype, block plan)`` of one call."""
    hq, hkv = q.shape[1], k.shape[1]
    plan = _plan(q.shape[2], k.shape[2], p.causal, p.q_offset, p.window, p.doc_ids,
                 p.key_padding_mask)  # fmt: skip
    compute = torch.promote_types(q.dtype, torch.float32)
    return tuple(q.shape), (hkv, k.shape[2]), hq // hkv, compute, plan


def _stat_dtype(q: Tensor) -> torch.dtype:
    """Softmax statistics hold the input's range: float64 for float64, else float32."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _foldable(q: Tensor, problem: Problem) -> bool:
    """Whether every batch row has the same plan (no doc_ids or padding that narrow or mask
    keys per row), so the batch can fold into the heads: one batched op then covers
    ``B·H`` heads, where a loop over the batch would run B times as many small ops (each
    waking torch's thread pool, which on busy cores waits for a descheduled thread)."""
    return q.shape[0] > 1 and problem.doc_ids is None and problem.key_padding_mask is None


def _fold(
    q: Tensor, k: Tensor, v: Tensor, table: Tensor | None, slopes: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """``(q, k, v, table, slopes)`` with the batch folded into the heads: ``(1, B·H, N, D)``,
    the table and slopes repeated per batch row (query head ``b·Hq + h`` still reads kv head
    ``(b·Hq + h) // G = b·Hkv + h // G``)."""
    b = q.shape[0]
    q, k, v = (x.reshape(1, b * x.shape[1], *x.shape[2:]) for x in (q, k, v))
    table = table.repeat(b, 1) if table is not None else None
    slopes = slopes.repeat(b) if slopes is not None else None
    return q, k, v, table, slopes


# ----------------------------------------------------------------------------- token terms


class _Token:
    """The terms that depend on the tokens (``call.token``) of one call, laid out for the
    blocks, and (when ``grads``) their gradients accumulated block by block.

    Per query head (GQA: query head ``h·G + g`` reads kv head ``h``) the tensors are viewed as
    ``(B, Hkv, G, N, …)``, so a step over kv heads ``[h0, h1)`` reads its rows as the scores
    have them. The band's ``P (Hw, R, W)`` is kept as ``ext (Hw, R, W + 2·pad)``: reversed along
    Δ and zero-padded by ``pad`` (the largest block's rows - 1) on each side, column ``y`` holding
    ``Δ = W - 1 + pad - y``, so the offsets of any block's band are one slice of it.
    """

    def __init__(
        self,
        token: TokenTerms,
        plan: _Plan,
        shape: tuple[int, int, int, int],
        hkv: int,
        nk: int,
        problem: Problem,
        compute: torch.dtype,
        device: torch.device,
        grads: bool,
    ) -> None:
        r, weight, fq, fk = token
        bsz, hq, nq, _ = shape
        self.token, self.group, self.q_offset = token, hq // hkv, problem.q_offset
        self.r = self.ext = self.fq = self.fk = self.sign = None
        self.dr = self.dext = self.dfq = self.dfk = None
        self.width = self.pad = 0
        self.shared = False
        if r is not None and weight is not None:
            hw, rank, width = weight.shape
            self.width, self.shared = width, hw == 1
            self.pad = max((blk.m for blk in plan.blocks), default=1) - 1
            self.r = r.to(compute).view(bsz, hkv, self.group, nq, rank)
            self.ext = torch.zeros(hw, rank, width + 2 * self.pad, dtype=compute, device=device)
            self.ext[:, :, self.pad : self.pad + width] = weight.to(compute).flip(-1)
            if grads:
                self.dr = torch.zeros(bsz, hkv, self.group, nq, rank, dtype=compute, device=device)
                self.dext = torch.zeros_like(self.ext)
        if fq is not None and fk is not None:
            self.fq = fq.to(compute).view(bsz, hkv, self.group, nq)
            self.fk = fk.to(compute).view(bsz, hkv, self.group, nk)
            if not problem.causal:
                # sign[x] for Δ = e_max - x, the columns of _offset_terms: +1 for Δ >= 0, else -1
                delta = torch.arange(plan.e_max, plan.e_min - 1, -1, device=device)
                self.sign = torch.where(delta >= 0, 1.0, -1.0).to(compute)
            if grads:
                self.dfq = torch.zeros_like(self.fq)
                self.dfk = torch.zeros_like(self.fk)

    # --- the forget gate

    def _signed(self, r0: int, keys_end: int) -> bool:
        """Whether a block (first row ``r0``, keys before ``keys_end``) has visible pairs with
        Δ < 0 (keys after a query: bidirectional calls only), where the gate changes sign."""
        return self.sign is not None and self.q_offset + r0 < keys_end - 1

    def _sign_view(self, m: int, keys: int, base: int) -> Tensor:
        """``(m, keys)``: ±1 for reversed row r' against key c (the Toeplitz view of sign)."""
        assert self.sign is not None
        return self.sign.as_strided((m, keys), (1, 1), self.sign.storage_offset() + base)

    def fill(self, s4: Tensor, bias4: Tensor, b: int, h0: int, r0: int, c0: int, base: int) -> None:
        """``s4 (hs, G, m, L) ← bias4 + gate``, rows reversed (without a gate: the bias)."""
        if self.fq is None or self.fk is None:
            s4.copy_(bias4)
            return
        hs, _, m, keys = s4.shape
        fq = self.fq[b, h0 : h0 + hs, :, r0 : r0 + m].flip(-1)[..., None]  # (hs, G, m, 1)
        fk = self.fk[b, h0 : h0 + hs, :, None, c0 : c0 + keys]  # (hs, G, 1, L)
        torch.sub(fq, fk, out=s4)  # F_i - F_j first: exact where they are close
        if self._signed(r0, c0 + keys):
            s4.mul_(self._sign_view(m, keys, base))
        s4.add_(bias4)

    # --- the banded bias

    def _band(self, r0: int, m: int, c0: int, keys: int) -> tuple[int, int, int, int] | None:
        """``(a, z, y0, x)`` of a block's band: the block's key columns ``[a, z)`` that some
        row's offset ``0 <= Δ < W`` reaches, and the slice ``ext[..., y0 : y0 + x]`` of the
        ``x = m + z - a - 1`` offsets they span (from the largest down); None if none."""
        p_first = self.q_offset + r0
        kb0 = max(c0, p_first - self.width + 1)
        kb1 = min(c0 + keys, p_first + m)
        if kb1 <= kb0:
            return None
        delta_max = p_first + m - 1 - kb0
        return kb0 - c0, kb1 - c0, self.width - 1 + self.pad - delta_max, m + kb1 - kb0 - 1

    def _rows(self, b: int, h0: int, hs: int, r0: int, m: int) -> Tensor:
        """``(hs·G, m, R)``: r of the step's query heads, rows reversed."""
        assert self.r is not None
        return _reversed_rows(self.r, b, h0, h0 + hs, slice(r0, r0 + m)).view(
            hs * self.group, m, -1
        )

    def add_band(self, s3: Tensor, b: int, h0: int, r0: int, c0: int) -> None:
        """``s3 (hs·G, m, L) += band``, rows reversed: ``RP = r_block @ P[:, Δ…]`` read sheared."""
        if self.r is None or self.ext is None:
            return
        n, m, keys = s3.shape
        span = self._band(r0, m, c0, keys)
        if span is None:
            return
        a, z, y0, x = span
        rb = self._rows(b, h0, n // self.group, r0, m)
        p_slice = self.ext[:, :, y0 : y0 + x]  # (Hw, R, x): column t holds Δ = Δmax - t
        if self.shared:
            rp = torch.mm(rb.view(n * m, -1), p_slice[0]).view(n, m, x)
        else:
            rp = torch.bmm(rb, p_slice[h0 * self.group : h0 * self.group + n])
        # reversed row r' against band key c has Δ = Δmax - (r' + c): RP[r', r' + c]
        s3[:, :, a:z].add_(rp.as_strided((n, m, z - a), (m * x, x + 1, 1)))

    # --- gradients

    def backward(self, ds: Tensor, b: int, h0: int, r0: int, c0: int, base: int) -> None:
        """Accumulate dr, dP, dfq, dfk from one block's ``ds (hs, G·m, L)`` (rows reversed)."""
        hs, gm, keys = ds.shape
        m = gm // self.group
        rs = slice(r0, r0 + m)
        if self.dfq is not None and self.dfk is not None:
            ds4 = ds.view(hs, self.group, m, keys)
            dfk = self.dfk[b, h0 : h0 + hs, :, c0 : c0 + keys]
            if self._signed(r0, c0 + keys):
                signed = ds4 * self._sign_view(m, keys, base)
                self.dfq[b, h0 : h0 + hs, :, rs] = signed.sum(-1).flip(-1)
                dfk.sub_(signed.sum(2))
            else:
                # Every visible pair has Δ >= 0, so fq_i adds the same to a whole row and
                # dfq_i = Σ_j dS_ij = 0 exactly (a softmax row's dS sums to 0): left at 0.
                dfk.sub_(ds4.sum(2))
        if self.dr is not None and self.dext is not None and self.ext is not None:
            span = self._band(r0, m, c0, keys)
            if span is None:
                return
            a, z, y0, x = span
            n = hs * self.group
            rb = self._rows(b, h0, hs, r0, m)
            # unshear: G[r', r' + c] = dS[r', c] on the band's keys, 0 elsewhere
            g = ds.new_zeros(n, m, x)
            g.as_strided((n, m, z - a), (m * x, x + 1, 1)).copy_(ds.view(n, m, keys)[:, :, a:z])
            p_slice = self.ext[:, :, y0 : y0 + x]
            if self.shared:
                g2 = g.view(n * m, x)
                drb = torch.mm(g2, p_slice[0].t())
                self.dext[0, :, y0 : y0 + x].addmm_(rb.view(n * m, -1).t(), g2)
            else:
                heads = slice(h0 * self.group, h0 * self.group + n)
                drb = torch.bmm(g, p_slice[heads].transpose(1, 2))
                self.dext[heads, :, y0 : y0 + x].baddbmm_(rb.transpose(1, 2), g)
            self.dr[b, h0 : h0 + hs, :, rs] = drb.view(hs, self.group, m, -1).flip(2)

    def gradients(self) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        """``(dr, dweight, dfq, dfk)``, each in its tensor's dtype (None for absent terms)."""
        r, weight, fq, fk = self.token
        dr = dweight = dfq = dfk = None
        if self.dr is not None and self.dext is not None:
            assert r is not None and weight is not None
            dr = self.dr.view(r.shape).to(r.dtype)
            dweight = self.dext[:, :, self.pad : self.pad + self.width].flip(-1).to(weight.dtype)
        if self.dfq is not None and self.dfk is not None:
            assert fq is not None and fk is not None
            dfq, dfk = self.dfq.view(fq.shape).to(fq.dtype), self.dfk.view(fk.shape).to(fk.dtype)
        return dr, dweight, dfq, dfk


def _fold_token(token: TokenTerms | None, b: int) -> TokenTerms | None:
    """``token`` for :func:`_fold`'s ``(1, B·Hq, …)`` heads: r, fq, fk reshaped, a per-head P
    repeated per batch row (a shared one as it is)."""
    if token is None:
        return None
    r, weight, fq, fk = token
    if r is not None:
        r = r.reshape(1, b * r.shape[1], *r.shape[2:])
    if weight is not None and weight.shape[0] != 1:
        weight = weight.repeat(b, 1, 1)
    if fq is not None and fk is not None:
        fq = fq.reshape(1, b * fq.shape[1], fq.shape[2])
        fk = fk.reshape(1, b * fk.shape[1], fk.shape[2])
    return TokenTerms(r, weight, fq, fk)


# ----------------------------------------------------------------------------- forward


def forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    table: Tensor | None,
    slopes: Tensor | None,
    problem: Problem,
    token: TokenTerms | None = None,
) -> tuple[Tensor, Tensor]:
    """Returns ``(out (B, Hq, Nq, D) in q's dtype, lse (B, Hq, Nq))``, lse in float32
    (float64 for float64 inputs).

    q: ``(B, Hq, Nq, D)``; k, v: ``(B, Hkv, Nk, D)``; table ``(Hq, T)`` or slopes ``(Hq,)``;
    token: the terms that depend on the tokens (:class:`~relattn.backends.base.TokenTerms`,
    in the compute dtype) or None.
    """
    _check(q, k, table, slopes)
    if _foldable(q, problem):
        b, hq, nq, d = q.shape
        out, lse = forward(*_fold(q, k, v, table, slopes), problem, _fold_token(token, b))
        return out.view(b, hq, nq, d), lse.view(b, hq, nq)
    lo, scale, causal, q_offset, window, doc_ids, key_padding_mask = _unpack(problem)
    (bsz, hq, nq, d), (hkv, nk), group, compute, plan = _layout(q, k, problem)
    out = torch.zeros(bsz, hq, nq, d, dtype=compute, device=q.device)
    lse = torch.full((bsz, hq, nq), _NEG_INF, dtype=_stat_dtype(q), device=q.device)
    if not plan.blocks:
        return out.to(q.dtype), lse
    terms = _offset_terms(plan, table, slopes, lo, causal, window, hq, compute, q.device)
    work = _workspace(plan, hkv, group, compute, q.device)
    tok = None
    if token is not None:
        tok = _Token(token, plan, (bsz, hq, nq, d), hkv, nk, problem, compute, q.device, False)
    qs = (q.to(compute) * scale).view(bsz, hkv, group, nq, d)  # scale folded into q once
    # kᵀ contiguous once: the score matmul runs much faster on it than on a transposed view.
    kt = k.to(compute).transpose(-1, -2).contiguous()
    vc = v.to(compute)
    lse_g = lse.view(bsz, hkv, group, nq)
    out_g = out.view(bsz, hkv, group, nq, d)
    steps = _steps(plan, bsz, hkv, group, q_offset, doc_ids, key_padding_mask)
    for b, blk, c0, c1, base, hidden, h0, h1 in steps:
        m, rs, hs = blk.m, slice(blk.r0, blk.r0 + blk.m), h1 - h0
        qb = _reversed_rows(qs, b, h0, h1, rs)
        p, row_max = _probabilities(
            work, terms, base, qb, kt[b, h0:h1, :, c0:c1], hidden, group, h0, m,
            token=tok, at=(b, blk.r0, c0, base),
        )  # fmt: skip
        assert row_max is not None  # with_max=True
        # p is exp(s - max)/Σ, so its largest entry is 1/Σ and lse = max + log Σ
        # costs one cheap reduction instead of another exp pass.
        block_lse = row_max - p.amax(dim=-1, keepdim=True).log()
        if blk.maybe_empty:
            empty = row_max == _NEG_INF
            p.masked_fill_(empty, 0.0)
            block_lse.masked_fill_(empty, _NEG_INF)
        o = torch.bmm(p, vc[b, h0:h1, c0:c1])
        out_g[b, h0:h1, :, rs] = o.view(hs, group, m, d).flip(2)
        lse_g[b, h0:h1, :, rs] = block_lse.view(hs, group, m).flip(2)
    return out.to(q.dtype), lse


# ----------------------------------------------------------------------------- backward


def backward(call: Call, grad_out: Tensor, out: Tensor, lse: Tensor) -> tuple:
    """Returns ``(dq, dk, dv, dtable)`` shaped like q, k, v and table (None without a table);
    with ``call.token``, followed by ``(dr, dweight, dfq, dfk)`` shaped like r ``(B, Hq, Nq,
    R)``, weight ``(Hw, R, W)``, fq ``(B, Hq, Nq)`` and fk ``(B, Hq, Nk)`` (None for absent
    ones), each in its tensor's dtype.

    The probabilities are recomputed block by block; nothing N×N is stored. They are
    recomputed with a fresh softmax rather than ``exp(s - lse)``: the same cost, and exactly
    normalized whatever the float32 rounding of lse (which matters for scores near ±1e4 and
    for float64 inputs). ``out`` is part of the backend contract but not read: the softmax
    backward's row term ``D_i = dO_i·O_i`` is taken as ``Σ_c dP∘P`` from those probabilities.
    """
    q, k, v, table, slopes, problem = call[:6]
    _check(q, k, table, slopes)
    if _foldable(q, problem):
        b, hq, nq, d = q.shape
        fq, fk, fv, ft, fs = _fold(q, k, v, table, slopes)
        folded = call._replace(
            q=fq, k=fk, v=fv, table=ft, slopes=fs, token=_fold_token(call.token, b)
        )
        shape = fq.shape
        dq, dk, dv, dtable, *dtoken = backward(
            folded, grad_out.reshape(shape), out.reshape(shape), lse.reshape(1, b * hq, nq)
        )
        if dtable is not None:
            assert table is not None  # dtable only comes back for a table
            dtable = dtable.view(b, *table.shape).sum(0)
        grads = dq.view(q.shape), dk.view(k.shape), dv.view(v.shape), dtable
        if call.token is None:
            return grads
        return (*grads, *_unfold_token_grads(call.token, dtoken, b))
    lo, scale, causal, q_offset, window, doc_ids, key_padding_mask = _unpack(problem)
    (bsz, hq, nq, d), (hkv, nk), group, compute, plan = _layout(q, k, problem)
    dq = torch.zeros(bsz, hq, nq, d, dtype=compute, device=q.device)
    # dk and dv accumulate transposed: (D, L) += (D, m)·(m, L) is the fast matmul layout.
    dkt = torch.zeros(bsz, hkv, d, nk, dtype=compute, device=q.device)
    dvt = torch.zeros(bsz, hkv, d, nk, dtype=compute, device=q.device)
    dtable = None
    if table is not None:
        dtable = torch.zeros(table.shape, dtype=compute, device=q.device)
    tok = None
    if call.token is not None:
        tok = _Token(call.token, plan, (bsz, hq, nq, d), hkv, nk, problem, compute, q.device, True)
    if not plan.blocks:
        return _finish(dq, dkt, dvt, dtable, q, table, tok)
    terms = _offset_terms(plan, table, slopes, lo, causal, window, hq, compute, q.device)
    # dterms[h, x]: the table gradient at offset e_max - x, the same columns as terms.
    dterms = torch.zeros_like(terms) if table is not None else None
    work_p = _workspace(plan, hkv, group, compute, q.device)
    work_ds = torch.empty_like(work_p)
    qs = (q.to(compute) * scale).view(bsz, hkv, group, nq, d)
    kc = k.to(compute)
    kt = kc.transpose(-1, -2).contiguous()
    vt = v.to(compute).transpose(-1, -2).contiguous()
    do = grad_out.to(compute).view(bsz, hkv, group, nq, d)
    empty_rows = (lse == _NEG_INF).view(bsz, hkv, group, nq, 1)
    dq_g = dq.view(bsz, hkv, group, nq, d)
    steps = _steps(plan, bsz, hkv, group, q_offset, doc_ids, key_padding_mask)
    for b, blk, c0, c1, base, hidden, h0, h1 in steps:
        m, rs, hs = blk.m, slice(blk.r0, blk.r0 + blk.m), h1 - h0
        keys = c1 - c0
        qb, dob = _reversed_rows(qs, b, h0, h1, rs), _reversed_rows(do, b, h0, h1, rs)
        p, _ = _probabilities(
            work_p, terms, base, qb, kt[b, h0:h1, :, c0:c1], hidden, group, h0, m,
            with_max=False, token=tok, at=(b, blk.r0, c0, base),
        )  # fmt: skip
        if blk.maybe_empty:
            p.masked_fill_(_reversed_rows(empty_rows, b, h0, h1, rs), 0.0)
        ds = work_ds[: p.numel()].view(p.shape)
        torch.bmm(dob, vt[b, h0:h1, :, c0:c1], out=ds)  # dP = dO·vᵀ
        # dS = P∘(dP - Σ_c dP∘P) row by row in one pass; the row sum is the softmax backward's
        # D_i = dO_i·O_i, taken from the exact probabilities rather than the rounded output.
        _softmax_backward(ds, p)
        if tok is not None:
            tok.backward(ds, b, h0, blk.r0, c0, base)
        dvt[b, h0:h1, :, c0:c1].baddbmm_(dob.transpose(1, 2), p)
        dkt[b, h0:h1, :, c0:c1].baddbmm_(qb.transpose(1, 2), ds)
        dq_rev = torch.bmm(ds, kc[b, h0:h1, c0:c1]).view(hs, group, m, d)
        dq_g[b, h0:h1, :, rs] = dq_rev.flip(2)
        if dterms is not None:
            # Reversed row r' against key c has offset column base + r' + c: the table
            # gradient is the sum of each anti-diagonal of dS.
            sums = _antidiagonal_sums(ds.view(hs * group, m, keys))
            dterms[h0 * group : h1 * group, base : base + m + keys - 1] += sums
    dq.mul_(scale)
    if dterms is not None:
        assert table is not None and dtable is not None  # dterms exists only with a table
        dterms = dterms.flip(-1)  # column i is the offset e_min + i
        a, z = max(lo, plan.e_min), min(lo + table.shape[1] - 1, plan.e_max)
        if a <= z:
            dtable[:, a - lo : z - lo + 1] = dterms[:, a - plan.e_min : z - plan.e_min + 1]
    return _finish(dq, dkt, dvt, dtable, q, table, tok)


def _softmax_backward(ds: Tensor, p: Tensor) -> None:
    """``ds ← p∘(ds - Σ_c ds∘p)`` per row, in place (``ds`` holds dP on entry)."""
    if ds.device.type == "cpu":
        # The row-wise kernel reads a row's dP and p for the sum before it writes the row.
        torch.ops.aten._softmax_backward_data.out(ds, p, -1, ds.dtype, grad_input=ds)
    else:
        _softmax_backward_generic(ds, p)


def _softmax_backward_generic(ds: Tensor, p: Tensor) -> None:
    """``_softmax_backward`` for any device, in three passes."""
    ds.sub_((ds * p).sum(dim=-1, keepdim=True)).mul_(p)


def _antidiagonal_sums(x: Tensor) -> Tensor:
    """``out[n, t] = Σ_{r + c = t} x[n, r, c]`` for ``x (n, m, L)``: shape ``(n, m + L - 1)``.

    The anti-diagonal t of a row-major ``(m, L)`` matrix is the arithmetic sequence of flat
    indices ``t + r·(L - 1)``, so the anti-diagonals that cross every row (``m - 1 <= t <= L - 1``)
    are one strided view of x, summed without a copy; only the two ``m × (m - 1)`` corner
    triangles are summed from a zero-padded copy.
    """
    n, m, keys = x.shape
    if keys < m or m == 1:
        return _antidiagonal_sums_padded(x)
    x = x.contiguous()
    full = x.as_strided((n, keys - m + 1, m), (m * keys, 1, keys - 1), x.storage_offset() + m - 1)
    head = _antidiagonal_sums_padded(x[:, :, : m - 1])[:, : m - 1]
    tail = _antidiagonal_sums_padded(x[:, :, keys - m + 1 :])[:, m - 1 :]
    return torch.cat([head, full.sum(dim=-1), tail], dim=1)


def _antidiagonal_sums_padded(x: Tensor) -> Tensor:
    """``_antidiagonal_sums`` through a copy whose rows are padded with m zeros: in a row stride
    of ``L + m``, the sequence ``t + r·(L + m - 1)`` steps off a row only into padding."""
    n, m, keys = x.shape
    width = keys + m
    z = x.new_zeros(n, m, width)
    z[:, :, :keys] = x
    return z.as_strided((n, m + keys - 1, m), (m * width, 1, width - 1)).sum(dim=-1)


def _finish(dq, dkt, dvt, dtable, q, table, tok: _Token | None = None) -> tuple:
    dtable = dtable.to(table.dtype) if dtable is not None else None
    dk, dv = dkt.transpose(-1, -2), dvt.transpose(-1, -2)
    grads = dq.to(q.dtype), dk.to(q.dtype).contiguous(), dv.to(q.dtype).contiguous(), dtable
    return grads if tok is None else (*grads, *tok.gradients())


def _unfold_token_grads(token: TokenTerms, grads: list, b: int) -> tuple:
    """``(dr, dweight, dfq, dfk)`` of a folded call (:func:`_fold_token`) in ``token``'s
    shapes: a per-head P's gradient summed over the batch rows."""
    dr, dweight, dfq, dfk = grads
    r, weight, fq, fk = token
    if dr is not None and r is not None:
        dr = dr.view(r.shape)
    if dweight is not None and weight is not None and weight.shape[0] != 1:
        dweight = dweight.view(b, *weight.shape).sum(0)
    if dfq is not None and fq is not None and dfk is not None and fk is not None:
        dfq, dfk = dfq.view(fq.shape), dfk.view(fk.shape)
    return dr, dweight, dfq, dfk


class ChunkedBackend(Backend):
    """Block by block in plain PyTorch: any device, any floating dtype."""

    name = "chunked"
    layout = Layout(q="strided", kv="strided")  # PyTorch ops only
    context_parallel = True
    top_priority = 10.0
    token_terms = True

    def priority(self, q: Tensor, k: Tensor, problem: Problem) -> float | None:
        return 10.0

    def forward(self, call: Call) -> tuple[Tensor, Tensor]:
        return forward(*call[:6], call.token)

    def backward(self, call: Call, grad_out: Tensor, out: Tensor, lse: Tensor) -> tuple:
        return backward(call, grad_out, out, lse)


BACKEND = ChunkedBackend()
