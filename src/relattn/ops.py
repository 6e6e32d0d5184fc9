"""``attention()`` and ``attention_weights()``: validation, dispatch, and the encoding's table."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from . import backends
from .backends import reference
from .masks import offset_range
from .pe import ALiBi, PositionEncoding, RoPE

PE = PositionEncoding | RoPE | Sequence[PositionEncoding | RoPE] | None

# Below this many scores per head the materializing reference is the fastest path on CPU.
_TINY = 64 * 64
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


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
    """Causal attention with a relative position term.

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
        backend: ``"auto"``, ``"reference"``, ``"chunked"`` or ``"triton"``.
        window: sliding window W: key visible iff ``Δ < W`` (and ``Δ > -W`` if not causal).
        doc_ids: ``(B, Nk)`` integer document id of each key position, each document one
            contiguous run; query r belongs to the document of position ``q_offset + r``.
        key_padding_mask: ``(B, Nk)`` bool, True for real keys.

    Returns:
        ``(B, Hq, Nq, D)`` in q's dtype. A row that sees no key is 0. NaN or Inf in q, k or v
        propagate to the rows that see them (as in any attention); they are not masked.
    """
    args = _prepare(q, k, v, pe, causal, scale, q_offset, window, doc_ids, key_padding_mask)
    q, k, additive, lo, hi, scale, window = args
    name = _choose(backend, q, k)
    if name == "reference":
        table = _table(additive, lo, hi)
        return reference.attention(
            q, k, v, table, lo, scale, causal, q_offset, window, doc_ids, key_padding_mask
        )
    from ._op import fused_attention

    table, slopes = None, None
    if len(additive) == 1 and isinstance(additive[0], ALiBi) and not additive[0].learnable:
        slopes = additive[0].slopes.to(device=q.device, dtype=torch.float32)
    else:
        table = _table(additive, lo, hi)
    out, _ = fused_attention(
        q, k, v, table, slopes, doc_ids, key_padding_mask,
        lo, scale, causal, q_offset, window, name,
    )  # fmt: skip
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
    args = _prepare(q, k, k, pe, causal, scale, q_offset, window, doc_ids, key_padding_mask)
    q, k, additive, lo, hi, scale, window = args
    table = _table(additive, lo, hi)
    _, _, weights = reference.scores_and_weights(
        q, k, table, lo, scale, causal, q_offset, window, doc_ids, key_padding_mask
    )
    return weights


# ----------------------------------------------------------------------------- validation


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _prepare(q, k, v, pe, causal, scale, q_offset, window, doc_ids, key_padding_mask):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if t.dim() != 4:
            dims = "(B, Hq, Nq, D)" if name == "q" else "(B, Hkv, Nk, D)"
            raise ValueError(f"{name} must be 4-D {dims}; got {t.dim()}-D shape {_shape(t)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor; got dtype {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}; got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}; got {t.device}")
    b, hq, nq, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"k and v must have q's batch size {b}; got k {_shape(k)}, v {_shape(v)}")
    if k.shape[3] != d:
        raise ValueError(f"k must have q's head dim D={d}; got k {_shape(k)}")
    if v.shape[1:3] != k.shape[1:3] or v.shape[3] != d:
        raise ValueError(
            f"v must have shape (B, Hkv, Nk, D) = {_shape(k)} like k; got v {_shape(v)}"
        )
    hkv, nk = k.shape[1], k.shape[2]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q's head count Hq must be a multiple of k's Hkv; got Hq={hq}, Hkv={hkv}")
    if nq == 0 or nk == 0 or d == 0:
        raise ValueError(
            f"q and k must be non-empty (Nq, Nk, D >= 1); got q {_shape(q)}, k {_shape(k)}"
        )
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool; got {type(causal).__name__}")
    if isinstance(q_offset, bool) or not isinstance(q_offset, int):
        raise TypeError(f"q_offset must be an int; got {type(q_offset).__name__} {q_offset!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float or None; got {scale!r}")
    scale = float(scale)
    if window is None:
        window = 0
    elif isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be None or an int >= 1; got {window!r}")
    if doc_ids is not None:
        _check_per_key("doc_ids", doc_ids, b, nk, q)
        if doc_ids.dtype.is_floating_point or doc_ids.dtype == torch.bool:
            raise TypeError(f"doc_ids must be an integer tensor; got dtype {doc_ids.dtype}")
        if q_offset < 0 or q_offset + nq > nk:
            raise ValueError(
                "doc_ids gives each query the document of key position q_offset + r, so it "
                f"needs 0 <= q_offset and q_offset + Nq <= Nk; got q_offset={q_offset}, "
                f"Nq={nq}, Nk={nk}"
            )
        runs = (doc_ids[:, 1:] != doc_ids[:, :-1]).sum(1) + 1
        distinct = torch.tensor([row.unique().numel() for row in doc_ids], device=runs.device)
        if bool((runs != distinct).any()):
            raise ValueError("doc_ids must give each document one contiguous run of positions")
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
    return q, k, additive, lo, hi, scale, window


def _check_per_key(name: str, t, b: int, nk: int, q: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, Nk); got {type(t).__name__}")
    if tuple(t.shape) != (b, nk):
        raise ValueError(f"{name} must have shape (B, Nk) = ({b}, {nk}); got {_shape(t)}")
    if t.device != q.device:
        raise ValueError(f"{name} must be on q's device {q.device}; got {t.device}")


def _split_pe(pe, hq: int) -> tuple[RoPE | None, list[PositionEncoding]]:
    items = [] if pe is None else list(pe) if isinstance(pe, (list, tuple)) else [pe]
    rope, additive = None, []
    for item in items:
        if isinstance(item, RoPE):
            if rope is not None:
                raise ValueError("pe may contain at most one RoPE")
            rope = item
        elif isinstance(item, PositionEncoding):
            if item.num_heads != hq:
                raise ValueError(
                    f"pe {type(item).__name__} has num_heads={item.num_heads}; q has Hq={hq} heads"
                )
            additive.append(item)
        else:
            raise TypeError(
                "pe must be None, a relattn.pe encoding, a RoPE, or a list of them; "
                f"got {type(item).__name__}"
            )
    return rope, additive


def _table(additive: list[PositionEncoding], lo: int, hi: int) -> Tensor | None:
    table = None
    for enc in additive:
        t = enc.table(lo, hi)
        table = t if table is None else table + t
    return table


def _choose(backend: str, q: Tensor, k: Tensor) -> str:
    if not isinstance(backend, str) or backend not in backends.names():
        raise ValueError(f"backend must be one of {backends.names()}; got {backend!r}")
    if torch.compiler.is_compiling():
        # Dynamo cannot trace imports: decide from static facts; the custom op itself checks.
        if backend != "auto":
            return backend
        return "triton" if q.device.type == "cuda" and _TRITON_INSTALLED else "chunked"
    if backend != "auto":
        if backend != "reference":
            reason = _why_not(backend, q, k)
            if reason:
                raise RuntimeError(f"backend={backend!r} cannot run this call: {reason}")
        return backend
    if q.device.type == "cuda" and not _why_not("triton", q, k):
        return "triton"
    if q.shape[2] * k.shape[2] <= _TINY and q.device.type == "cpu":
        return "reference"
    if not _why_not("chunked", q, k):
        return "chunked"
    return "reference"


def _why_not(name: str, q: Tensor, k: Tensor) -> str | None:
    """None if backend ``name`` can run on these inputs, else the reason."""
    try:
        module = backends.load(name)
    except RuntimeError as e:
        return str(e)
    check = getattr(module, "unsupported", None)
    return check(q, k) if check is not None else None
