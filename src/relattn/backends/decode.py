"""Few query rows against many keys (decoding with a KV cache), in one pass over the keys.

With few query rows, attention is bound by reading k and v once. This backend folds every query
head of a GQA group into the rows of its kv head, so k and v are read in place, never repeated
or copied, and lays the position term of the visible offsets only over the scores as a strided
Toeplitz view of the table, as the chunked backend does (rows reversed, so reversed row ``r'``
against key ``c0 + j`` reads ``F[h, r' + j]``; for one row that view is the table row itself).

On the CPU the forward pass is then a single call of ATen's fused CPU attention kernel (the one
behind ``scaled_dot_product_attention``), with that view as its additive mask: one parallel
region per call. Several ops per call (score matmul, softmax, output matmul) each wake torch's
thread pool, and on cores busy with other work every wake-up waits for a descheduled thread:
measured on a loaded 2-core machine at Nk = 16384 with 2 threads, 96 ms for three such ops
against 24 ms for the fused call (1 thread: 16 ms and 17 ms). Elsewhere, and for the backward
pass, it computes the scores of all rows as one block with batched matmuls.

All rows form one block, so the backward's live scores are ``O(Hq·Nq·Nk)``: the backend is
exact for any shape, but ``backend="auto"`` picks it only for few rows (:data:`MAX_ROWS`).

The terms that depend on the tokens (``call.token``: the banded bias and the forget gate) are
computed for the call's rows over the key span, ``(B, Hq, Nq, L)`` (``O(Nq·Nk)``, few rows),
and added to the mask the fused kernel reads; a generation step lays them, per (batch, head),
under the C++ step's scores. Their gradients come from the backward's dS (:func:`token_bias`,
:func:`token_grads`).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.functional import scaled_dot_product_attention as _sdpa

from ..masks import key_span
from ..problem import Problem
from . import cpu_kernel
from .base import Backend, Call, Layout, TokenTerms, fits, unreversed
from .chunked import _antidiagonal_sums, _check, _softmax_backward, _stat_dtype

__all__ = ["MAX_ROWS", "DecodeBackend", "LayoutError", "backward", "forward"]

# ``auto`` sends CPU calls with at most this many query rows here. Measured (no grad, fp32,
# B = 1, H = 8, D = 64, T5Bias, 1 thread, 2-core AMD EPYC Zen 4 under load): decode took
# 0.12-0.6× the chunked backend's time at Nq = 1..64 and 0.55-0.83× at Nq = 128..256, for
# Nk = 64..4096 (chunked copies kᵀ and gathers an extended table per call), and 0.3-0.5× the
# reference's at Nq·Nk <= 64·64. 128 rows is also the chunked backend's block, so the live
# scores of decode's one-block backward stay those of one chunked block.
MAX_ROWS = 128
# ... and only while the scores (B·Hq·Nq·L) it may write out (the backward's, or a mask with
# doc_ids / key_padding_mask) stay below this many; beyond, chunked works block by block.
MAX_LIVE_SCORES = 1 << 24
# Query rows up to which auto gives a training step (a gradient to take) to this backend when
# the fused CPU kernel is not available: chunked took less time from 128 rows on (priority).
TRAIN_ROWS = 64
# Devices where the forward pass is ATen's fused CPU kernel; elsewhere, batched matmuls.
_FUSED_DEVICES = ("cpu",)

_NEG_INF = float("-inf")
# ATen runs an elementwise op on one thread below this many elements (at::internal::GRAIN_SIZE).
_SERIAL = 32768


class LayoutError(ValueError):
    """Strides that ATen's fused CPU kernel cannot read (see :func:`_aten_layout`)."""


def _aten_layout(q: Tensor, k: Tensor, v: Tensor) -> None:
    """Raise unless ATen's fused CPU kernel reads these inputs correctly: it indexes (B, H, N)
    by stride but D as dense, and writes its output in q's stride order (``empty_like``), so
    k and v need unit stride along D and q, besides, no other dim of stride below D (rows that
    overlap, or D not innermost, make it write past its output). Inputs conformed to
    :attr:`DecodeBackend.layout` always pass; this guards the kernel against any other caller."""
    d = q.shape[-1]
    if q.numel() == 0 or k.numel() == 0:
        return  # nothing is read
    if d > 1 and not (fits(q, "rows") and fits(k, "rows") and fits(v, "rows")):
        raise LayoutError(
            "decode backend: q, k and v must have unit stride along D (the last dim); got "
            f"strides q {tuple(q.stride())}, k {tuple(k.stride())}, v {tuple(v.stride())}"
        )
    if any(s < d for s, n in zip(q.stride()[:-1], q.shape[:-1], strict=True) if n > 1):
        raise LayoutError(
            "decode backend: q's rows must not overlap (every dim but D of stride >= D); got "
            f"shape {tuple(q.shape)}, strides {tuple(q.stride())}"
        )


def _as(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x if x.dtype == dtype else x.to(dtype)


def _positional_row(
    table: Tensor | None,
    slopes: Tensor | None,
    problem: Problem,
    e_min: int,
    e_max: int,
    hq: int,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor | None:
    """``F[h, x] = PE_h(Δ = e_max - x)`` for ``x = 0 .. e_max - e_min``, ``-inf`` where the Δ
    rules (causal, window) hide the offset; None when there is neither a position term nor a
    hidden offset (the scores then need no bias at all)."""
    # The visible offsets [a, z]: the table covers offset_range(), which is the Δ rules' interval
    # (a table of one masked column when nothing is visible, hence the explicit rules too).
    a, z = e_min, e_max
    if problem.causal:
        a = max(a, 0)
    if problem.window > 0:
        z = min(z, problem.window - 1)
        if not problem.causal:
            a = max(a, 1 - problem.window)
    if table is not None:
        a, z = max(a, problem.lo), min(z, problem.lo + table.shape[1] - 1)
    everything = a == e_min and z == e_max
    if table is not None:
        if everything:
            if e_min != problem.lo or e_max - e_min + 1 != table.shape[1]:
                table = table[:, e_min - problem.lo : e_max - problem.lo + 1]
            return _reversed(_as(table, dtype))
        f = torch.full((hq, e_max - e_min + 1), _NEG_INF, dtype=dtype, device=device)
        if a <= z:
            cols = table[:, a - problem.lo : z - problem.lo + 1]
            f[:, e_max - z : e_max - a + 1] = _reversed(_as(cols, dtype))
        return f
    if slopes is not None:
        delta = torch.arange(e_max, e_min - 1, -1, device=device)
        f = slopes.to(dtype)[:, None] * delta.abs().to(dtype).neg_()
    elif everything:
        return None
    else:
        f = torch.zeros(hq, e_max - e_min + 1, dtype=dtype, device=device)
    if not everything:
        f[:, : max(0, e_max - z)] = _NEG_INF
        f[:, max(0, e_max - a + 1) :] = _NEG_INF
    return f


def _reversed(t: Tensor) -> Tensor:
    """``t.flip(-1)`` for ``t (H, W)``, in pieces that each stay on one thread: the fused
    kernel is then the call's only parallel region (see the module docstring)."""
    if t.numel() <= _SERIAL:
        return t.flip(-1).contiguous()  # flip keeps a dense input's strides: the views need (W, 1)
    h, w = t.shape
    out = torch.empty(h, w, dtype=t.dtype, device=t.device)
    cols = min(w, _SERIAL)
    rows = max(1, _SERIAL // cols)
    for r in range(0, h, rows):
        for c in range(0, w, cols):
            c1 = min(w, c + cols)
            out[r : r + rows, w - c1 : w - c] = t[r : r + rows, c:c1].flip(-1)
    return out


def _hidden(problem: Problem, nq: int, c0: int, c1: int) -> Tensor | None:
    """``(B, Nq, L)`` bool in reversed row order: keys that doc_ids / key_padding_mask hide."""
    hidden = None
    if problem.doc_ids is not None:
        p0 = problem.q_offset
        q_doc = problem.doc_ids[:, p0 : p0 + nq].flip(1)
        hidden = q_doc[:, :, None] != problem.doc_ids[:, None, c0:c1]
    if problem.key_padding_mask is not None:
        pad = ~problem.key_padding_mask[:, None, c0:c1]
        hidden = pad if hidden is None else hidden | pad
    return hidden


def _no_key(pos: int, nk: int, causal: bool, window: int) -> bool:
    c0, c1 = key_span(pos, pos, nk, causal, window)
    return c1 <= c0


class _Setup:
    """What forward and backward share: the key span, the queries folded by kv head with rows
    reversed ``(B, Hkv, G·Nq, D)``, the keys and values of the span ``(B, Hkv, L, D)`` (views),
    the positional row F and the extra doc/padding mask."""

    def __init__(self, q, k, v, table, slopes, problem: Problem, token=None) -> None:
        _check(q, k, table, slopes)
        self.token: TokenTerms | None = token
        b, hq, nq, d = q.shape
        hkv, nk = k.shape[1], k.shape[2]
        self.b, self.hq, self.nq, self.d, self.hkv, self.nk = b, hq, nq, d, hkv, nk
        self.group = hq // hkv
        self.compute = torch.promote_types(q.dtype, torch.float32)
        self.problem = problem
        qo, causal, window = problem.q_offset, problem.causal, problem.window
        self.c0, self.c1 = c0, c1 = key_span(qo, qo + nq - 1, nk, causal, window)
        self.empty = c1 <= c0
        if self.empty:
            return
        self.keys = c1 - c0
        # Reversed row r' against key c0 + j has offset e_max - (r' + j).
        self.e_max, self.e_min = qo + nq - 1 - c0, qo - (c1 - 1)
        self.q = (q.flip(2) if nq > 1 else q).reshape(b, hkv, self.group * nq, d)
        self.k, self.v = (k, v) if self.keys == nk else (k[:, :, c0:c1], v[:, :, c0:c1])
        self.f = _positional_row(
            table, slopes, problem, self.e_min, self.e_max, hq, self.compute, q.device
        )
        self.hidden = _hidden(problem, nq, c0, c1)
        # The token terms over the span, folded like the rows: (B, Hkv, G·Nq, L).
        self.tok = None
        if token is not None:
            tok = token_bias(token, problem, nq, c0, c1, self.compute)
            rows = tok.flip(2) if nq > 1 else tok
            self.tok = rows.reshape(b, hkv, self.group * nq, rows.shape[-1])
        # A row can see nothing only at the ends of the span or under doc/padding masks.
        self.maybe_empty = self.hidden is not None or (
            nq > 1 and (_no_key(qo, nk, causal, window) or _no_key(qo + nq - 1, nk, causal, window))
        )

    def mask(self, member: int | None = None) -> Tensor | None:
        """PE + Mask over the rows of every kv head (None: nothing to add).

        Args:
            member: None for all rows, ``(B or 1, Hkv, G·Nq, L)``: a view of F with one row or
                one query head per group, else F's Toeplitz written out once; or one member
                ``0 <= member < G`` of each group, ``(B or 1, Hkv, Nq, L)``, always a view.
        """
        hkv, g, nq, keys, f = self.hkv, self.group, self.nq, self.keys, self.f
        rows = g * nq if member is None else nq
        if self.tok is not None:
            assert member is None  # token terms differ per head: one call for all rows
        bias = None
        if f is not None:
            f0 = f.stride(0)
            if member is not None:
                start = f.storage_offset() + member * f0
                bias = f.as_strided((1, hkv, nq, keys), (0, g * f0, 1, 1), start)
            elif nq == 1 or g == 1:
                bias = f.as_strided((1, hkv, rows, keys), (0, g * f0, f0 if nq == 1 else 1, 1))
            else:
                bias = f.as_strided((hkv, g, nq, keys), (g * f0, f0, 1, 1))
                bias = bias.reshape(1, hkv, rows, keys)
        if self.tok is not None:
            bias = self.tok if bias is None else self.tok + bias
        if self.hidden is None:
            return bias
        if bias is None:
            bias = torch.zeros((), dtype=self.compute, device=self.q.device)
        shape = (self.b, hkv, rows // nq, nq, keys)
        full = bias.expand(self.b, hkv, rows, keys).view(shape)
        return full.masked_fill(self.hidden[:, None, None], _NEG_INF).view(self.b, hkv, rows, keys)

    def fused(self, q: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """ATen's fused CPU kernel for queries ``q (B, Hkv, R, D)`` against the span, with
        rows whose mask is -inf throughout set to out 0, lse -inf."""
        _aten_layout(q, self.k, self.v)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, self.k, self.v, 0.0, False, attn_mask=mask, scale=self.problem.scale
        )
        if self.maybe_empty:
            # A row sees no key only where doc/padding or the Δ rules hide keys, and then the
            # mask is there (F is None only when no offset is hidden).
            assert mask is not None
            empty = ~(mask > _NEG_INF).any(dim=-1).expand(lse.shape)
            out = out.masked_fill(empty[..., None], 0.0)
            lse = lse.masked_fill(empty, _NEG_INF)
        return out, lse

    def scores(self) -> Tensor:
        """``scale·q·kᵀ + PE + Mask`` as ``(B·Hkv, G·Nq, L)`` in the compute dtype."""
        b, hkv, gnq, keys, d = self.b, self.hkv, self.group * self.nq, self.keys, self.d
        q = _as(self.q, self.compute).reshape(b * hkv, gnq, d)
        kt = _as(self.k, self.compute).reshape(b * hkv, keys, d).transpose(1, 2)
        s = torch.bmm(q, kt).mul_(self.problem.scale)
        mask = self.mask()
        if mask is not None:
            s.view(b, hkv, gnq, keys).add_(mask)
        return s

    def rows(self, x: Tensor, *tail: int) -> Tensor:
        """Rows ordered ``(B, Hkv, G·Nq)`` and reversed, trailing dims ``tail``, back to
        ``(B, Hq, Nq, *tail)``."""
        x = x.reshape(self.b, self.hq, self.nq, *tail)
        return x.flip(2) if self.nq > 1 else x


def _token_delta(problem: Problem, nq: int, c0: int, c1: int, device: torch.device) -> Tensor:
    """``(Nq, L)`` int64: ``Δ = q_offset + i - j`` for the keys ``j`` of the span ``[c0, c1)``."""
    rows = torch.arange(problem.q_offset, problem.q_offset + nq, device=device)
    return rows[:, None] - torch.arange(c0, c1, device=device)


def _band_offsets(problem: Problem, nq: int, c0: int, c1: int, width: int) -> tuple[int, int]:
    """``(d_lo, d_hi)``: the band's offsets that the rows meet on keys ``c0 .. c1 - 1``
    (``0 <= Δ < width``), so the band's product covers only them (``O(Nq·(Nq + L))``, not
    ``O(Nq·W)``: a training step's 128 rows against an extent of 1024). When no pair is in the
    band it returns one column ``(d, d)`` that no pair's offset equals (every Δ lies beyond
    ``width - 1``, or below 0), so the mask ``d_lo <= Δ <= d_hi`` keeps nothing."""
    q0 = problem.q_offset
    d_lo = max(0, q0 - (c1 - 1))
    d_hi = min(width - 1, q0 + nq - 1 - c0)
    if d_lo > d_hi:
        d = min(d_lo, width - 1)
        return d, d
    return d_lo, d_hi


def token_bias(
    token: TokenTerms, problem: Problem, nq: int, c0: int, c1: int, dtype: torch.dtype
) -> Tensor:
    """The terms that depend on the tokens for the call's rows against keys ``c0 .. c1 - 1``,
    ``(B, Hq, Nq, L)`` in ``dtype``, rows in their own order: the banded bias as ``r·P`` over
    every offset of the band (``(B, Hq, Nq, W)``), each key reading its offset's column, plus
    the forget gate ``fq - fk`` (``fk - fq`` after the query). Masked pairs hold finite values
    (the mask hides them)."""
    r, weight, fq, fk = token
    device = (r if r is not None else fq).device  # type: ignore[union-attr]
    delta = _token_delta(problem, nq, c0, c1, device)
    out: Tensor | None = None
    if r is not None and weight is not None:
        d_lo, d_hi = _band_offsets(problem, nq, c0, c1, weight.shape[-1])
        cols = _as(weight, dtype)[:, :, d_lo : d_hi + 1]  # the offsets the span reaches
        rp = torch.matmul(_as(r, dtype), cols.unsqueeze(0))  # (B, Hq, Nq, d_hi - d_lo + 1)
        column = (delta - d_lo).clamp(0, d_hi - d_lo).expand(*rp.shape[:2], nq, c1 - c0)
        band = rp.gather(-1, column)
        out = band.masked_fill_(~((delta >= d_lo) & (delta <= d_hi)), 0.0)
    if fq is not None and fk is not None:
        gap = _as(fq, dtype)[..., :, None] - _as(fk, dtype)[..., None, c0:c1]  # F_i - F_j
        gate = torch.where(delta >= 0, gap, -gap)
        out = gate if out is None else out.add_(gate)
    assert out is not None  # TokenTerms holds at least one pair
    return out


def token_grads(
    token: TokenTerms, problem: Problem, ds: Tensor, c0: int, c1: int, nk: int
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """``(dr, dweight, dfq, dfk)`` of :func:`token_bias` from ``ds`` ``(B, Hq, Nq, L)``, the
    scores' gradient over the span in the rows' own order (None for absent terms), each in its
    tensor's dtype: ``dRP[.., i, Δ] = Σ_j dS[.., i, j]`` at ``Δ(i, j)`` in the band (a scatter,
    one key per offset and row), ``dr = dRP·Pᵀ``, ``dP = Σ_{b, h} rᵀ·dRP``; the gate's row and
    column sums of the signed dS."""
    r, weight, fq, fk = token
    b, hq, nq, _ = ds.shape
    delta = _token_delta(problem, nq, c0, c1, ds.device)
    dr = dweight = dfq = dfk = None
    if r is not None and weight is not None:
        d_lo, d_hi = _band_offsets(problem, nq, c0, c1, weight.shape[-1])
        inside = (delta >= d_lo) & (delta <= d_hi)
        g = torch.where(inside, ds, 0.0)
        column = (delta - d_lo).clamp(0, d_hi - d_lo).expand(b, hq, nq, c1 - c0)
        drp = torch.zeros(b, hq, nq, d_hi - d_lo + 1, dtype=ds.dtype, device=ds.device)
        drp.scatter_add_(-1, column, g)
        w = _as(weight, ds.dtype)[:, :, d_lo : d_hi + 1]
        dr = _as(torch.matmul(drp, w.transpose(-1, -2).unsqueeze(0)), r.dtype)
        per_head = torch.einsum("bhic,bhiw->hcw", _as(r, ds.dtype), drp)  # (Hq, R, span)
        if weight.shape[0] == 1:
            per_head = per_head.sum(0, keepdim=True)
        dweight = torch.zeros(weight.shape, dtype=weight.dtype, device=ds.device)
        dweight[:, :, d_lo : d_hi + 1] = per_head
    if fq is not None and fk is not None:
        signed = torch.where(delta >= 0, ds, -ds)
        dfq = _as(signed.sum(-1), fq.dtype)
        dfk = torch.zeros(b, hq, nk, dtype=fk.dtype, device=ds.device)
        dfk[..., c0:c1] = signed.sum(-2).neg_()
    return dr, dweight, dfq, dfk


def _token_step(call: Call) -> tuple[Tensor, Tensor | None] | None:
    """A generation step with token terms (one query row on the CPU at position Nk - 1 or
    later, causal, no window, doc_ids or padding) on the C++ extension's ``step``: each (batch,
    head)'s position term over the keys built with a few ops -- the table reversed, the band
    ``r·P`` (``O(Hq·R·W)``) reversed onto its keys, the gate ``fq - fk`` -- and laid under the
    scores, batch and heads folded into one ``(B·Hq, Nk)`` bias. None: not this case (or no
    extension built, or k, v whose batch does not fold into their heads)."""
    q, k, v, table, _, problem = call[:6]
    token = call.token
    assert token is not None
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    qo = problem.q_offset
    if (
        nq != 1
        or not problem.causal
        or problem.window
        or qo < nk - 1
        or problem.doc_ids is not None
        or problem.key_padding_mask is not None
        or not q.is_cpu
        or q.dtype not in _NATIVE_DTYPES
        or not q.is_contiguous()
        or d > 1
        and (k.stride(3) != 1 or v.stride(3) != 1)
    ):
        return None
    if b > 1 and (k.stride(0) != hkv * k.stride(1) or v.stride(0) != hkv * v.stride(1)):
        return None  # (a KV cache's view folds: its batch stride is Hkv head strides)
    mod = _native()
    if mod is None:
        return None
    compute = torch.float64 if q.dtype is torch.float64 else torch.float32
    r, weight, fq, fk = token
    if fq is not None and fk is not None:
        bias = _as(fq, compute) - _as(fk, compute)  # (B, Hq, Nk): key c's F_q - F_c
    else:
        bias = torch.zeros(b, hq, nk, dtype=compute)
    if table is not None:  # column t is offset lo + t = q_offset - (Nk - 1 - t): key Nk - 1 - t
        bias += _as(table, compute).flip(-1)
    if r is not None and weight is not None:
        width = weight.shape[-1]
        c_lo, c_hi = max(0, qo - width + 1), min(nk - 1, qo)  # keys in the band
        if c_lo <= c_hi:
            w = _as(weight, compute)
            rq = _as(r, compute).view(b, hq, r.shape[-1])
            lo_d, hi_d = qo - c_hi, qo - c_lo + 1  # their offsets
            cols = w[:, :, lo_d:hi_d]  # (Hw, R, n)
            rp = torch.matmul(rq.transpose(0, 1), cols).transpose(0, 1)  # (B, Hq, n)
            bias[:, :, c_lo : c_hi + 1] += rp.flip(-1)
    fold = (1, b * hq, 1, d)
    out, lse = mod.step(
        q.view(fold),
        k.view(1, b * hkv, nk, d) if b > 1 else k,
        v.view(1, b * hkv, nk, d) if b > 1 else v,
        bias.view(b * hq, nk),
        0,
        problem.scale,
    )
    return out.view(b, hq, 1, d), (lse.view(b, hq, 1) if call.lse else None)


def _one_token(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    table: Tensor | None,
    slopes: Tensor | None,
    problem: Problem,
    need_lse: bool,
    reversed_table: tuple[Tensor, int, int] | None = None,
) -> tuple[Tensor, Tensor | None] | None:
    """The generation loop's call, with as little Python as possible: one query row on the CPU,
    every key of the span visible by offset and no doc_ids or padding. None: not this case
    (``forward`` then takes the general path). The position term is ``reversed_table`` (a
    call's ``reversed``) when prepare gave it (a view, no copy per token), else the table's
    span flipped. Without
    ``need_lse`` it goes through the public ``scaled_dot_product_attention`` (the same fused
    kernel on the CPU, about 4 µs cheaper to call than the ATen op that also returns the
    log-sum-exp) and returns None for lse."""
    if (
        q.shape[2] != 1
        or slopes is not None
        or not q.is_cpu
        or problem.doc_ids is not None
        or problem.key_padding_mask is not None
    ):
        return None
    d, nk = q.shape[3], k.shape[2]
    qo, lo = problem.q_offset, problem.lo
    if problem.causal and not problem.window and 0 <= qo - nk + 1 == lo:
        c0, c1, e_max, e_min = 0, nk, qo, lo  # a generation step: every key, every offset seen
    else:
        c0, c1 = key_span(qo, qo, nk, problem.causal, problem.window)
        e_max, e_min = qo - c0, qo - (c1 - 1)  # key c0 + j has offset e_max - j
        if c1 <= c0 or e_min < 0 and problem.causal or problem.window and e_max >= problem.window:
            return None  # hidden offsets inside the span: the general path masks them
    keys = c1 - c0
    rows, start = None, 0  # key c0 + j reads rows[:, start + j]
    compute = torch.float64 if q.dtype is torch.float64 else torch.float32  # promote_types
    if reversed_table is not None:
        rows, at_lo, _ = reversed_table  # rows[:, at_lo - t] holds offset lo + t
        start = at_lo - (e_max - lo)  # the column of offset e_max: key c0
        if rows.dtype != compute:
            rows, start = rows.narrow(1, start, keys).to(compute), 0
    elif table is not None:
        if e_min < lo or e_max >= lo + table.shape[1]:
            return None  # the general path reports it
        if e_min != lo or e_max - e_min + 1 != table.shape[1]:
            table = table[:, e_min - lo : e_max - lo + 1]
        rows = _reversed(_as(table, compute))
    if keys < nk:
        k, v = k[:, :, c0:c1], v[:, :, c0:c1]
    if not q.is_contiguous() or d > 1 and (k.stride(3) != 1 or v.stride(3) != 1):
        _aten_layout(q, k, v)  # raises, naming the strides (a conformed call never does)
    return _attend_one(q, k, v, rows, start, problem.scale, need_lse)


def _attend_one(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rows: Tensor | None,
    start: int,
    scale: float,
    need_lse: bool,
) -> tuple[Tensor, Tensor | None]:
    """One query row per head against every key given: ``q (B, Hq, 1, D)`` contiguous, ``k, v
    (B, Hkv, L, D)`` of unit stride along D, ``rows (Hq, W)`` of unit column stride in the
    compute dtype whose column ``start + c`` is key c's position term (or None). Returns
    ``(out (B, Hq, 1, D), lse (B, Hq, 1) or None without need_lse)``.

    The C++ extension's ``step`` runs it where the extension is built already (never building
    it here: a generation step must not wait for a compile): one pass over k and v per kv
    head with the scores in a vector, 16-bit inputs widened to float32 per head; else ATen's
    fused CPU kernel behind ``scaled_dot_product_attention`` with the position term as a
    strided mask (its public function when the log-sum-exp is not needed: about 4 µs
    cheaper to call)."""
    mod = _native() if q.dtype in _NATIVE_DTYPES else None
    if mod is not None:
        out, lse = mod.step(q, k, v, _NO_BIAS if rows is None else rows, start, scale)
        return out, lse if need_lse else None
    b, hq, _, d = q.shape
    hkv, keys = k.shape[1], k.shape[2]
    g = hq // hkv
    mask = None
    if rows is not None:
        f0 = rows.stride(0)
        mask = rows.as_strided((1, hkv, g, keys), (0, g * f0, f0, 1), rows.storage_offset() + start)
    if g > 1:
        q = q.reshape(b, hkv, g, d)
    if not need_lse:
        out = _sdpa(q, k, v, attn_mask=mask, scale=scale)
        return (out.reshape(b, hq, 1, d) if g > 1 else out), None
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, attn_mask=mask, scale=scale
    )
    return out.reshape(b, hq, 1, d), lse.reshape(b, hq, 1)


_NO_BIAS = torch.empty(0)
_NATIVE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _native():
    """The C++ extension module if it is built (see :func:`cpu_kernel.ready`), else None."""
    return cpu_kernel.ready()


def _step(q, k, v, table, slopes, problem, backend, lse, reversed_table) -> Tensor | None:
    """:func:`_one_token` for a generation loop's step (a :class:`Call`'s fields), in as few
    Python operations as possible (a step at a short cache counts each µs): one query row at
    position Nk - 1 or later, causal, no window, doc_ids or padding, the table reversed
    (``reversed_table``, not None), no log-sum-exp. None: not this case."""
    nq, d = q.shape[2], q.shape[3]
    nk = k.shape[2]
    lo = problem.lo
    if (
        nq != 1
        or not problem.causal
        or problem.window
        or not 0 <= lo == problem.q_offset - nk + 1
        or problem.doc_ids is not None
        or problem.key_padding_mask is not None
        or not q.is_cpu
        or not q.is_contiguous()
        or d > 1
        and (k.stride(3) != 1 or v.stride(3) != 1)
    ):
        return None
    rows, at_lo, _ = reversed_table  # the caller checked it is given
    if rows.dtype is not (torch.float64 if q.dtype is torch.float64 else torch.float32):
        return None
    # key 0 reads the column of offset q_offset
    return _attend_one(q, k, v, rows, at_lo - (nk - 1), problem.scale, False)[0]


def forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    table: Tensor | None,
    slopes: Tensor | None,
    problem: Problem,
    reversed_table: tuple[Tensor, int, int] | None = None,
    token: TokenTerms | None = None,
) -> tuple[Tensor, Tensor]:
    """``(out (B, Hq, Nq, D) in q's dtype, lse (B, Hq, Nq))``; see :mod:`relattn.backends.base`
    (``reversed_table``: a call's ``reversed``, given instead of ``table``; ``token``: a
    call's terms that depend on the tokens)."""
    if token is None:
        fast = _one_token(q, k, v, table, slopes, problem, True, reversed_table)
        if fast is not None:
            return fast  # type: ignore[return-value]  # lse is given when asked for
    if reversed_table is not None:  # the general path reads the table in its own order
        table = unreversed(reversed_table)
    st = _Setup(q, k, v, table, slopes, problem, token)
    b, hq, nq = st.b, st.hq, st.nq
    stat = _stat_dtype(q)
    if st.empty:
        out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        return out, torch.full((b, hq, nq), _NEG_INF, dtype=stat, device=q.device)
    g, d = st.group, st.d
    fused = q.device.type in _FUSED_DEVICES
    if fused and (nq == 1 or g == 1 or st.tok is not None):
        out, lse = st.fused(st.q, st.mask())
    elif fused:
        # One kernel call per member of the GQA groups, so the position term stays a view.
        out = q.new_empty(b, st.hkv, g, nq, d)
        lse = torch.empty(b, st.hkv, g, nq, dtype=stat, device=q.device)
        q_members = st.q.reshape(b, st.hkv, g, nq, d)
        for member in range(g):
            out[:, :, member], lse[:, :, member] = st.fused(
                q_members[:, :, member], st.mask(member)
            )
    else:  # other devices: the scores of all rows as one block
        s = st.scores()
        lse = torch.logsumexp(s, dim=-1)  # -inf for rows that see no key
        p = torch.softmax(s, dim=-1)
        if st.maybe_empty:  # softmax gave NaN there
            p.masked_fill_((lse == _NEG_INF)[..., None], 0.0)
        out = torch.bmm(p, _as(st.v, st.compute).reshape(b * st.hkv, st.keys, d))
    out = _as(st.rows(out, st.d), q.dtype).contiguous()
    return out, _as(st.rows(lse), stat).contiguous()


def backward(call: Call, grad_out: Tensor, out: Tensor, lse: Tensor) -> tuple:
    """``(dq, dk, dv, dtable)`` from probabilities recomputed in one block, followed by
    ``(dr, dweight, dfq, dfk)`` when the call has token terms; ``out`` is unread (the softmax
    backward's row term comes from the probabilities, as in the chunked backend)."""
    q, k, v, table, slopes, problem = call[:6]
    token = call.token
    st = _Setup(q, k, v, table, slopes, problem, token)
    dk = torch.zeros(k.shape, dtype=st.compute, device=q.device)
    dv = torch.zeros(v.shape, dtype=st.compute, device=q.device)
    dtable = None if table is None else torch.zeros(table.shape, dtype=table.dtype, device=q.device)
    if st.empty:
        grads = torch.zeros_like(q), dk.to(k.dtype), dv.to(v.dtype), dtable
        if token is None:
            return grads
        no_keys = torch.zeros(q.shape[0], q.shape[1], q.shape[2], 0, dtype=st.compute)
        return (*grads, *token_grads(token, problem, no_keys.to(q.device), 0, 0, k.shape[2]))
    b, hkv, g, nq, d, keys = st.b, st.hkv, st.group, st.nq, st.d, st.keys
    p = torch.softmax(st.scores(), dim=-1)
    if st.maybe_empty:  # softmax gave NaN on rows that see no key
        empty = (lse == _NEG_INF).view(b, st.hq, nq, 1)
        empty = empty.flip(2) if nq > 1 else empty
        p.masked_fill_(empty.reshape(b * hkv, g * nq, 1), 0.0)
    do = _as(grad_out, st.compute)
    do = (do.flip(2) if nq > 1 else do).reshape(b * hkv, g * nq, d)
    vc = _as(st.v, st.compute).reshape(b * hkv, keys, d)
    kc = _as(st.k, st.compute).reshape(b * hkv, keys, d)
    qc = _as(st.q, st.compute).reshape(b * hkv, g * nq, d)
    ds = torch.bmm(do, vc.transpose(1, 2))  # dP = dO·vᵀ
    _softmax_backward(ds, p)  # dS = P∘(dP - Σ_c dP∘P)
    scale = problem.scale
    dv[:, :, st.c0 : st.c1] = torch.bmm(p.transpose(1, 2), do).view(b, hkv, keys, d)
    dk_span = torch.bmm(ds.transpose(1, 2), qc).mul_(scale)
    dk[:, :, st.c0 : st.c1] = dk_span.view(b, hkv, keys, d)
    dq = st.rows(torch.bmm(ds, kc).mul_(scale), d)
    if table is not None:
        # Reversed row r' against key c0 + j has offset e_max - (r' + j): the table gradient
        # is the anti-diagonal sums of dS, summed over the batch, read backwards.
        sums = _antidiagonal_sums(ds.view(b, st.hq, nq, keys).sum(0)).flip(-1)
        lo, t = problem.lo, table.shape[1]
        a, z = max(lo, st.e_min), min(lo + t - 1, st.e_max)
        if a <= z:
            assert dtable is not None  # made above for a table
            dtable[:, a - lo : z - lo + 1] = sums[:, a - st.e_min : z - st.e_min + 1]
    grads = _as(dq, q.dtype).contiguous(), _as(dk, k.dtype), _as(dv, v.dtype), dtable
    if token is None:
        return grads
    ds_rows = st.rows(ds, keys)  # (B, Hq, Nq, L), rows in their own order
    return (*grads, *token_grads(token, problem, ds_rows, st.c0, st.c1, st.nk))


class DecodeBackend(Backend):
    """Few query rows against a long cache: one pass over k and v, no copies of them."""

    name = "decode"
    # ATen's fused CPU kernel indexes (B, H, N) by stride but assumes D dense, and allocates
    # its output like q (empty_like): q contiguous, so the output is; k, v need dense rows only
    # (a KV cache's view of a longer buffer is used in place).
    layout = Layout(q="contiguous", kv="rows")
    # It reads the encodings' table (a fixed ALiBi's too) rather than closed-form slopes to
    # expand at every token.
    closed_form = False
    reads_reversed = True  # a generation step's table, kept reversed by the encoding's cache
    token_terms = True  # computed for its few rows over the span (token_bias, token_grads)
    devices = ("cpu",)  # where auto picks it (backend="decode" runs anywhere)
    top_priority = 40.0

    def priority(self, q: Tensor, k: Tensor, problem: Problem) -> float | None:
        """40 (first) for up to MAX_ROWS query rows on the CPU without autograd: decoding and
        scoring against a cache. With a gradient to take (a training step), 15: below the
        fused CPU kernel (20), above chunked (10), and only up to TRAIN_ROWS rows; the fused
        kernel's forward and backward were faster at every few-row shape measured (fp32, 1
        thread, T5, fwd+bwd, ms, decode / cpu_kernel / chunked: B 16, H 4, D 16, Nq = Nk 1:
        0.81 / 0.58 / 1.25; 16: 1.13 / 0.73 / 1.77; 64: 6.3 / 2.7 / 9.9; 128: 21.2 / 6.4 /
        11.3; B 4, H 8, D 64, Nk 1024, Nq 16: 31 / 22 / 57; Nq 128: 93 / 50 / 105). None past
        the live-score budget when autograd or a document / padding mask keeps every score."""
        b, hq, nq, _ = q.shape
        if not q.is_cpu or nq > MAX_ROWS:
            return None
        masks = problem.doc_ids is not None or problem.key_padding_mask is not None
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
        if grad and nq > TRAIN_ROWS:
            return None
        if masks or grad:
            qo = problem.q_offset
            c0, c1 = key_span(qo, qo + nq - 1, k.shape[2], problem.causal, problem.window)
            if b * hq * nq * max(0, c1 - c0) > MAX_LIVE_SCORES:
                return None
        return 15.0 if grad else 40.0

    def forward(self, call: Call) -> tuple[Tensor, Tensor]:
        if call.token is not None:
            step = _token_step(call)
            if step is not None:
                return step  # type: ignore[return-value]  # lse None only if call.lse is False
            return forward(*call[:6], None, call.token)
        if not call.lse:  # a no-grad attention() call: a generation loop's step
            if call.reversed is not None:
                out = _step(*call[:9])
                if out is not None:
                    return out, None  # type: ignore[return-value]  # lse None: call.lse is False
            fast = _one_token(*call[:6], False, call.reversed)
            if fast is not None:
                return fast  # type: ignore[return-value]  # lse None: call.lse is False
        return forward(*call[:6], call.reversed)

    def backward(self, call: Call, grad_out: Tensor, out: Tensor, lse: Tensor) -> tuple:
        return backward(call, grad_out, out, lse)


BACKEND = DecodeBackend()
