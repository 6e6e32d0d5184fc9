"""The specification: the formula of docs/design.md, symbol for symbol, materializing scores.

    α(i, j) = softmax_j( scale · q_i·k_j + PE(i, j) + Mask(i, j) ),    out_i = Σ_j α(i, j) · v_j

Readable, not fast: every other backend is tested against it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..masks import visible
from ..problem import Problem
from .base import Backend, Call, Layout, TokenTerms

# Below this many scores per head the materializing reference beats the chunked backend on the
# CPU. With few query rows (Nq <= 128) the decode backend outranks both: it took 0.3-0.5x the
# reference's time at Nq x Nk <= 64 x 64 (fp32, H = 8, D = 64, 2-core AMD EPYC, no grad).
TINY = 64 * 64


def token_scores(token: TokenTerms, delta: Tensor, dtype: torch.dtype) -> Tensor:
    """The terms that depend on the tokens, ``(B, Hq, Nq, Nk)`` in ``dtype``, at the offsets
    ``delta`` ``(Nq, Nk)``: the banded bias ``Σ_c r[b, h, i, c]·P[c, Δ]`` for ``0 <= Δ < W``
    plus the forget gate ``fq_i - fk_j`` (``fk_j - fq_i`` for ``Δ < 0``)."""
    out = torch.zeros((), dtype=dtype, device=delta.device)
    r, weight, fq, fk = token
    if r is not None and weight is not None:
        width = weight.shape[-1]
        column = delta.clamp(0, width - 1)
        profiles = weight.to(dtype)[:, :, column]  # (Hw, R, Nq, Nk): P[c, Δ]
        band = torch.einsum("bhic,hcij->bhij", r.to(dtype), profiles.expand(r.shape[1], -1, -1, -1))
        out = out + torch.where((delta >= 0) & (delta < width), band, 0.0)
    if fq is not None and fk is not None:
        gap = fq.to(dtype)[..., :, None] - fk.to(dtype)[..., None, :]  # F_i - F_j
        out = out + torch.where(delta >= 0, gap, -gap)
    return out


def token_gradients(
    token: TokenTerms, delta: Tensor, ds: Tensor
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """``(dr, dweight, dfq, dfk)`` of :func:`token_scores` from ``ds`` ``(B, Hq, Nq, Nk)``,
    the gradient of the scores (None for absent terms), each in its tensor's dtype."""
    r, weight, fq, fk = token
    dr = dweight = dfq = dfk = None
    if r is not None and weight is not None:
        width = weight.shape[-1]
        inside = (delta >= 0) & (delta < width)
        g = torch.where(inside, ds, 0.0)
        column = delta.clamp(0, width - 1)
        profiles = weight.to(ds.dtype)[:, :, column].expand(r.shape[1], -1, -1, -1)
        dr = torch.einsum("bhij,hcij->bhic", g, profiles).to(r.dtype)
        per_pair = torch.einsum("bhic,bhij->hcij", r.to(ds.dtype), g)  # (Hq, R, Nq, Nk)
        if weight.shape[0] == 1:
            per_pair = per_pair.sum(0, keepdim=True)
        flat = per_pair.flatten(2)
        dweight = torch.zeros(weight.shape, dtype=ds.dtype, device=ds.device)
        dweight.index_add_(2, column.flatten(), flat)
        dweight = dweight.to(weight.dtype)
    if fq is not None and fk is not None:
        signed = torch.where(delta >= 0, ds, -ds)
        dfq = signed.sum(-1).to(fq.dtype)
        dfk = (-signed.sum(-2)).to(fk.dtype)
    return dr, dweight, dfq, dfk


def scores_and_weights(
    q: Tensor,
    k: Tensor,
    table: Tensor | None,
    slopes: Tensor | None,
    problem: Problem,
    token: TokenTerms | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Scores ``scale·q·k + PE`` (B, Hq, Nq, Nk), the visibility mask and the weights α.

    Computed in float32 (float64 stays float64) whatever the input dtype.
    """
    compute = torch.promote_types(q.dtype, torch.float32)
    group = q.shape[1] // k.shape[1]
    k = k.to(compute).repeat_interleave(group, dim=1)  # query head h reads kv head h // group
    nq, nk = q.shape[2], k.shape[2]
    dot = q.to(compute) @ k.transpose(-1, -2)  # q_i · k_j
    scores = problem.scale * dot
    rows = torch.arange(nq, device=q.device)[:, None]
    delta = problem.q_offset + rows - torch.arange(nk, device=q.device)  # Δ = i - j
    if table is not None:
        t = table.to(compute)
        column = (delta - problem.lo).clamp(0, t.shape[1] - 1)  # masked pairs may fall off
        scores = scores + t[:, column]  # PE(i, j) = T[h, i - j]
    elif slopes is not None:
        scores = scores - slopes.to(compute)[:, None, None] * delta.abs().to(compute)
    if token is not None:
        scores = scores + token_scores(token, delta, compute)
    mask = visible(delta, problem)  # (B|1, 1, Nq, Nk)
    mask = mask.expand(scores.shape)
    scores = scores.masked_fill(~mask, float("-inf"))  # Mask(i, j) = -inf
    # A row that sees no key gives zero weights (not NaN): softmax it over zeros, then drop it.
    any_visible = mask.any(dim=-1, keepdim=True)
    weights = torch.softmax(torch.where(any_visible, scores, 0.0), dim=-1)
    weights = torch.where(mask, weights, 0.0)
    return scores, mask, weights


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    table: Tensor | None,
    slopes: Tensor | None,
    problem: Problem,
    token: TokenTerms | None = None,
) -> tuple[Tensor, Tensor]:
    """``out = α · v`` of shape (B, Hq, Nq, D) in q's dtype and the rows' log-sum-exp
    (B, Hq, Nq); autograd does the backward."""
    scores, _, weights = scores_and_weights(q, k, table, slopes, problem, token)
    group = q.shape[1] // k.shape[1]
    v = v.to(weights.dtype).repeat_interleave(group, dim=1)
    lse = torch.logsumexp(scores, dim=-1)  # -inf for rows that see no key
    return (weights @ v).to(q.dtype), lse


class ReferenceBackend(Backend):
    """The formula, materialized; differentiable by plain autograd (double backward too)."""

    name = "reference"
    layout = Layout(q="strided", kv="strided")  # PyTorch ops only
    autograd = True
    closed_form = False  # it reads the table (attention_weights' numbers stay the table's)
    top_priority = 30.0
    token_terms = True

    def priority(self, q: Tensor, k: Tensor, problem: Problem) -> float | None:
        """30 for tiny CPU calls (Nq·Nk <= TINY) without autograd; 17 with a gradient to take,
        below the fused CPU kernel (20), which took 0.55-0.65x its time for such training steps
        (fp32, 1 thread, T5, fwd+bwd: B 16, H 4, D 16, Nq = Nk = 8: 0.69 against 1.08 ms;
        B 1, H 8, D 64, Nq 16, Nk 256: 1.12 against 2.06 ms), above decode's 15."""
        if q.device.type != "cpu" or q.shape[2] * k.shape[2] > TINY:
            return 0.0
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
        return 17.0 if grad else 30.0

    def attention(self, call: Call) -> tuple[Tensor, Tensor]:
        return attention(*call[:6], call.token)

    def forward(self, call: Call) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            out, lse = attention(*call[:6], call.token)
        return out.contiguous(), lse

    def backward(self, call: Call, grad_out: Tensor, out: Tensor, lse: Tensor) -> tuple:
        """The softmax backward written out on the materialized weights (a custom op's kernel
        runs below autograd, so it cannot differentiate its own forward)."""
        q, k, v, table, slopes, problem = call[:6]
        scores, _, p = scores_and_weights(q, k, table, slopes, problem, call.token)
        compute, group = p.dtype, q.shape[1] // k.shape[1]
        kk = k.to(compute).repeat_interleave(group, dim=1)
        vv = v.to(compute).repeat_interleave(group, dim=1)
        do = grad_out.to(compute)
        dp = do @ vv.transpose(-1, -2)
        ds = p * (dp - (dp * p).sum(-1, keepdim=True))  # dS = P∘(dP - Σ dP∘P)
        dq = problem.scale * ds @ kk
        dk = (problem.scale * ds.transpose(-1, -2) @ q.to(compute)).unflatten(1, (-1, group))
        dv = (p.transpose(-1, -2) @ do).unflatten(1, (-1, group))
        dtable = None
        if table is not None:
            nq, nk = q.shape[2], k.shape[2]
            rows = torch.arange(nq, device=q.device)[:, None]
            delta = problem.q_offset + rows - torch.arange(nk, device=q.device)
            column = (delta - problem.lo).clamp(0, table.shape[1] - 1).flatten()
            per_head = ds.sum(0).flatten(1)  # (Hq, Nq·Nk); masked pairs hold exact zeros
            dtable = torch.zeros(table.shape, dtype=compute, device=q.device)
            dtable.index_add_(1, column, per_head)
            dtable = dtable.to(table.dtype)
        dt = q.dtype
        grads = dq.to(dt), dk.sum(2).to(dt), dv.sum(2).to(dt), dtable
        if call.token is None:
            return grads
        nq, nk = q.shape[2], k.shape[2]
        rows = torch.arange(nq, device=q.device)[:, None]
        delta = problem.q_offset + rows - torch.arange(nk, device=q.device)
        return (*grads, *token_gradients(call.token, delta, ds))


BACKEND = ReferenceBackend()
