"""Independent float64 math for the position terms that depend on the tokens.

Written from the definitions (not from relattn's code): the query-conditioned banded bias
``Σ_c r[b, h, i, c]·P[c, Δ]`` on ``0 <= Δ < W``, built offset by offset, and the forget gate
``-|F_i - F_j|`` with ``F`` the cumulative sum of log f; the attention itself is
:func:`oracle.attention_math`.
"""

from __future__ import annotations

import torch
from oracle import attention_math, delta_grid, grads_of

import relattn
from relattn.pe import ForgetGate, QueryConditionedBias


def band_math(r: torch.Tensor, weight: torch.Tensor, nk: int, q_offset: int) -> torch.Tensor:
    """``(B, Hq, Nq, Nk)``: for each offset ``Δ`` in the band, the queries' ``r·P[:, Δ]`` on
    the pairs at that offset. ``weight`` is ``(R, W)`` or ``(Hq, R, W)``."""
    b, h, nq, rank = r.shape
    delta = delta_grid(nq, nk, q_offset)
    out = torch.zeros(b, h, nq, nk, dtype=r.dtype)
    width = weight.shape[-1]
    for d in range(max(0, int(delta.min())), min(width, int(delta.max()) + 1)):
        column = weight[..., d]  # (R,) or (Hq, R)
        if weight.dim() == 2:
            value = r @ column  # (B, Hq, Nq)
        else:
            value = (r * column[None, :, None, :]).sum(-1)
        out = out + (delta == d).to(r.dtype) * value[..., None]
    return out


def gate_math(log_f: torch.Tensor, nq: int, q_offset: int) -> torch.Tensor:
    """``(B, Hq, Nq, Nk)``: ``-|F(q_offset + i) - F(j)|`` with ``F = cumsum(log f)``."""
    f = torch.cumsum(log_f, dim=-1)
    fq = f[..., q_offset : q_offset + nq]
    return -(fq[..., :, None] - f[..., None, :]).abs()


def run_token_math(q, k, v, grad_out, *, r=None, weight=None, log_f=None, pe=None, **kw):
    """Out and the gradients of q, k, v, r, weight, log_f (those given) in float64."""
    dt = torch.float64
    leaves = {n: t.detach().to(dt).requires_grad_(True)
              for n, t in (("q", q), ("k", k), ("v", v), ("r", r), ("weight", weight),
                           ("log_f", log_f)) if t is not None}  # fmt: skip
    nq, nk = q.shape[2], k.shape[2]
    q_offset = kw.get("q_offset", 0)
    bias = torch.zeros((), dtype=dt)
    if r is not None:
        bias = bias + band_math(leaves["r"], leaves["weight"], nk, q_offset)
    if log_f is not None:
        bias = bias + gate_math(leaves["log_f"], nq, q_offset)
    out = attention_math(leaves["q"], leaves["k"], leaves["v"], pe, dtype=dt, bias=bias, **kw)
    return grads_of(out, grad_out, leaves)


def run_token_relattn(q, k, v, grad_out, backend, *, r=None, weight=None, log_f=None, pe=None,
                      **kw):  # fmt: skip
    """Out and gradients of ``relattn.attention`` with the public API's terms."""
    leaves = {n: t.detach().clone().requires_grad_(True)
              for n, t in (("q", q), ("k", k), ("v", v), ("r", r), ("log_f", log_f))
              if t is not None}  # fmt: skip
    terms = [] if pe is None else list(pe) if isinstance(pe, (list, tuple)) else [pe]
    named = dict(leaves)
    if r is not None:
        heads, rank, width = r.shape[1], weight.shape[-2], weight.shape[-1]
        qcb = QueryConditionedBias(heads, rank, width, shared_heads=weight.dim() == 2)
        qcb = qcb.to(weight.dtype)
        with torch.no_grad():
            qcb.weight.copy_(weight)
        terms.append(qcb(leaves["r"]))
        named["weight"] = qcb.weight
    if log_f is not None:
        terms.append(ForgetGate()(leaves["log_f"]))
    out = relattn.attention(leaves["q"], leaves["k"], leaves["v"], terms, backend=backend, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    return grads_of(out, grad_out, named)
