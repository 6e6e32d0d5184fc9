"""The two calls context parallelism makes into relattn's fused backends, and nothing else does.

``_block_forward`` / ``_block_backward`` take the fused op's flat arguments and call the backend
behind it directly: they already run inside an autograd.Function (no torch.compile graph spans
the collectives), and the custom-op wrapper's first call imports torch._dynamo, seconds per
process. Arguments: q ``(B, Hq, Nq, D)``,
k, v ``(B, Hkv, Nk, D)``, table ``(Hq, T)`` whose column t holds offset ``lo + t`` (or slopes
``(Hq,)``), and a query row r at offset ``q_offset + r - c`` from key column c.

A ring step's backward sees only one block of the keys a query row attends to. It is called with
``partial=True`` and

    grad_out = α·dO,    out = the global output O,    lse = the block's own log-sum-exp,

where ``α = exp(lse_block - lse_global)`` is the share of the row's softmax mass in the block.
Then ``dS = P_block ∘ (grad_out·vᵀ - rowsum(grad_out ∘ out))`` is exactly the global
``P ∘ (dO·vᵀ - rowsum(dO ∘ O))`` on the block's keys, *provided the backend takes the softmax
backward's row term from ``out``*. The triton backend does. The chunked backend takes it from
its own block probabilities (exact for one whole call, wrong for a block of a ring), so for it
``_backward_from_out`` below stands in: blockwise PyTorch with the same contract.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import backends

# Backends whose backward computes D_i = rowsum(grad_out ∘ out) from the ``out`` it is given.
_ROW_TERM_FROM_OUT = frozenset({"triton"})

# Scores per block of the stand-in backward: 2M fp32 (8 MiB) per live (H, rows, keys) tensor.
_SCORES_PER_BLOCK = 1 << 21


def resolve_backend(backend: str, q: Tensor, k: Tensor) -> str:
    """The fused backend ``backend`` names here (``"auto"``: triton on CUDA, else chunked)."""
    if backend == "auto":
        if q.device.type == "cuda" and _unsupported("triton", q, k) is None:
            return "triton"
        return "chunked"
    reason = _unsupported(backend, q, k)
    if reason:
        raise RuntimeError(f"backend={backend!r} cannot run this call: {reason}")
    return backend


def _unsupported(name: str, q: Tensor, k: Tensor) -> str | None:
    try:
        module = backends.load(name)
    except RuntimeError as e:
        return str(e)
    check = getattr(module, "unsupported", None)
    return check(q, k) if check is not None else None


def _block_forward(
    q, k, v, table, slopes, doc_ids, key_padding_mask, lo, scale, causal, q_offset, window, backend
) -> tuple[Tensor, Tensor]:
    """``(out (B, Hq, Nq, D), lse (B, Hq, Nq) float32)`` of one fused call."""
    return backends.load(backend).forward(
        q, k, v, table, slopes, doc_ids, key_padding_mask, lo, scale, causal, q_offset, window
    )


def _block_backward(
    grad_out, q, k, v, out, lse, table, slopes, doc_ids, key_padding_mask,
    lo, scale, causal, q_offset, window, backend, partial: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:  # fmt: skip
    """``(dq, dk, dv, dtable or None)`` of one fused call.

    ``partial=False``: out and lse are this call's own (the plain contract of every backend).
    ``partial=True``: out is the global output of a larger call (see the module docstring).
    """
    if partial and backend not in _ROW_TERM_FROM_OUT:
        return _backward_from_out(
            grad_out, q, k, v, out, lse, table, slopes, doc_ids, key_padding_mask,
            lo, scale, causal, q_offset, window,
        )  # fmt: skip
    return backends.load(backend).backward(
        grad_out.contiguous(), q, k, v, out, lse, table, slopes, doc_ids, key_padding_mask,
        lo, scale, causal, q_offset, window,
    )  # fmt: skip


# ----------------------------------------------------------------------------- the stand-in


def _key_range(p0: int, p1: int, nk: int, causal: bool, window: int) -> tuple[int, int]:
    """Keys ``[c0, c1)`` that queries at positions ``p0 .. p1`` may see by their offsets."""
    c0 = max(0, p0 - window + 1) if window > 0 else 0
    if causal:
        c1 = p1 + 1
    elif window > 0:
        c1 = p1 + window
    else:
        c1 = nk
    return c0, min(max(c1, 0), nk)


def _diagonal_sums(x: Tensor) -> Tensor:
    """``out[h, t] = Σ_{c - r = t - (m - 1)} x[h, r, c]`` for ``x (H, m, L)``: ``(H, m + L - 1)``.

    Rows reversed and padded with m zeros turn each diagonal into one column of a strided view.
    """
    h, m, keys = x.shape
    width = keys + m
    z = x.new_zeros(h, m, width)
    z[:, :, :keys] = x.flip(1)
    return z.as_strided((h, m, width - 1), (m * width, width - 1, 1)).sum(dim=1)


def _backward_from_out(
    grad_out, q, k, v, out, lse, table, slopes, doc_ids, key_padding_mask,
    lo, scale, causal, q_offset, window,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:  # fmt: skip
    """The fused backward with ``D = rowsum(grad_out ∘ out)``, in blocks of query rows (no N×N
    tensor), skipping keys the offsets hide. ``P`` is a fresh softmax over the call's keys (each
    row block sees all of them), equal to ``exp(s - lse)`` but exactly normalized whatever the
    float32 rounding of lse."""
    bsz, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    compute = torch.promote_types(q.dtype, torch.float32)
    dev = q.device
    dq = torch.zeros(bsz, hq, nq, d, dtype=compute, device=dev)
    dk = torch.zeros(bsz, hkv, nk, d, dtype=compute, device=dev)
    dv = torch.zeros(bsz, hkv, nk, d, dtype=compute, device=dev)
    dtable = torch.zeros(table.shape, dtype=compute, device=dev) if table is not None else None
    go = grad_out.to(compute)
    row_term = (go * out.to(compute)).sum(-1)  # (B, Hq, Nq)
    empty = (lse == float("-inf"))[..., None]  # rows that see no key: P = 0, not NaN
    rows = max(16, _SCORES_PER_BLOCK // max(1, hq * nk))
    for r0 in range(0, nq, rows):
        r1 = min(nq, r0 + rows)
        m = r1 - r0
        c0, c1 = _key_range(q_offset + r0, q_offset + r1 - 1, nk, causal, window)
        if c1 <= c0:
            continue
        keys = c1 - c0
        delta = (q_offset + torch.arange(r0, r1, device=dev))[:, None] - torch.arange(
            c0, c1, device=dev
        )
        hidden = torch.zeros_like(delta, dtype=torch.bool)
        if causal:
            hidden |= delta < 0
        if window > 0:
            hidden |= delta >= window
            if not causal:
                hidden |= delta <= -window
        bias = None
        if table is not None:
            bias = table.to(compute)[:, (delta - lo).clamp(0, table.shape[1] - 1)]
        elif slopes is not None:
            bias = -slopes.to(compute)[:, None, None] * delta.abs().to(compute)
        for b in range(bsz):
            hide = hidden
            if doc_ids is not None:
                q_doc = doc_ids[b, q_offset + r0 : q_offset + r1]
                hide = hide | (q_doc[:, None] != doc_ids[b, None, c0:c1])
            if key_padding_mask is not None:
                hide = hide | ~key_padding_mask[b, None, c0:c1]
            qb = q[b, :, r0:r1].to(compute).reshape(hkv, group * m, d)
            kb, vb = k[b, :, c0:c1].to(compute), v[b, :, c0:c1].to(compute)
            s = torch.bmm(qb, kb.transpose(1, 2)).mul_(scale).view(hq, m, keys)
            if bias is not None:
                s += bias
            s.masked_fill_(hide, float("-inf"))
            p = torch.softmax(s, dim=-1).masked_fill_(empty[b, :, r0:r1], 0.0)
            p = p.view(hkv, group * m, keys)
            gob = go[b, :, r0:r1].reshape(hkv, group * m, d)
            ds = torch.bmm(gob, vb.transpose(1, 2))  # dP
            ds.sub_(row_term[b, :, r0:r1].reshape(hkv, group * m, 1)).mul_(p)
            dv[b, :, c0:c1] += torch.bmm(p.transpose(1, 2), gob)
            dk[b, :, c0:c1] += torch.bmm(ds.transpose(1, 2), qb).mul_(scale)
            dq[b, :, r0:r1] = torch.bmm(ds, kb).mul_(scale).view(hq, m, d)
            if dtable is not None:
                # diagonal t of (rows, keys) holds Δ = q_offset + r0 - c0 + m - 1 - t
                sums = _diagonal_sums(ds.view(hq, m, keys)).flip(-1)
                first = q_offset + r0 - c1 + 1 - lo  # table column of the smallest Δ
                a, z = max(first, 0), min(first + sums.shape[1], dtable.shape[1])
                if a < z:
                    dtable[:, a:z] += sums[:, a - first : z - first]
    dtable = dtable.to(table.dtype) if dtable is not None else None
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dtable
