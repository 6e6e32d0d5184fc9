"""One attention call, prepared once: validate → prepare → choose → kernel.

:func:`prepare` is the one validator of :func:`relattn.attention`,
:func:`relattn.attention_weights`, the decoding step (the same function: a one-token call is
an ordinary call) and, through :func:`check_tensors` and the helpers below,
:func:`relattn.distributed.context_parallel_attention`. It checks every argument, rotates q
and k by RoPE, builds the encoding's summed table (or a fixed ALiBi's closed-form slopes where
the backend computes them), lowers the masks into a :class:`~relattn.problem.Problem`, asks
:func:`relattn.backends.choose` (the one dispatcher) for the backend, and conforms the tensors
to its layout: an immutable :class:`~relattn.backends.base.Call`. :func:`run` hands it to the
backend: directly when nothing needs a gradient, through the custom op (or plain autograd)
otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from . import backends
from ._custom_op import fused_attention
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
from .backends.base import Call, TokenTerms
from .masks import contiguous_documents, offset_range
from .pe import PositionEncoding, RoPE
from .pe.token import BandTerm, ForgetGate, GateTerm, QueryConditionedBias, TokenTerm
from .problem import Problem

__all__ = ["PE", "Call", "check_tensors", "prepare", "run"]

PE = PositionEncoding | RoPE | TokenTerm | Sequence[PositionEncoding | RoPE | TokenTerm] | None


def prepare(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pe: PE = None,
    causal: bool = True,
    scale: float | None = None,
    q_offset: int = 0,
    window: int | None = None,
    doc_ids: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    backend: str = "auto",
    lse: bool = True,
) -> Call:
    """The prepared call of :func:`relattn.attention`'s arguments (see its docstring for
    shapes), or a TypeError / ValueError naming the argument, what it expected and what came.

    ``lse=False``: the caller does not read the log-sum-exp (see :class:`Call`). The arguments
    may be passed by position, in this order (the public functions do: a decoding step counts
    the µs that keyword passing costs).
    """
    # Valid CPU tensors recognised in a few hundred ns (a decoding step counts each call);
    # anything else goes through check_tensors, which says what is wrong.
    qs: tuple[int, ...] = ()
    ks: tuple[int, ...] = ()
    if type(q) is Tensor and type(k) is Tensor and type(v) is Tensor:
        qs, ks = q.shape, k.shape
    if (
        len(qs) == 4
        and v.shape == ks
        and len(ks) == 4
        and q.dtype is k.dtype is v.dtype
        and q.is_floating_point()
        and q.is_cpu
        and k.is_cpu
        and v.is_cpu
        and qs[0] == ks[0]
        and qs[3] == ks[3]
        and ks[1]
        and not qs[1] % ks[1]
        and qs[2]
        and ks[2]
        and qs[3]
    ):
        b, hq, nq, d = qs
        nk = ks[2]
    else:
        b, hq, nq, d, nk = check_tensors(q, k, v)
    if causal is not True:
        check_bool("causal", causal)
    # Offsets q_offset + r - c, and positions q_offset + r, must stay in int64.
    if type(q_offset) is not int or not INT64_MIN + nk <= q_offset <= INT64_MAX - nq:
        q_offset = check_int("q_offset", q_offset, min=INT64_MIN + nk, max=INT64_MAX - nq)
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    elif type(scale) is not float or not math.isfinite(scale):
        scale = check_scale(scale, d)
    w = 0
    if window is not None:
        w = check_optional_int("window", window, min=1) or 0
        if w > max(abs(q_offset + nq - 1), abs(q_offset - nk + 1)):
            w = 0  # wider than any offset of this call: it hides nothing
    if doc_ids is not None:
        check_per_key("doc_ids", doc_ids, b, nk, q, "(B, Nk)")
        _check_doc_ids(doc_ids, nq, nk, q_offset)
    if key_padding_mask is not None:
        check_per_key("key_padding_mask", key_padding_mask, b, nk, q, "(B, Nk)")
    additive: Sequence[PositionEncoding]
    terms: Sequence[TokenTerm] = ()
    if pe is None:
        rope, additive = None, ()
    elif isinstance(pe, PositionEncoding) and getattr(pe, "num_heads", None) == hq:
        rope, additive = None, (pe,)  # split_pe()'s fast path, written out
    else:
        rope, additive, terms = split_pe(pe, hq, d)
    if rope is not None:
        q, k = rope.rotate(q, q_offset), rope.rotate(k, 0)
    if backend != "auto" and not backends.known(backend):
        raise ValueError(f"backend must be one of {backends.names()}; got {backend!r}")
    if causal is True and not w and q_offset >= nk - 1:
        lo, hi = q_offset - nk + 1, q_offset + nq - 1  # every offset >= 0: all visible
    else:
        lo, hi = offset_range(nq, nk, causal, q_offset, w)
    problem = Problem(lo, scale, causal, q_offset, w, doc_ids, key_padding_mask)
    compiling = _compiling()
    if terms:
        token, decay = token_terms(terms, q, nk, q_offset)
        impl = backends.choose(backend, q, k, problem, compiling=compiling, token=True)
        table, slopes = encoding_terms(additive, lo, hi, q, impl.closed_form)
        if decay is not None:
            closed = impl.closed_form and q.dtype != torch.float64  # slopes are float32
            table, slopes = with_decay(table, slopes, decay, lo, hi, closed)
        return Call(q, k, v, table, slopes, problem, impl, lse, None, token).conformed()
    impl = backends.choose(backend, q, k, problem, compiling=compiling)
    if (
        impl.reads_reversed
        and nq == 1
        and len(additive) == 1
        and not compiling
        and not (impl.closed_form and additive[0].closed_form_slopes() is not None)
    ):
        # A generation step's table, kept reversed by the encoding's cache (Call.reversed),
        # if it is a well-formed (Hq, W) table and nothing needs a gradient (the custom op,
        # and autograd, take the table); else the table's own path below, which reports a
        # malformed one (and recomputes one that needs a gradient: rare in a one-row call).
        rows, start = additive[0].cached_reversed(lo, hi)  # rows[:, start + t]: offset hi - t
        if (
            type(rows) is Tensor
            and type(start) is int
            and rows.dim() == 2
            and rows.shape[0] == hq
            and 0 <= start <= rows.shape[1] - (hi - lo + 1)
            and rows.stride(1) == 1
            and rows.is_floating_point()
            and (rows.is_cpu and q.is_cpu or rows.device == q.device)
            and not (
                torch.is_grad_enabled()
                and (rows.requires_grad or q.requires_grad or k.requires_grad or v.requires_grad)
            )
        ):
            reversed_table = rows, start + hi - lo, hi - lo + 1  # the column of offset lo, T
            return Call(q, k, v, None, None, problem, impl, lse, reversed_table).conformed()
    table, slopes = encoding_terms(additive, lo, hi, q, impl.closed_form)
    tied = None
    # Not under torch.compile: finding the run reads index values (a data-dependent branch);
    # compiled calls take the backend's general path.
    if impl.tied_runs and table is not None and torch.is_grad_enabled() and not compiling:
        tied = tied_offset(additive, lo, hi)
    return Call(q, k, v, table, slopes, problem, impl, lse, None, None, tied).conformed()


def run(call: Call) -> tuple[Tensor, Tensor | None]:
    """``(out (B, Hq, Nq, D), lse (B, Hq, Nq) or None)`` of a prepared call: the backend's
    :meth:`~Backend.forward` when no gradient is needed (no custom op dispatch, about 20 µs),
    its autograd :meth:`~Backend.attention` for an autograd-native backend, else the custom op
    (whose backward calls :meth:`~Backend.backward`; torch.compile traces it as one node)."""
    impl = call.backend
    if impl.autograd:
        return impl.attention(call)
    if not (torch.is_grad_enabled() and _requires_grad(call)) and not _compiling():
        out, lse = impl.forward(call)
        return out.contiguous(), lse
    return fused_attention(call)


_compiling = torch.compiler.is_compiling


def _requires_grad(call: Call) -> bool:
    t = call.table
    return (
        call.q.requires_grad
        or call.k.requires_grad
        or call.v.requires_grad
        or (t is not None and t.requires_grad)
        or (call.token is not None and any(x.requires_grad for x in call.token.tensors()))
    )


# ----------------------------------------------------------------------------- the checks


def check_tensors(q: Tensor, k: Tensor, v: Tensor) -> tuple[int, int, int, int, int]:
    """``(B, Hq, Nq, D, Nk)`` of valid q ``(B, Hq, Nq, D)``, k, v ``(B, Hkv, Nk, D)``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if t.dim() != 4:
            dims = "(B, Hq, Nq, D)" if name == "q" else "(B, Hkv, Nk, D)"
            raise ValueError(f"{name} must be 4-D {dims}; got {t.dim()}-D shape {shape_str(t)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor; got dtype {t.dtype}")
    dtype = q.dtype
    if k.dtype != dtype or v.dtype != dtype:
        name, t = ("k", k) if k.dtype != dtype else ("v", v)
        raise TypeError(f"{name} must have q's dtype {dtype}; got {t.dtype}")
    if not (q.is_cpu and k.is_cpu and v.is_cpu):  # is_cpu: 50 ns; device ==: 160
        for name, t in (("k", k), ("v", v)):
            if t.device != q.device:
                raise ValueError(f"{name} must be on q's device {q.device}; got {t.device}")
    b, hq, nq, d = q.shape
    kb, hkv, nk, kd = k.shape
    if kb != b or v.shape[0] != b:
        raise ValueError(
            f"k and v must have q's batch size {b}; got k {shape_str(k)}, v {shape_str(v)}"
        )
    if kd != d:
        raise ValueError(f"k must have q's head dim D={d}; got k {shape_str(k)}")
    if v.shape != k.shape:
        raise ValueError(
            f"v must have shape (B, Hkv, Nk, D) = {shape_str(k)} like k; got v {shape_str(v)}"
        )
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q's head count Hq must be a multiple of k's Hkv; got Hq={hq}, Hkv={hkv}")
    if nq == 0 or nk == 0 or d == 0:
        raise ValueError(
            f"q and k must be non-empty (Nq, Nk, D >= 1); got q {shape_str(q)}, k {shape_str(k)}"
        )
    return b, hq, nq, d, nk


def check_scale(scale: object, d: int) -> float:
    """``scale`` as a finite float (None: ``1/√D``)."""
    if scale is None:
        return 1.0 / math.sqrt(d)
    if type(scale) is float and math.isfinite(scale):
        return scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a finite float or None; got {show(scale)}")
    if not _finite(scale):
        raise ValueError(f"scale must be a finite float or None; got {repr(scale)[:60]}")
    return float(scale)


def _finite(x: float) -> bool:
    try:
        return math.isfinite(float(x))
    except OverflowError:  # an int beyond float's range
        return False


def check_per_key(name: str, t: object, b: int, nk: int, q: Tensor, shape: str) -> None:
    """A valid per-key mask ``t`` of shape ``(b, nk)`` (``shape`` names it) on q's device:
    doc_ids an integer tensor, key_padding_mask a bool one."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape}; got {type(t).__name__}")
    if tuple(t.shape) != (b, nk):
        what = "be this rank's shard, shape" if "/" in shape else "have shape"
        raise ValueError(f"{name} must {what} {shape} = ({b}, {nk}); got {shape_str(t)}")
    if t.device != q.device:
        raise ValueError(f"{name} must be on q's device {q.device}; got {t.device}")
    if name == "doc_ids" and not is_integer_dtype(t.dtype):
        raise TypeError(f"doc_ids must be an integer tensor; got dtype {t.dtype}")
    if name == "key_padding_mask" and t.dtype != torch.bool:
        raise TypeError(
            f"key_padding_mask must be a bool tensor (True = real token); got dtype {t.dtype}"
        )


def _check_doc_ids(doc_ids: Tensor, nq: int, nk: int, q_offset: int) -> None:
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


def split_pe(
    pe: PE, hq: int, d: int
) -> tuple[RoPE | None, list[PositionEncoding], list[TokenTerm]]:
    """``(the RoPE or None, the additive encodings, the token terms)`` of ``pe``, each checked
    against q's ``Hq`` heads and head dim ``D`` (at most one term of each kind)."""
    if pe is None:
        return None, [], []
    if isinstance(pe, PositionEncoding) and getattr(pe, "num_heads", None) == hq:
        return None, [pe], []
    items = list(pe) if isinstance(pe, (list, tuple)) else [pe]
    rope: RoPE | None = None
    additive: list[PositionEncoding] = []
    terms: list[TokenTerm] = []
    for item in items:
        if isinstance(item, RoPE):
            if rope is not None:
                raise ValueError("pe may contain at most one RoPE")
            rope = item
        elif isinstance(item, TokenTerm):
            if item.num_heads != hq:
                raise ValueError(
                    f"pe {type(item).__name__} has {item.num_heads} heads; q has Hq={hq} heads"
                )
            if any(type(t) is type(item) for t in terms):
                raise ValueError(f"pe may contain at most one {type(item).__name__}")
            terms.append(item)
        elif isinstance(item, PositionEncoding):
            heads = getattr(item, "num_heads", None)
            if heads != hq:
                raise ValueError(
                    f"pe {type(item).__name__} has num_heads={heads!r}; q has Hq={hq} heads"
                )
            additive.append(item)
        else:
            if isinstance(item, QueryConditionedBias):
                hint = " (call the QueryConditionedBias with r: pe=qcb(r))"
            elif isinstance(item, ForgetGate):
                hint = " (call the ForgetGate with log_f: pe=ForgetGate()(log_f))"
            else:
                hint = ""
            raise TypeError(
                "pe must be None, a relattn.pe encoding, a RoPE, a term such as "
                f"QueryConditionedBias(...)(r), or a list of them; got {type(item).__name__}" + hint
            )
    if rope is not None and rope.head_dim != d:
        raise ValueError(f"pe RoPE has head_dim={rope.head_dim}; q has D={d}")
    return rope, additive, terms


def token_terms(
    terms: Sequence[TokenTerm], q: Tensor, nk: int, q_offset: int, detrend: bool = True
) -> tuple[TokenTerms, Tensor | None]:
    """``(the call's TokenTerms, decay)`` from the terms in ``pe``, checked against q
    ``(B, Hq, Nq, D)``, the ``nk`` keys and ``q_offset``, in the compute dtype (float32;
    float64 for float64 q).

    The forget gate's F is handed over *detrended*: with ``m_h`` its mean slope per head over
    the keys (``-(F[Nk-1] - F[0]) / (Nk - 1)``, averaged over the batch, no gradient),
    ``fk[j] = F[j] + m_h·j`` and ``fq`` likewise at the queries' positions, and ``decay =
    m (Hq,)``, which the caller adds as the ALiBi term ``-m_h·|Δ|`` (:func:`with_decay`). The
    sum is exactly ``F_i - F_j`` (``F_j - F_i`` for keys after the query), but the kernels'
    float32 operands stay small where F itself grows without bound (a long sequence of gates
    below 1: ``|F|`` in the thousands), so a nearby key's term keeps its digits. The
    subtraction runs in float64 on F as the encoding gives it. ``detrend=False`` (context
    parallelism, whose shards' F are made global afterwards): F as it is, decay None."""
    b, hq, nq = q.shape[0], q.shape[1], q.shape[2]
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    r = weight = fq = fk = None
    decay: Tensor | None = None
    for term in terms:
        if isinstance(term, BandTerm):
            r, weight = term.r, term.weight
            if r.shape[0] != b or r.shape[2] != nq:
                raise ValueError(
                    f"r must have shape (B, Hq, Nq, rank) = ({b}, {hq}, {nq}, {term.rank}) "
                    f"like q's rows; got {shape_str(r)}"
                )
            if r.device != q.device:
                raise ValueError(f"r must be on q's device {q.device}; got {r.device}")
            r, weight = r.to(dt), weight.to(dt)
            if weight.dim() == 2:
                weight = weight.unsqueeze(0)
        elif isinstance(term, GateTerm):
            f = term.cumulative
            if f.shape[0] != b or f.shape[2] != nk:
                raise ValueError(
                    f"log_f must have shape (B, Hq, Nk) = ({b}, {hq}, {nk}), one value per key "
                    f"position; got {shape_str(f)}"
                )
            if q_offset < 0 or q_offset + nq > nk:
                raise ValueError(
                    "the forget gate takes each query's F at key position q_offset + r, so it "
                    f"needs 0 <= q_offset and q_offset + Nq <= Nk; got q_offset={q_offset}, "
                    f"Nq={nq}, Nk={nk}"
                )
            if f.device != q.device:
                raise ValueError(f"log_f must be on q's device {q.device}; got {f.device}")
            wide = f.to(torch.float64)
            if nk > 1 and detrend:
                with torch.no_grad():
                    span = (wide[:, :, -1] - wide[:, :, 0]).mean(0)  # (Hq,), <= 0
                    decay = (-span / (nk - 1)).clamp(min=0.0)
                positions = torch.arange(nk, dtype=torch.float64, device=f.device)
                wide = wide + decay[:, None] * positions
            fk = wide.to(dt)
            fq = fk[:, :, q_offset : q_offset + nq]
        else:
            raise TypeError(f"pe {type(term).__name__} is a token term no backend knows")
    return TokenTerms(r, weight, fq, fk), decay


def with_decay(
    table: Tensor | None,
    slopes: Tensor | None,
    decay: Tensor,
    lo: int,
    hi: int,
    closed_form: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """The call's table or slopes with ``-decay_h·|Δ|`` added (the forget gate's trend, see
    :func:`token_terms`): as slopes (float32) where ``closed_form`` (the backend computes them
    and the inputs are not float64), added to fixed ALiBi slopes or on their own; else added
    to the table over ``lo .. hi`` (a new float64 one if there is none: backends read tables in
    their compute dtype)."""
    if closed_form and table is None:
        return None, decay.to(torch.float32) + (slopes if slopes is not None else 0.0)
    offsets = torch.arange(lo, hi + 1, dtype=torch.float64, device=decay.device)
    trend = -decay[:, None] * offsets.abs()  # (Hq, T)
    if slopes is not None:  # fixed ALiBi slopes for a backend that reads tables
        trend = trend - slopes.to(torch.float64)[:, None] * offsets.abs()
    if table is None:
        return trend, None
    return table + trend.to(table.dtype), None


def encoding_terms(
    additive: Sequence[PositionEncoding], lo: int, hi: int, q: Tensor, closed_form: bool
) -> tuple[Tensor | None, Tensor | None]:
    """``(table (Hq, hi - lo + 1) or None, slopes (Hq,) or None)``: a fixed ALiBi's slopes
    where ``closed_form`` (the backend computes ``-m·|Δ|``) and it is the only encoding, else
    the summed table, each encoding's checked once per call."""
    if closed_form and len(additive) == 1:
        slopes = additive[0].closed_form_slopes()
        if slopes is not None:
            return None, slopes.detach().to(device=q.device, dtype=torch.float32)
    table = None
    for enc in additive:
        t = checked_table(enc, enc.cached_table(lo, hi), lo, hi, q)
        table = t if table is None else table + t
    return table, None


def tied_offset(additive: Sequence[PositionEncoding], lo: int, hi: int) -> int | None:
    """The offset from which the summed table's columns are one parameter per head in every
    encoding whose parameters need a gradient (the largest of their
    :meth:`~relattn.pe.PositionEncoding.tied_from`), or None: None as soon as one such
    encoding promises nothing, or when none needs a gradient."""
    tied = None
    for enc in additive:
        if not any(p.requires_grad for p in enc.parameters()):
            continue  # its gradient is never read
        t = enc.tied_from(lo, hi)
        if t is None:
            return None
        if type(t) is not int or not lo <= t <= hi:
            name = type(enc).__name__
            raise ValueError(
                f"pe {name}.tied_from({lo}, {hi}) must return None or an int offset in "
                f"[{lo}, {hi}]; got {t!r}"
            )
        tied = t if tied is None else max(tied, t)
    return tied


def checked_table(enc: PositionEncoding, t: object, lo: int, hi: int, q: Tensor) -> Tensor:
    """``t``, what ``enc.table(lo, hi)`` returned, if it is a floating ``(Hq, hi - lo + 1)``
    tensor on q's device; else a TypeError or ValueError naming the encoding (a custom
    encoding's wrong width would otherwise be read past its end by the kernels)."""
    if (
        type(t) is Tensor
        and t.shape == (q.shape[1], hi - lo + 1)
        and t.is_floating_point()
        and (t.is_cpu and q.is_cpu or t.device == q.device)
    ):
        return t
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
