"""The one torch.library custom op every fused backend runs behind.

``relattn::attention`` takes flat arguments (tensors, ints, a backend name) so torch.compile keeps
it as one graph node; its fake implementation gives shapes for tracing, and its autograd formula
calls ``relattn::attention_backward``, which returns dq, dk, dv and the table's gradient
``g[h, Δ] = Σ_{b, i - j = Δ} ∂L/∂score[b, h, i, j]``. Autograd carries ``g`` into the encoding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import backends


@torch.library.custom_op("relattn::attention", mutates_args=())
def fused_attention(
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
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Returns ``(out (B, Hq, Nq, D), lse (B, Hq, Nq) float32)``."""
    out, lse = backends.load(backend).forward(
        q, k, v, table, slopes, doc_ids, key_padding_mask, lo, scale, causal, q_offset, window
    )
    return out, lse


@fused_attention.register_fake
def _(
    q, k, v, table, slopes, doc_ids, key_padding_mask, lo, scale, causal, q_offset, window, backend
):
    b, h, n, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, h, n), dtype=torch.float32)


@torch.library.custom_op("relattn::attention_backward", mutates_args=())
def fused_attention_backward(
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
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(dq, dk, dv, dtable)``; dtable is an empty tensor when table is None."""
    dq, dk, dv, dtable = backends.load(backend).backward(
        grad_out,
        q,
        k,
        v,
        out,
        lse,
        table,
        slopes,
        doc_ids,
        key_padding_mask,
        lo,
        scale,
        causal,
        q_offset,
        window,
    )
    if dtable is None:
        dtable = q.new_empty((0,), dtype=torch.float32)
    return dq, dk, dv, dtable


@fused_attention_backward.register_fake
def _(
    grad_out,
    q,
    k,
    v,
    out,
    lse,
    table,
    slopes,
    doc_ids,
    key_padding_mask,
    lo,
    scale,
    causal,
    q_offset,
    window,
    backend,
):
    dtable = (
        torch.empty_like(table) if table is not None else q.new_empty((0,), dtype=torch.float32)
    )
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dtable


def _setup_context(ctx, inputs, output):
    q, k, v, table, slopes, doc_ids, kpm, lo, scale, causal, q_offset, window, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, table, slopes, doc_ids, kpm)
    ctx.args = (lo, scale, causal, q_offset, window, backend)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, table, slopes, doc_ids, kpm = ctx.saved_tensors
    dq, dk, dv, dtable = fused_attention_backward(
        grad_out.contiguous(), q, k, v, out, lse, table, slopes, doc_ids, kpm, *ctx.args
    )
    dtable = dtable if table is not None else None
    return dq, dk, dv, dtable, None, None, None, None, None, None, None, None, None


fused_attention.register_autograd(_backward, setup_context=_setup_context)
