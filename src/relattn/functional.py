"""``attention()`` and ``attention_weights()``: validation, the encoding's table, dispatch.

Shapes: ``B`` batch, ``Hq`` query heads, ``Hkv`` key/value heads (``Hq`` a multiple of it),
``Nq`` query rows, ``Nk`` keys, ``D`` head dim. Query row r sits at position ``q_offset + r``,
key column c at position c, and the encoding sees ``Δ = q_offset + r - c``::

    Nq = 3, Nk = 5, q_offset = 2 (decoding 3 new tokens after 2 cached ones), causal:
            keys c = 0 1 2 3 4
    row 0 (pos 2)   ■ ■ ■ · ·
    row 1 (pos 3)   ■ ■ ■ ■ ·
    row 2 (pos 4)   ■ ■ ■ ■ ■
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from . import backends
from ._validate import (
    INT64_MAX,
    INT64_MIN,
    check_bool,
    check_int,
    check_optional_int,
    is_integer_dtype,
    shape_str,
    show,
)
from .backends import decode, reference
from .backends.base import conform
from .masks import contiguous_documents, offset_range
from .pe import PositionEncoding, RoPE
from .problem import Problem

__all__ = ["PE", "attention", "attention_weights"]

PE = PositionEncoding | RoPE | Sequence[PositionEncoding | RoPE] | None


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pe: PE = None,
    *,
    causal: bool = True,
    scale: float | None = None,
    q_offset: int = 0,
    backend: str = "auto",
    window: int | None = None,
    doc_ids: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """Attention with a relative position term.

        α(i, j) = softmax_j( scale·q_i·k_j + PE(i, j) + Mask(i, j) ),   out_i = Σ_j α(i, j)·v_j

    Args:
        q: ``(B, Hq, Nq, D)``.
        k, v: ``(B, Hkv, Nk, D)``; ``Hq`` a multiple of ``Hkv`` (GQA / MQA).
        pe: None, an additive encoding from :mod:`relattn.pe`, a :class:`~relattn.pe.RoPE`, or a
            sequence of them (RoPE rotates q and k; additive tables are summed).
        causal: mask keys after the query (``Δ < 0``).
        scale: multiplies ``q·k`` only; default ``1/√D``.
        q_offset: position of query row 0 minus that of key 0 (``Nk - Nq`` when decoding
            with a cache). PE sees ``Δ = q_offset + r - c``.
        backend: ``"auto"`` or a name from :func:`relattn.backends.names`.
        window: sliding window W: key visible iff ``Δ < W`` (and ``Δ > -W`` if not causal).
        doc_ids: ``(B, Nk)`` integer document id of each key position, each document one
            contiguous run; query r belongs to the document of position ``q_offset + r``.
        key_padding_mask: ``(B, Nk)`` bool, True for real keys.

    Returns:
        ``(B, Hq, Nq, D)`` in q's dtype, contiguous. A row that sees no key is 0. Finite inputs
        whose scores ``scale·q·k + PE`` are finite give finite outputs; NaN or Inf in q, k or
        v propagate to the rows that see them (as in any attention); they are not masked.
    """
    if doc_ids is None and key_padding_mask is None and window is None:
        out = _decode_step(q, k, v, pe, causal, scale, q_offset, backend)
        if out is not None:
            return out
    q, k, additive, problem, hi = _prepare(
        q, k, v, pe, causal, scale, q_offset, window, doc_ids, key_padding_mask
    )
    if not isinstance(backend, str) or backend not in backends.names():
        raise ValueError(f"backend must be one of {backends.names()}; got {backend!r}")
    impl = backends.choose(backend, q, k, problem)
    slopes = _closed_form(additive, q) if impl.fused else None
    table = None if slopes is not None else _table(additive, problem.lo, hi, q)
    # The layout the backend's kernel reads (the one place a call's tensors are conformed; the
    # custom op and context parallelism's blocks repeat it, a no-op on tensors that fit).
    q, k, v, table, slopes = conform(impl.layout, q, k, v, table, slopes)
    out, _ = impl.attention(q, k, v, table, slopes, problem)
    return out


def attention_weights(
    q: Tensor,
    k: Tensor,
    pe: PE = None,
    *,
    causal: bool = True,
    scale: float | None = None,
    q_offset: int = 0,
    window: int | None = None,
    doc_ids: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """The attention weights α, for inspection (materialized by the reference).

    Args: as :func:`attention`, with ``q: (B, Hq, Nq, D)``, ``k: (B, Hkv, Nk, D)``.

    Returns:
        ``(B, Hq, Nq, Nk)`` in float32 (float64 for float64 input); rows sum to 1, or are 0 for
        rows that see no key.
    """
    q, k, additive, problem, hi = _prepare(
        q, k, k, pe, causal, scale, q_offset, window, doc_ids, key_padding_mask
    )
    table = _table(additive, problem.lo, hi, q)
    _, _, weights = reference.scores_and_weights(q, k, table, None, problem)
    return weights


# ----------------------------------------------------------------------------- one token

_STEP_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _decode_step(q, k, v, pe, causal, scale, q_offset, backend) -> Tensor | None:
    """A generation loop's call, answered with a few µs of Python rather than ~40: one query
    row on the CPU at position ``Nk - 1`` or later, causal, every key visible, no autograd, at
    most one additive encoding, ``backend`` ``"auto"`` or ``"decode"`` (and, once a user has
    registered a backend, only where dispatch still picks decode). The checks below only
    recognise that case (anything unusual, including every invalid argument, returns None and
    takes the general path, which validates and reports); the answer is the decode backend's,
    computed from the same cached table, so it is bit for bit what the general path returns.
    """
    if causal is not True or (backend != "auto" and backend != "decode"):
        return None
    if type(q) is not Tensor or type(k) is not Tensor or type(v) is not Tensor:
        return None
    if q.dim() != 4 or k.dim() != 4 or q.shape[2] != 1 or k.shape != v.shape:
        return None
    b, hq, _, d = q.shape
    kb, hkv, nk, kd = k.shape
    if kb != b or kd != d or hkv == 0 or hq % hkv or nk == 0 or d == 0 or b == 0:
        return None
    if (
        not (q.is_cpu and k.is_cpu and v.is_cpu)  # is_cpu: 50 ns; device.type: 280
        or q.dtype not in _STEP_DTYPES
        or k.dtype != q.dtype
        or v.dtype != q.dtype
    ):
        return None
    if type(q_offset) is not int or not nk - 1 <= q_offset <= _STEP_MAX_OFFSET:
        return None
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    elif type(scale) is not float or not math.isfinite(scale):
        return None
    grad = torch.is_grad_enabled()
    if grad and (q.requires_grad or k.requires_grad or v.requires_grad):
        return None
    if torch.compiler.is_compiling():
        return None  # compile traces the general path
    if backends.customized:  # a registered backend may outrank decode: let auto decide
        problem = Problem(q_offset - nk + 1, float(scale), True, q_offset, 0, None, None)
        if backends.choose(backend, q, k, problem) is not decode.BACKEND:
            return None
    if pe is None:
        return _step(q, k, v, None, 0, scale)
    if not isinstance(pe, PositionEncoding) or getattr(pe, "num_heads", None) != hq:
        return None
    lo = q_offset - nk + 1
    if type(pe).cached_table is PositionEncoding.cached_table:
        rows, start = pe._cached(lo, q_offset, True)  # kept reversed: no flip per token
    else:
        rows, start = pe.cached_table(lo, q_offset), 0
        if type(rows) is not Tensor or rows.shape != (hq, nk):
            return None
        rows = rows.flip(-1)
    if (
        type(rows) is not Tensor
        or rows.dim() != 2
        or rows.shape[0] != hq
        or rows.shape[1] - start < nk
        or start < 0
        or rows.stride(1) != 1
        or not rows.is_floating_point()
        or not rows.is_cpu
        or (grad and rows.requires_grad)
    ):
        return None
    return _step(q, k, v, rows, start, scale)


def _step(q: Tensor, k: Tensor, v: Tensor, rows: Tensor | None, start: int, scale: float):
    """:func:`decode.step`, which checks the strides itself (one check per token); inputs it
    cannot read are conformed to the decode backend's layout (copied) and tried again."""
    try:
        return decode.step(q, k, v, rows, start, scale)
    except decode.LayoutError:
        q, k, v, _, _ = conform(decode.BACKEND.layout, q, k, v)
        return decode.step(q, k, v, rows, start, scale)


# Positions up to 2^62: offsets and q_offset + 1 stay far inside int64 (the general path's bound).
_STEP_MAX_OFFSET = 1 << 62


# ----------------------------------------------------------------------------- validation


def _prepare(q, k, v, pe, causal, scale, q_offset, window, doc_ids, key_padding_mask):
    """Check every argument; rotate q, k by RoPE; return ``(q, k, additive, problem, hi)``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if t.dim() != 4:
            dims = "(B, Hq, Nq, D)" if name == "q" else "(B, Hkv, Nk, D)"
            raise ValueError(f"{name} must be 4-D {dims}; got {t.dim()}-D shape {shape_str(t)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor; got dtype {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}; got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}; got {t.device}")
    b, hq, nq, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(
            f"k and v must have q's batch size {b}; got k {shape_str(k)}, v {shape_str(v)}"
        )
    if k.shape[3] != d:
        raise ValueError(f"k must have q's head dim D={d}; got k {shape_str(k)}")
    if v.shape[1:3] != k.shape[1:3] or v.shape[3] != d:
        raise ValueError(
            f"v must have shape (B, Hkv, Nk, D) = {shape_str(k)} like k; got v {shape_str(v)}"
        )
    hkv, nk = k.shape[1], k.shape[2]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q's head count Hq must be a multiple of k's Hkv; got Hq={hq}, Hkv={hkv}")
    if nq == 0 or nk == 0 or d == 0:
        raise ValueError(
            f"q and k must be non-empty (Nq, Nk, D >= 1); got q {shape_str(q)}, k {shape_str(k)}"
        )
    check_bool("causal", causal)
    # Offsets q_offset + r - c, and positions q_offset + r, must stay in int64.
    q_offset = check_int("q_offset", q_offset, min=INT64_MIN + nk, max=INT64_MAX - nq)
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a finite float or None; got {show(scale)}")
    elif not _finite(scale):
        raise ValueError(f"scale must be a finite float or None; got {repr(scale)[:60]}")
    window = check_optional_int("window", window, min=1) or 0
    if window > max(abs(q_offset + nq - 1), abs(q_offset - nk + 1)):
        window = 0  # wider than any offset of this call: it hides nothing
    if doc_ids is not None:
        _check_doc_ids(doc_ids, b, nq, nk, q_offset, q)
    if key_padding_mask is not None:
        _check_per_key("key_padding_mask", key_padding_mask, b, nk, q)
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(
                f"key_padding_mask must be a bool tensor (True = real token); "
                f"got dtype {key_padding_mask.dtype}"
            )
    rope, additive = _split_pe(pe, hq)
    if rope is not None:
        if rope.head_dim != d:
            raise ValueError(f"pe RoPE has head_dim={rope.head_dim}; q has D={d}")
        q, k = rope.rotate(q, q_offset), rope.rotate(k, 0)
    lo, hi = offset_range(nq, nk, causal, q_offset, window)
    problem = Problem(lo, float(scale), causal, q_offset, window, doc_ids, key_padding_mask)
    return q, k, additive, problem, hi


def _finite(x: float) -> bool:
    try:
        return math.isfinite(float(x))
    except OverflowError:  # an int beyond float's range
        return False


def _check_per_key(name: str, t, b: int, nk: int, q: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, Nk); got {type(t).__name__}")
    if tuple(t.shape) != (b, nk):
        raise ValueError(f"{name} must have shape (B, Nk) = ({b}, {nk}); got {shape_str(t)}")
    if t.device != q.device:
        raise ValueError(f"{name} must be on q's device {q.device}; got {t.device}")


def _check_doc_ids(doc_ids, b: int, nq: int, nk: int, q_offset: int, q: Tensor) -> None:
    _check_per_key("doc_ids", doc_ids, b, nk, q)
    if not is_integer_dtype(doc_ids.dtype):
        raise TypeError(f"doc_ids must be an integer tensor; got dtype {doc_ids.dtype}")
    if q_offset < 0 or q_offset + nq > nk:
        raise ValueError(
            "doc_ids gives each query the document of key position q_offset + r, so it "
            f"needs 0 <= q_offset and q_offset + Nq <= Nk; got q_offset={q_offset}, "
            f"Nq={nq}, Nk={nk}"
        )
    if torch.compiler.is_compiling():
        return  # data-dependent: checked in eager calls only (documented in the README)
    ok = contiguous_documents(doc_ids)
    message = "doc_ids must give each document one contiguous run of positions"
    if doc_ids.device.type == "cpu":
        if not bool(ok):
            raise ValueError(message)
    else:
        torch._assert_async(ok, message)  # no host sync on accelerators


def _split_pe(pe, hq: int) -> tuple[RoPE | None, list[PositionEncoding]]:
    items = [] if pe is None else list(pe) if isinstance(pe, (list, tuple)) else [pe]
    rope, additive = None, []
    for item in items:
        if isinstance(item, RoPE):
            if rope is not None:
                raise ValueError("pe may contain at most one RoPE")
            rope = item
        elif isinstance(item, PositionEncoding):
            heads = getattr(item, "num_heads", None)
            if heads != hq:
                raise ValueError(
                    f"pe {type(item).__name__} has num_heads={heads!r}; q has Hq={hq} heads"
                )
            additive.append(item)
        else:
            raise TypeError(
                "pe must be None, a relattn.pe encoding, a RoPE, or a list of them; "
                f"got {type(item).__name__}"
            )
    return rope, additive


def _table(additive: list[PositionEncoding], lo: int, hi: int, q: Tensor) -> Tensor | None:
    """The summed table ``(Hq, hi - lo + 1)``, each encoding's checked once per call."""
    table = None
    for enc in additive:
        t = checked_table(enc, enc.cached_table(lo, hi), lo, hi, q)
        table = t if table is None else table + t
    return table


def checked_table(enc: PositionEncoding, t: object, lo: int, hi: int, q: Tensor) -> Tensor:
    """``t``, what ``enc.table(lo, hi)`` returned, if it is a floating ``(Hq, hi - lo + 1)``
    tensor on q's device; else a TypeError or ValueError naming the encoding (a custom
    encoding's wrong width would otherwise be read past its end by the kernels)."""
    expected = (q.shape[1], hi - lo + 1)
    name = type(enc).__name__
    if not isinstance(t, Tensor):
        raise TypeError(f"pe {name}.table(lo, hi) must return a Tensor; got {type(t).__name__}")
    if tuple(t.shape) != expected:
        raise ValueError(
            f"pe {name}.table({lo}, {hi}) must return shape (H, hi - lo + 1) = {expected}; "
            f"got {shape_str(t)}"
        )
    if not t.is_floating_point():
        raise TypeError(f"pe {name}.table must return a floating tensor; got {t.dtype}")
    if t.device != q.device:
        raise ValueError(
            f"pe {name}.table returned a tensor on {t.device}; q is on {q.device} "
            "(move the encoding with .to(device))"
        )
    return t


def _closed_form(additive: list[PositionEncoding], q: Tensor) -> Tensor | None:
    """Per-head slopes when the only encoding is exactly ``-m·|Δ|`` and fixed, else None."""
    if len(additive) != 1:
        return None
    slopes = additive[0].closed_form_slopes()
    if slopes is None:
        return None
    return slopes.detach().to(device=q.device, dtype=torch.float32)
