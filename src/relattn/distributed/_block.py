"""The two calls context parallelism makes into relattn's fused backends, and nothing else does.

``_block_forward`` / ``_block_backward`` take a :class:`~relattn.backends.base.Call` (built by
:func:`block_call`) and call its backend directly: they already run inside an
autograd.Function (no torch.compile graph spans the collectives), and the custom-op wrapper's
first call imports torch._dynamo, seconds per process. The call holds q ``(B, Hq, Nq, D)``,
k, v ``(B, Hkv, Nk, D)``, table ``(Hq, T)`` whose column t holds offset ``lo + t`` (or slopes
``(Hq,)``), and a query row r at offset ``q_offset + r - c`` from key column c.

A ring step's backward sees only one block of the keys a query row attends to. It is called with
``partial=True`` and

    grad_out = α·dO,    out = the global output O,    lse = the block's own log-sum-exp,

where ``α = exp(lse_block - lse_global)`` is the share of the row's softmax mass in the block.
Then ``dS = P_block ∘ (grad_out·vᵀ - rowsum(grad_out ∘ out))`` is exactly the global
``P ∘ (dO·vᵀ - rowsum(dO ∘ O))`` on the block's keys, *provided the backend takes the softmax
backward's row term from ``out``* (its ``row_term_from_out`` attribute). The fused CPU kernel
(``cpu_kernel``) does. The chunked
backend takes it from its own block probabilities (exact for one whole call, wrong for a block
of a ring), and so do triton's dk/dv, so for them ``_backward_from_out`` below stands in:
blockwise PyTorch with the same contract.

Terms that depend on the tokens travel in the block's ``call.token`` (a
:class:`~relattn.backends.base.TokenTerms`: the rows' ``r (B, Hq, Nq, R)`` and the band's
``weight (Hw, R, W)``, the forget gate's global ``F`` at the block's queries ``fq (B, Hq, Nq)``
and keys ``fk (B, Hq, Nk)``); the offsets are global, so the band needs nothing else. With a
token the backward returns ``(dq, dk, dv, dtable, dr, dweight, dfq, dfk)``. A backend without
``token_terms`` runs such blocks through the stand-ins here, forward (:func:`_forward_stand_in`)
and backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..backends.base import Backend, Call, TokenTerms
from ..masks import key_span
from ..problem import Problem

# Scores per block of the stand-in backward: 2M fp32 (8 MiB) per live (H, rows, keys) tensor.
_SCORES_PER_BLOCK = 1 << 21


def block_call(
    backend: Backend,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    table: Tensor | None,
    slopes: Tensor | None,
    lo: int,
    scale: float,
    causal: bool,
    q_offset: int,
    window: int,
    doc_ids: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    token: TokenTerms | None = None,
) -> Call:
    """One block's call, conformed to ``backend``'s layout (``token``: the block's
    :class:`~relattn.backends.base.TokenTerms`, or None)."""
    problem = Problem(lo, scale, causal, q_offset, window, doc_ids, key_padding_mask)
    return Call(q, k, v, table, slopes, problem, backend, True, None, token).conformed()


def _stand_in(call: Call) -> bool:
    """Whether the call's token terms need the stand-ins (its backend does not compute them)."""
    return call.token is not None and not call.backend.token_terms


def _block_forward(call: Call) -> tuple[Tensor, Tensor]:
    """``(out (B, Hq, Nq, D), lse (B, Hq, Nq) float32)`` of one fused call."""
    if _stand_in(call):
        return _forward_stand_in(call)
    return call.backend.forward(call)


def _block_backward(call: Call, grad_out: Tensor, out: Tensor, lse: Tensor, partial: bool) -> tuple:
    """``(dq, dk, dv, dtable or None)`` of one fused call; with ``call.token``,
    ``(dq, dk, dv, dtable, dr, dweight, dfq, dfk)`` (None for absent terms).

    ``partial=False``: out and lse are this call's own (the plain contract of every backend).
    ``partial=True``: out is the global output of a larger call (see the module docstring).
    """
    if (partial and not call.backend.row_term_from_out) or _stand_in(call):
        return _backward_from_out(call, grad_out, out, lse)
    return call.backend.backward(call, grad_out.contiguous(), out.contiguous(), lse.contiguous())


# ----------------------------------------------------------------------------- the stand-in


def _offsets_vector(table, slopes, hq, d0, width, lo, causal, window, dtype, device) -> Tensor:
    """``e[h, t] = PE_h(Δ = d0 - t)`` for ``t < width``, ``-inf`` where the offset is hidden:
    the bias of reversed row i against key c is ``e[h, i + c]`` (a Toeplitz view)."""
    delta = d0 - torch.arange(width, device=device)
    hidden = torch.zeros_like(delta, dtype=torch.bool)
    if causal:
        hidden |= delta < 0
    if window > 0:
        hidden |= delta >= window
        if not causal:
            hidden |= delta <= -window
    if table is not None:
        col = delta - lo
        hidden |= (col < 0) | (col >= table.shape[1])
        e = table.to(dtype)[:, col.clamp(0, table.shape[1] - 1)]
    elif slopes is not None:
        e = -slopes.to(dtype)[:, None] * delta.abs().to(dtype)
    else:
        e = torch.zeros(hq, width, dtype=dtype, device=device)
    return e.masked_fill(hidden, float("-inf")).contiguous()


def _rev(x: Tensor) -> Tensor:
    """Rows reversed: ``(H, m)`` or ``(H, m, D)``."""
    return x.flip(1)


def _band_columns(weight: Tensor, d0: int, width: int, dtype: torch.dtype) -> Tensor | None:
    """``(Hw, R, width)``: column t holds the band's ``weight[:, :, Δ]`` for ``Δ = d0 - t``
    where ``0 <= Δ < W``, zeros elsewhere; None if no column lies in the band (the block adds
    no band term and takes no band gradient)."""
    extent = weight.shape[-1]
    if d0 < 0 or d0 - width + 1 >= extent:
        return None
    delta = d0 - torch.arange(width, device=weight.device)
    inside = ((delta >= 0) & (delta < extent)).to(dtype)
    return (weight.to(dtype)[:, :, delta.clamp(0, extent - 1)] * inside).contiguous()


def _gate_signs(d0: int, m: int, keys: int, dtype: torch.dtype, device) -> Tensor | None:
    """``(m, keys)``: +1 where reversed row i is at or after key c (``Δ = d0 - i - c >= 0``),
    -1 before (a Toeplitz view of one vector); None when every pair has ``Δ >= 0``."""
    width = m + keys - 1
    if d0 - width + 1 >= 0:
        return None
    delta = d0 - torch.arange(width, device=device)
    signs = torch.where(delta >= 0, 1.0, -1.0).to(dtype)
    return signs.as_strided((m, keys), (1, 1))


def _token_term(
    token: TokenTerms, b: int, r0: int, r1: int, c0: int, c1: int, pcols, signs
) -> Tensor | None:
    """The token terms ``(Hq, m, keys)`` of batch row b's reversed rows ``r1 - 1 .. r0`` against
    keys ``c0 .. c1 - 1`` (``pcols`` from :func:`_band_columns`, ``signs`` from
    :func:`_gate_signs`), or None if neither term reaches this tile.

    The band is ``RP = r_rows @ pcols`` ``(Hq, m, m + keys - 1)`` read on a shear: reversed row i
    against key c has ``Δ = d0 - (i + c)``, column ``i + c`` of RP.
    """
    r, _, fq, fk = token
    m, keys = r1 - r0, c1 - c0
    term = None
    if r is not None and pcols is not None:
        width = pcols.shape[-1]
        rp = torch.matmul(_rev(r[b, :, r0:r1]), pcols)  # (Hq, m, width), contiguous
        term = rp.as_strided((rp.shape[0], m, keys), (m * width, width + 1, 1))
    if fq is not None and fk is not None:
        gap = _rev(fq[b, :, r0:r1])[:, :, None] - fk[b, :, None, c0:c1]  # F_i - F_j
        if signs is not None:
            gap = gap * signs
        term = gap if term is None else term + gap
    return term


def _row_blocks(call: Call) -> list[tuple[int, int, int, int]]:
    """``(r0, r1, c0, c1)``: blocks of query rows and the span of keys their offsets show."""
    q, k, pr = call.q, call.k, call.problem
    hq, nq, nk = q.shape[1], q.shape[2], k.shape[2]
    rows = max(16, _SCORES_PER_BLOCK // max(1, hq * nk))
    blocks = []
    for r0 in range(0, nq, rows):
        r1 = min(nq, r0 + rows)
        c0, c1 = key_span(pr.q_offset + r0, pr.q_offset + r1 - 1, nk, pr.causal, pr.window)
        if c1 > c0:
            blocks.append((r0, r1, c0, c1))
    return blocks


def _hidden(call: Call, b: int, r0: int, r1: int, c0: int, c1: int) -> Tensor | None:
    """``(m, keys)`` True where documents or padding hide a pair (rows reversed), or None."""
    pr = call.problem
    hide = None
    if pr.doc_ids is not None:
        q_doc = pr.doc_ids[b, pr.q_offset + r0 : pr.q_offset + r1].flip(0)
        hide = q_doc[:, None] != pr.doc_ids[b, None, c0:c1]
    if pr.key_padding_mask is not None:
        pad_keys = ~pr.key_padding_mask[b, None, c0:c1]
        hide = pad_keys if hide is None else hide | pad_keys
    return hide


def _forward_stand_in(call: Call) -> tuple[Tensor, Tensor]:
    """``(out (B, Hq, Nq, D) in q's dtype, lse (B, Hq, Nq))`` of one call in blocks of query
    rows (no N×N tensor), token terms included: the forward of a block whose backend does not
    compute them."""
    q, k, v, table, slopes = call.q, call.k, call.v, call.table, call.slopes
    pr, token = call.problem, call.token
    bsz, hq, nq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    compute = torch.promote_types(q.dtype, torch.float32)
    dev = q.device
    out = torch.zeros(bsz, hq, nq, d, dtype=compute, device=dev)
    lse = torch.full((bsz, hq, nq), float("-inf"), dtype=call.stat_dtype(), device=dev)
    for r0, r1, c0, c1 in _row_blocks(call):
        m, keys = r1 - r0, c1 - c0
        d0 = pr.q_offset + r1 - 1 - c0
        e = _offsets_vector(table, slopes, hq, d0, m + keys - 1, pr.lo, pr.causal, pr.window,
                            compute, dev)  # fmt: skip
        bias = e.as_strided((hq, m, keys), (e.stride(0), 1, 1)).reshape(hkv, group * m, keys)
        pcols = signs = None
        if token is not None:
            if token.weight is not None:
                pcols = _band_columns(token.weight, d0, m + keys - 1, compute)
            signs = _gate_signs(d0, m, keys, compute, dev)
        for b in range(bsz):
            qb = _rev(q[b, :, r0:r1].to(compute)).reshape(hkv, group * m, d)
            kb, vb = k[b, :, c0:c1].to(compute), v[b, :, c0:c1].to(compute)
            s = torch.baddbmm(bias, qb, kb.transpose(1, 2), alpha=pr.scale)
            if token is not None:
                term = _token_term(token, b, r0, r1, c0, c1, pcols, signs)
                if term is not None:
                    s.view(hq, m, keys).add_(term)
            hide = _hidden(call, b, r0, r1, c0, c1)
            if hide is not None:
                s.view(hkv, group, m, keys).masked_fill_(hide, float("-inf"))
            row_lse = torch.logsumexp(s, dim=-1, keepdim=True)  # -inf: the row sees no key
            p = torch.exp(s - torch.where(row_lse == float("-inf"), 0.0, row_lse))
            o = torch.bmm(p, vb).view(hq, m, d)
            out[b, :, r0:r1] = _rev(o)
            lse[b, :, r0:r1] = _rev(row_lse.view(hq, m)).to(lse.dtype)
    return out.to(q.dtype), lse


def _backward_from_out(call: Call, grad_out: Tensor, out: Tensor, lse: Tensor) -> tuple:
    """The fused backward with ``D = rowsum(grad_out ∘ out)``, in blocks of query rows (no N×N
    tensor), skipping keys the offsets hide. ``P`` is a fresh softmax over the call's keys (each
    row block sees all of them), equal to ``exp(s - lse)`` but exactly normalized whatever the
    float32 rounding of lse.

    Returns ``(dq, dk, dv, dtable or None)`` shaped like q, k, v and the table; with
    ``call.token`` also ``(dr, dweight, dfq, dfk)`` shaped like its r, weight, fq, fk (None for
    absent terms).

    A block's rows are taken in reverse order, so reversed row i against key c has offset
    ``d0 - (i + c)``: the bias is a strided view of one vector, and dS, written into a buffer
    whose rows are padded with zeros, read with a row stride one less than the buffer's, lines
    up each anti-diagonal ``t = i + c`` in column t (``G[h, i, t] = dS[h, i, t - i]``). Its sum
    over rows is the table's gradient at offset ``d0 - t``; ``G @ pcolsᵀ`` is the band's dr and
    ``r_rowsᵀ @ G`` its weight's gradient at those offsets. The gate's dfq and dfk are signed
    row and column sums of dS.
    """
    q, k, v, table, slopes = call.q, call.k, call.v, call.table, call.slopes
    pr, token = call.problem, call.token
    lo, causal, q_offset, window, scale = pr.lo, pr.causal, pr.q_offset, pr.window, pr.scale
    bsz, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    compute = torch.promote_types(q.dtype, torch.float32)
    dev = q.device
    dq = torch.zeros(bsz, hq, nq, d, dtype=compute, device=dev)
    dk = torch.zeros(bsz, hkv, nk, d, dtype=compute, device=dev)
    dv = torch.zeros(bsz, hkv, nk, d, dtype=compute, device=dev)
    dtable = torch.zeros(table.shape, dtype=compute, device=dev) if table is not None else None
    r = weight = fq = fk = None
    if token is not None:
        r, weight, fq, fk = token
    dr = torch.zeros(r.shape, dtype=compute, device=dev) if r is not None else None
    dweight = torch.zeros(weight.shape, dtype=compute, device=dev) if weight is not None else None
    dfq = torch.zeros(fq.shape, dtype=compute, device=dev) if fq is not None else None
    dfk = torch.zeros(fk.shape, dtype=compute, device=dev) if fk is not None else None
    row_term = (grad_out.to(compute) * out.to(compute)).sum(-1)  # (B, Hq, Nq)
    empty = lse == float("-inf")  # rows that see no key: P = 0, not NaN
    blocks = _row_blocks(call)
    widest = max((c1 - c0 for *_, c0, c1 in blocks), default=0)
    pad, work = None, None
    for r0, r1, c0, c1 in blocks:
        m, keys = r1 - r0, c1 - c0
        width = widest + m  # ≥ keys + m: each row ends in at least m zeros
        if pad is None or pad.shape[1] != group * m:
            pad = torch.zeros(hkv, group * m, width, dtype=compute, device=dev)
            work = torch.empty(hkv * group * m * widest, dtype=compute, device=dev)
        else:
            pad[:, :, keys : keys + m].zero_()  # what a wider block left in this row's padding
        assert work is not None  # allocated with pad
        d0 = q_offset + r1 - 1 - c0
        e = _offsets_vector(table, slopes, hq, d0, m + keys - 1, lo, causal, window, compute, dev)
        bias = e.as_strided((hq, m, keys), (e.stride(0), 1, 1)).view(hkv, group, m, keys)
        pcols = signs = None
        if token is not None:
            if weight is not None:
                pcols = _band_columns(weight, d0, m + keys - 1, compute)
            signs = _gate_signs(d0, m, keys, compute, dev)
        # G[h, i, t] = dS[h, i, t - i] (see the docstring), for t < m + keys - 1
        diagonals = pad.as_strided((hq, m, width - 1), (m * width, width - 1, 1))
        diagonals = diagonals[:, :, : m + keys - 1]
        for b in range(bsz):
            hide = _hidden(call, b, r0, r1, c0, c1)
            qb = _rev(q[b, :, r0:r1].to(compute)).reshape(hkv, group * m, d)
            kb, vb = k[b, :, c0:c1].to(compute), v[b, :, c0:c1].to(compute)
            s = work[: hkv * group * m * keys].view(hkv, group, m, keys)
            s.copy_(bias)
            s = s.view(hkv, group * m, keys).baddbmm_(qb, kb.transpose(1, 2), alpha=scale)
            if token is not None:
                term = _token_term(token, b, r0, r1, c0, c1, pcols, signs)
                if term is not None:
                    s.view(hq, m, keys).add_(term)
            if hide is not None:
                s.view(hkv, group, m, keys).masked_fill_(hide, float("-inf"))
            p = torch.softmax(s, dim=-1) if s.device.type != "cpu" else s
            if s.device.type == "cpu":
                torch.ops.aten._softmax.out(s, -1, False, out=s)  # row-wise: safe in place
            p.masked_fill_(_rev(empty[b, :, r0:r1]).reshape(hkv, group * m, 1), 0.0)
            gob = _rev(grad_out[b, :, r0:r1].to(compute)).reshape(hkv, group * m, d)
            ds = pad[:, :, :keys]
            torch.bmm(gob, vb.transpose(1, 2), out=ds)  # dP
            ds.sub_(_rev(row_term[b, :, r0:r1]).reshape(hkv, group * m, 1)).mul_(p)
            dv[b, :, c0:c1] += torch.bmm(p.transpose(1, 2), gob)
            dk[b, :, c0:c1] += torch.bmm(ds.transpose(1, 2), qb).mul_(scale)
            dq[b, :, r0:r1] = _rev(torch.bmm(ds, kb).mul_(scale).view(hq, m, d))
            if dtable is not None:
                # anti-diagonal t = i + c has Δ = d0 - t: table column d0 - lo - t
                sums = diagonals.sum(dim=1).flip(-1)  # column d0 - lo - (m + keys - 2) + u
                first = d0 - lo - (m + keys - 2)
                a, z = max(first, 0), min(first + sums.shape[1], dtable.shape[1])
                if a < z:
                    dtable[:, a:z] += sums[:, a - first : z - first]
            if pcols is not None:
                assert r is not None and dr is not None and dweight is not None
                dr[b, :, r0:r1] = _rev(torch.matmul(diagonals, pcols.transpose(1, 2)))
                dp = torch.matmul(_rev(r[b, :, r0:r1]).transpose(1, 2), diagonals)  # (Hq, R, ·)
                if dweight.shape[0] != hq:
                    dp = dp.sum(0, keepdim=True)
                dp = dp.flip(-1)  # column u: Δ = d0 - (m + keys - 2) + u
                first = d0 - (m + keys - 2)
                a, z = max(first, 0), min(first + dp.shape[-1], dweight.shape[-1])
                if a < z:
                    dweight[:, :, a:z] += dp[:, :, a - first : z - first]
            if dfq is not None and dfk is not None:
                signed = ds.view(hq, m, keys)
                if signs is not None:
                    signed = signed * signs
                dfq[b, :, r0:r1] = _rev(signed.sum(-1))
                dfk[b, :, c0:c1] -= signed.sum(-2)
    dtable = dtable.to(table.dtype) if dtable is not None and table is not None else None
    grads = dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dtable
    if token is None:
        return grads
    return (*grads, *(g.to(x.dtype) if g is not None and x is not None else None
                      for g, x in zip((dr, dweight, dfq, dfk), token, strict=True)))  # fmt: skip
