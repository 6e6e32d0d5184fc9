"""The one torch.library custom op that every fused backend runs behind.

``relattn::attention`` takes flat arguments (tensors, ints, floats, a backend name) so
torch.compile keeps it as one graph node; this module is the one place where a
:class:`~relattn.backends.base.Call` is flattened into them (``Call.as_args``) and rebuilt
(``Call.from_args``). Its fake implementation
gives shapes and strides for tracing (outputs are contiguous on every backend), and its
autograd formula calls ``relattn::attention_backward``, which returns dq, dk, dv and the
table's gradient ``g[h, Δ] = Σ_{b, i - j = Δ} ∂L/∂score[b, h, i, j]``; autograd carries ``g``
into the encoding's parameters.
"""

from __future__ import annotations

import functools
import sys

import torch
from torch import Tensor

from . import backends
from .backends.base import Call

__all__ = ["fused_attention"]

_LIB = torch.library.Library("relattn", "FRAGMENT")


def _custom_op(name: str):
    """``torch.library.custom_op("relattn::<name>", mutates_args=())`` written with the
    lower-level Library calls, for one difference: the kernel runs outside dynamo (so a compiled
    caller never traces into a backend) without importing torch._dynamo in a process that never
    loaded it, where nothing can be tracing. custom_op's own wrapper imports it at the first
    call, about 2 s of a fresh process's first attention call. Returns the OpOverload."""

    def define(fn):
        _LIB.define(name + torch.library.infer_schema(fn, mutates_args=()))
        disabled = None

        @functools.wraps(fn)
        def kernel(*args, **kwargs):
            nonlocal disabled
            if "torch._dynamo" not in sys.modules:
                return fn(*args, **kwargs)
            if disabled is None:
                disabled = torch._dynamo.disable(fn, recursive=True)
            return disabled(*args, **kwargs)

        _LIB.impl(name, kernel, "CompositeExplicitAutograd")
        return getattr(torch.ops.relattn, name).default

    return define


@_custom_op("attention")
def _attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    table: Tensor | None,
    slopes: Tensor | None,
    r: Tensor | None,
    weight: Tensor | None,
    fq: Tensor | None,
    fk: Tensor | None,
    doc_ids: Tensor | None,
    key_padding_mask: Tensor | None,
    lo: int,
    scale: float,
    causal: bool,
    q_offset: int,
    window: int,
    backend: str,
    tied: int | None = None,
) -> tuple[Tensor, Tensor]:
    """``Call.as_args()`` and the backend's name: ``(out, lse)``. The op checks the backend
    can run the call (under torch.compile dispatch weighs priorities only); :func:`run` calls
    it only where autograd or compile needs it."""
    call = _call(list(locals().values()))
    reason = call.backend.unsupported(call.q, call.k, call.problem)
    if reason:
        raise RuntimeError(f"backend={backend!r} cannot run this call: {reason}")
    out, lse = call.backend.forward(call)
    return out.contiguous(), lse.to(call.stat_dtype()).contiguous()


def _call(args: list) -> Call:
    """The conformed call from the op's arguments (``Call.as_args()``, the backend's name and
    ``Call.tied``)."""
    return Call.from_args(args[:-2], backends.get(args[-2]), args[-1]).conformed()


@torch.library.register_fake("relattn::attention", lib=_LIB)
def _(q, *args):
    bsz, h, n, _ = q.shape
    stat = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(q.shape), q.new_empty((bsz, h, n), dtype=stat)


@_custom_op("attention_backward")
def _attention_backward(
    grad_out: Tensor,
    out: Tensor,
    lse: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    table: Tensor | None,
    slopes: Tensor | None,
    r: Tensor | None,
    weight: Tensor | None,
    fq: Tensor | None,
    fk: Tensor | None,
    doc_ids: Tensor | None,
    key_padding_mask: Tensor | None,
    lo: int,
    scale: float,
    causal: bool,
    q_offset: int,
    window: int,
    backend: str,
    tied: int | None = None,
) -> list[Tensor]:
    """``grad_out, out, lse``, then the forward's arguments: ``[dq, dk, dv, dtable, dr,
    dweight, dfq, dfk]``; each gradient of an absent tensor is an empty tensor."""
    call = _call(list(locals().values())[3:])
    grad_out, out, lse = grad_out.contiguous(), out.contiguous(), lse.contiguous()
    grads = list(call.backend.backward(call, grad_out, out, lse))
    grads += [None] * (8 - len(grads))
    empty = call.q.new_empty((0,), dtype=torch.float32)
    return [empty if g is None else g.contiguous() for g in grads]


@torch.library.register_fake("relattn::attention_backward", lib=_LIB)
def _(grad_out, out, lse, q, k, v, table, slopes, r, weight, fq, fk, *args):
    def like(t):
        return t.new_empty(t.shape) if t is not None else q.new_empty((0,), dtype=torch.float32)

    return [like(t) for t in (q, k, v, table, r, weight, fq, fk)]


# q, k, v, table, slopes, r, weight, fq, fk, doc_ids, key_padding_mask: saved; then
# lo, scale, causal, q_offset, window, backend, tied.
_TENSORS = 11


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:_TENSORS], *output)
    ctx.args = inputs[_TENSORS:]


def _backward(ctx, grad_out, grad_lse):
    *tensors, out, lse = ctx.saved_tensors
    grads = _attention_backward(grad_out.contiguous(), out, lse, *tensors, *ctx.args)
    dq, dk, dv, dtable, dr, dweight, dfq, dfk = grads
    q, k, v, table, slopes, r, weight, fq, fk = tensors[:9]

    def given(g, t):
        return g if t is not None else None

    return (
        dq, dk, dv, given(dtable, table), None,
        given(dr, r), given(dweight, weight), given(dfq, fq), given(dfk, fk),
        *[None] * 9,
    )  # fmt: skip


torch.library.register_autograd(
    "relattn::attention", _backward, setup_context=_setup_context, lib=_LIB
)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        f"backend={ctx.backend!r} does not support double backward (create_graph=True through "
        "attention's gradient); use backend='reference', which is plain autograd"
    )


def _setup_backward_context(ctx, inputs, output):
    ctx.backend = inputs[-2]


torch.library.register_autograd(
    "relattn::attention_backward",
    _no_double_backward,
    setup_context=_setup_backward_context,
    lib=_LIB,
)


def fused_attention(call: Call) -> tuple[Tensor, Tensor]:
    """``(out (B, Hq, Nq, D), lse (B, Hq, Nq))`` of ``call`` through the custom op,
    differentiable in q, k, v, table and the token terms."""
    return _attention(*call.as_args(), call.backend.name, call.tied)
