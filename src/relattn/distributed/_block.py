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
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..backends.base import Backend, Call
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
) -> Call:
    """One block's call, conformed to ``backend``'s layout."""
    problem = Problem(lo, scale, causal, q_offset, window, doc_ids, key_padding_mask)
    return Call(q, k, v, table, slopes, problem, backend).conformed()


def _block_forward(call: Call) -> tuple[Tensor, Tensor]:
    """``(out (B, Hq, Nq, D), lse (B, Hq, Nq) float32)`` of one fused call."""
    return call.backend.forward(call)


def _block_backward(
    call: Call, grad_out: Tensor, out: Tensor, lse: Tensor, partial: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """``(dq, dk, dv, dtable or None)`` of one fused call.

    ``partial=False``: out and lse are this call's own (the plain contract of every backend).
    ``partial=True``: out is the global output of a larger call (see the module docstring).
    """
    if partial and not call.backend.row_term_from_out:
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


def _backward_from_out(
    call: Call, grad_out: Tensor, out: Tensor, lse: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The fused backward with ``D = rowsum(grad_out ∘ out)``, in blocks of query rows (no N×N
    tensor), skipping keys the offsets hide. ``P`` is a fresh softmax over the call's keys (each
    row block sees all of them), equal to ``exp(s - lse)`` but exactly normalized whatever the
    float32 rounding of lse.

    A block's rows are taken in reverse order, so reversed row i against key c has offset
    ``d0 - (i + c)``: the bias is a strided view of one vector, and dS, written into a buffer
    whose rows are padded with zeros, gives the table's gradient as one strided sum over its
    anti-diagonals.
    """
    q, k, v, table, slopes = call.q, call.k, call.v, call.table, call.slopes
    pr = call.problem
    lo, causal, q_offset, window, scale = pr.lo, pr.causal, pr.q_offset, pr.window, pr.scale
    doc_ids, key_padding_mask = pr.doc_ids, pr.key_padding_mask
    bsz, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    compute = torch.promote_types(q.dtype, torch.float32)
    dev = q.device
    dq = torch.zeros(bsz, hq, nq, d, dtype=compute, device=dev)
    dk = torch.zeros(bsz, hkv, nk, d, dtype=compute, device=dev)
    dv = torch.zeros(bsz, hkv, nk, d, dtype=compute, device=dev)
    dtable = torch.zeros(table.shape, dtype=compute, device=dev) if table is not None else None
    row_term = (grad_out.to(compute) * out.to(compute)).sum(-1)  # (B, Hq, Nq)
    empty = lse == float("-inf")  # rows that see no key: P = 0, not NaN
    rows = max(16, _SCORES_PER_BLOCK // max(1, hq * nk))
    blocks = []
    for r0 in range(0, nq, rows):
        r1 = min(nq, r0 + rows)
        c0, c1 = key_span(q_offset + r0, q_offset + r1 - 1, nk, causal, window)
        if c1 > c0:
            blocks.append((r0, r1, c0, c1))
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
        for b in range(bsz):
            hide = None
            if doc_ids is not None:
                q_doc = doc_ids[b, q_offset + r0 : q_offset + r1].flip(0)
                hide = q_doc[:, None] != doc_ids[b, None, c0:c1]
            if key_padding_mask is not None:
                pad_keys = ~key_padding_mask[b, None, c0:c1]
                hide = pad_keys if hide is None else hide | pad_keys
            qb = _rev(q[b, :, r0:r1].to(compute)).reshape(hkv, group * m, d)
            kb, vb = k[b, :, c0:c1].to(compute), v[b, :, c0:c1].to(compute)
            s = work[: hkv * group * m * keys].view(hkv, group, m, keys)
            s.copy_(bias)
            s = s.view(hkv, group * m, keys).baddbmm_(qb, kb.transpose(1, 2), alpha=scale)
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
                sums = pad.as_strided((hq, m, width - 1), (m * width, width - 1, 1)).sum(dim=1)
                sums = sums[:, : m + keys - 1].flip(-1)  # column d0 - lo - (m + keys - 2) + u
                first = d0 - lo - (m + keys - 2)
                a, z = max(first, 0), min(first + sums.shape[1], dtable.shape[1])
                if a < z:
                    dtable[:, a:z] += sums[:, a - first : z - first]
    dtable = dtable.to(table.dtype) if dtable is not None and table is not None else None
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dtable
