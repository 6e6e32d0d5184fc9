"""The backend protocol: what every exact attention kernel provides, and nothing more.

A backend receives one prepared :class:`Call` (built once by :func:`relattn.call.prepare`):
the rotated q, k, v, the summed encoding table (or the closed-form slopes of a fixed ALiBi),
the :class:`~relattn.problem.Problem` and the backend chosen for it. ``forward(call)`` returns
the output with its log-sum-exp; ``backward(call, grad_out, out, lse)`` returns dq, dk, dv and
the table's gradient ``g[h, Δ] = Σ_{b, i - j = Δ} ∂L/∂score[b, h, i, j]``. Shapes:

    q (B, Hq, Nq, D)   k, v (B, Hkv, Nk, D)   table (Hq, T), column t = offset lo + t
    slopes (Hq,)       out (B, Hq, Nq, D) contiguous, q's dtype
    lse (B, Hq, Nq)    float32 (float64 for float64 inputs), -inf for rows that see no key

``table`` and ``slopes`` are never both given.

Terms that depend on the tokens arrive in ``call.token`` (a :class:`TokenTerms`, or None), in
the compute dtype (float32; float64 for float64 inputs), contiguous, beside the table:

    r (B, Hq, Nq, R)  weight (Hw, R, W), Hw = 1 or Hq    the query-conditioned banded bias
        band(b, h, i, j) = Σ_c r[b, h, i, c] · weight[h or 0, c, Δ]  for 0 <= Δ < W, else 0
    fq (B, Hq, Nq)  fk (B, Hq, Nk)                      the forget gate's cumulative log F
        gate(b, h, i, j) = fq[b, h, i] - fk[b, h, j] for Δ >= 0, fk - fq for Δ < 0

with ``Δ = q_offset + i - j``; the score adds both to ``scale·q·k + table``. A backend with
``token_terms`` computes them inside its tiles and its ``backward`` returns their gradients
after the table's: ``(dq, dk, dv, dtable, dr, dweight, dfq, dfk)`` (None for absent ones).

Layouts: each backend declares in :attr:`Backend.layout` the memory layout its kernel reads
q, k and v in, and :func:`conform` -- the one step every call takes before a backend's
``forward`` or ``backward`` runs -- hands it only tensors that fit: a tensor that fits passes
as it is (a view of the caller's storage), one that does not is copied once (autograd of that
copy returns gradients in the caller's shapes). Tables and slopes always arrive contiguous
(they are small). Backends never write into their inputs: every output is a tensor they
allocate, so overlapping or expanded inputs are read-only and safe to pass where they fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, NamedTuple

import torch
from torch import Tensor

from ..problem import Problem

Need = Literal["strided", "rows", "contiguous"]


@dataclass(frozen=True)
class Layout:
    """What a backend's kernel needs of the strides of q and of k, v.

    Each field is one of:

    * ``"strided"``: any strided tensor (the backend reads through PyTorch ops, which handle
      any strides, storage offsets, stride-0 expansion and aliasing);
    * ``"rows"``: unit stride along the last dim D (each head's rows are dense vectors);
      anything else goes: storage offsets, stride 0 (expanded batch or heads), permuted
      outer dims, overlapping rows, q and k one tensor;
    * ``"contiguous"``: C-contiguous, as :meth:`torch.Tensor.is_contiguous` says.

    PyTorch strides are never negative, so "positive strides" needs no check of its own.
    """

    q: Need = "contiguous"
    kv: Need = "contiguous"


def fits(t: Tensor, need: Need) -> bool:
    """Whether ``t`` can go to a kernel that needs ``need`` as it is."""
    if need == "contiguous":
        return t.is_contiguous()
    if need == "rows":
        return t.shape[-1] <= 1 or t.stride(-1) == 1 or t.numel() == 0
    return True


def conform(
    layout: Layout,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    table: Tensor | None = None,
    slopes: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """q, k, v, table and slopes as ``layout`` (and contiguous tables) need them: each tensor
    that fits is returned as it is, each that does not is copied (``.contiguous()``, which
    autograd differentiates back into the caller's layout). Costs a few stride checks when
    everything fits."""
    if not fits(q, layout.q):
        q = q.contiguous()
    need, given_k = layout.kv, k
    if not fits(k, need):
        k = k.contiguous()
    if v is given_k:  # one tensor as k and v (self-attention's tests do it): copied once
        v = k
    elif not fits(v, need):
        v = v.contiguous()
    if table is not None and not table.is_contiguous():
        table = table.contiguous()
    if slopes is not None and not slopes.is_contiguous():
        slopes = slopes.contiguous()
    return q, k, v, table, slopes


def unreversed(reversed_table: tuple[Tensor, int, int]) -> Tensor:
    """The table ``(Hq, T)`` of a call's ``reversed`` ``(rows, at_lo, T)``: a view flipped back."""
    rows, at_lo, width = reversed_table
    return rows[:, at_lo - width + 1 : at_lo + 1].flip(-1)


class TokenTerms(NamedTuple):
    """The position terms of one call that depend on the tokens (see the module docstring):
    the query-conditioned banded bias ``(r, weight)`` and the forget gate ``(fq, fk)``; each
    pair is both tensors or both None, and at least one pair is given.

    Attributes:
        r: ``(B, Hq, Nq, R)`` each query row's latent, or None.
        weight: ``(Hw, R, W)`` the band's matrix P (``Hw = 1``: shared by the heads), or None.
        fq: ``(B, Hq, Nq)`` F at the query rows' positions ``q_offset + i``, or None.
        fk: ``(B, Hq, Nk)`` F at the key positions, or None.
    """

    r: Tensor | None
    weight: Tensor | None
    fq: Tensor | None
    fk: Tensor | None

    def tensors(self) -> tuple[Tensor, ...]:
        """The tensors given (for conforming and requires_grad checks)."""
        return tuple(t for t in self if t is not None)


class Call(NamedTuple):
    """One attention call, prepared once: validated, rotated, conformed, dispatched.

    Built by :func:`relattn.call.prepare` (and, for context parallelism's blocks, by
    :meth:`relattn.distributed.ring.Plan` and friends), read by every backend, and flattened
    only by :meth:`as_args` (the custom op's arguments) and rebuilt by :meth:`from_args`.

    Attributes:
        q: ``(B, Hq, Nq, D)``, rotated by RoPE, in ``backend.layout``.
        k, v: ``(B, Hkv, Nk, D)``, k rotated, in ``backend.layout``.
        table: ``(Hq, T)`` summed encoding table, column ``t`` offset ``problem.lo + t``; or None.
        slopes: ``(Hq,)`` float32 closed-form ALiBi slopes (``-m·|Δ|``); or None. Never both.
        problem: the masks, scale and alignment (:class:`~relattn.problem.Problem`).
        backend: the backend that runs it (``backends.choose``'s answer).
        lse: whether the caller reads the log-sum-exp (False lets ``forward`` return None
            for it: a no-grad :func:`relattn.attention`).
        reversed: for a backend with ``reads_reversed`` and one query row, when nothing needs
            a gradient: ``(rows (Hq, W), at_lo, T)``, the table's columns in reverse order
            (``rows[:, at_lo - t]`` holds offset ``problem.lo + t`` for ``t < T``, the
            columns the table would have; see
            :meth:`relattn.pe.PositionEncoding.cached_reversed`), given *instead of* ``table``
            (which is then None), so a decoding step neither narrows nor flips the table per
            token. None otherwise.
        token: the terms that depend on the tokens (:class:`TokenTerms`), or None.
        tied: the offset from which the table's columns are one parameter per head to the
            end (:meth:`relattn.pe.PositionEncoding.tied_from` of every encoding that needs a
            gradient), given to a backend with ``tied_runs``: it may return those columns'
            gradient summed into that offset's column and zero after it. None otherwise.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    table: Tensor | None
    slopes: Tensor | None
    problem: Problem
    backend: Backend
    lse: bool = True
    reversed: tuple[Tensor, int, int] | None = None
    token: TokenTerms | None = None
    tied: int | None = None

    def with_table(self) -> Call:
        """This call with ``table`` given (derived from ``reversed`` when that stands in for
        it: ``(Hq, T)``, a view flipped back) and ``reversed`` None; itself otherwise."""
        if self.reversed is None:
            return self
        return self._replace(table=unreversed(self.reversed), reversed=None)

    def as_args(self) -> tuple:
        """The call as the custom op's flat arguments (tensors, ints, floats, bools), in the one
        order :meth:`from_args` reads: ``q, k, v, table, slopes, r, weight, fq, fk, doc_ids,
        key_padding_mask, lo, scale, causal, q_offset, window``; the backend (by name) and
        ``tied`` travel after them (:func:`relattn._custom_op.fused_attention`), the backend by name
        beside them (a ``reversed`` table travels as ``table``, see :meth:`with_table`)."""
        c = self.with_table()
        p = c.problem
        t = c.token or _NO_TOKEN
        return (
            c.q, c.k, c.v, c.table, c.slopes, *t, p.doc_ids, p.key_padding_mask,
            p.lo, p.scale, p.causal, p.q_offset, p.window,
        )  # fmt: skip

    @staticmethod
    def from_args(args: tuple | list, backend: Backend, tied: int | None = None) -> Call:
        """The call :meth:`as_args` flattened (``args``), run by ``backend``, with ``tied``."""
        q, k, v, table, slopes, r, weight, fq, fk = args[:9]
        doc_ids, kpm, lo, scale, causal, q_offset, window = args[9:]
        problem = Problem(lo, scale, causal, q_offset, window, doc_ids, kpm)
        token = None
        if r is not None or fq is not None:
            token = TokenTerms(r, weight, fq, fk)
        return Call(q, k, v, table, slopes, problem, backend, True, None, token, tied)

    def conformed(self) -> Call:
        """This call with q, k, v, table and slopes in ``backend.layout`` (see :func:`conform`)
        and its token terms contiguous; itself when they already fit."""
        if self.token is not None:
            return self.token_conformed()._conformed()
        return self._conformed()

    def _conformed(self) -> Call:
        layout = self.backend.layout
        q, k, v, table, slopes = self.q, self.k, self.v, self.table, self.slopes
        # The common case, nothing to copy, with fits() written out (a decoding step counts
        # each call); conform() below decides otherwise.
        need_q, need_kv = layout.q, layout.kv
        if (
            (
                need_q == "strided"
                or (q.is_contiguous() if need_q == "contiguous" else q.stride(-1) == 1)
            )
            and (
                need_kv == "strided"
                or (
                    k.is_contiguous() and v.is_contiguous()
                    if need_kv == "contiguous"
                    else k.stride(-1) == 1 and v.stride(-1) == 1
                )
            )
            and (table is None or table.is_contiguous())
            and (slopes is None or slopes.is_contiguous())
        ):
            return self
        q, k, v, table, slopes = conform(layout, q, k, v, table, slopes)
        return self._replace(q=q, k=k, v=v, table=table, slopes=slopes)

    def token_conformed(self) -> Call:
        """This call with its token terms' tensors contiguous (every backend reads them so);
        itself when they are or there are none."""
        t = self.token
        if t is None or all(x.is_contiguous() for x in t.tensors()):
            return self
        fixed = TokenTerms(*(x.contiguous() if x is not None else None for x in t))
        return self._replace(token=fixed)

    def stat_dtype(self) -> torch.dtype:
        """The log-sum-exp's dtype: float64 for float64 inputs, else float32."""
        return torch.float64 if self.q.dtype == torch.float64 else torch.float32


_NO_TOKEN = TokenTerms(None, None, None, None)


class Backend:
    """Base class of the backends; subclass it and :func:`relattn.backends.register` it.

    A backend implements :meth:`forward` and :meth:`backward` on a prepared :class:`Call`
    (or, with ``autograd = True``, :meth:`attention`), and says what it can do in attributes
    that dispatch reads; :func:`relattn.backends.choose` is the only place that weighs them.

    Attributes:
        name: the ``backend=`` string users pass.
        layout: the strides its kernel can read q, k, v in (see :class:`Layout`); inputs
            arrive conformed to it. Contiguous by default, which is safe for any native code;
            a backend that handles more declares it and saves its callers the copies.
        autograd: True for a backend written in plain differentiable PyTorch (the reference):
            calls that need a gradient run its :meth:`attention` under autograd. False (the
            default): they run :meth:`forward` behind the custom op, whose backward calls
            :meth:`backward`.
        closed_form: True if the kernel computes a fixed ALiBi's ``-m·|Δ|`` from its slopes
            (``call.slopes``); False: it is always handed the table.
        row_term_from_out: True if :meth:`backward` takes the softmax backward's row term
            ``rowsum(grad_out ∘ out)`` from the ``out`` it is given (context parallelism's
            ring blocks need it; others get a stand-in there).
        context_parallel: True if context parallelism may run its blocks (it needs the
            log-sum-exp of :meth:`forward` to merge them).
        devices: the device types it runs on (None: any). ``auto`` skips it elsewhere.
        dtypes: the dtypes of q it runs (None: any floating dtype).
        top_priority: the highest :meth:`priority` it ever returns (dispatch stops weighing
            backends once no later one can outrank the best so far); unbounded by default.
        reads_reversed: True if :meth:`forward` reads ``call.reversed`` (the table's columns
            in reverse) when a one-row call without gradients comes with it instead of
            ``call.table`` (the decode backend: a generation loop's step).
        token_terms: True if it computes the terms that depend on the tokens
            (``call.token``: the query-conditioned banded bias and the forget gate) and
            returns their gradients; dispatch gives calls with them to no other backend.
        tied_runs: True if it reads ``call.tied`` (the prepared call computes it only then).
    """

    name: str = ""
    layout: ClassVar[Layout] = Layout()
    autograd: ClassVar[bool] = False
    closed_form: ClassVar[bool] = True
    row_term_from_out: ClassVar[bool] = False
    context_parallel: ClassVar[bool] = False
    devices: ClassVar[tuple[str, ...] | None] = None
    dtypes: ClassVar[tuple[torch.dtype, ...] | None] = None
    top_priority: ClassVar[float] = float("inf")
    reads_reversed: ClassVar[bool] = False
    token_terms: ClassVar[bool] = False
    tied_runs: ClassVar[bool] = False

    def priority(self, q: Tensor, k: Tensor, problem: Problem) -> float | None:
        """How much ``backend="auto"`` prefers this backend here (higher wins), from static
        facts only (device, dtype, shapes), so dispatch also works under ``torch.compile``.
        None: auto never picks it for these inputs."""
        return None

    def unsupported(self, q: Tensor, k: Tensor, problem: Problem) -> str | None:
        """None if the backend can run these inputs, else the reason, for the user."""
        return None

    def forward(self, call: Call) -> tuple[Tensor, Tensor]:
        """``(out, lse)``; see the module docstring for shapes (lse may be None when
        ``call.lse`` is False)."""
        raise NotImplementedError

    def backward(
        self, call: Call, grad_out: Tensor, out: Tensor, lse: Tensor
    ) -> tuple[Tensor | None, ...]:
        """``(dq, dk, dv, dtable)`` shaped like q, k, v and table (None without a table);
        with ``call.token``, followed by ``(dr, dweight, dfq, dfk)`` (None for absent ones)."""
        raise NotImplementedError

    def attention(self, call: Call) -> tuple[Tensor, Tensor]:
        """``(out, lse)`` differentiable by plain autograd (backends with ``autograd = True``)."""
        raise NotImplementedError(f"backend {self.name!r} has no autograd-native attention")

    def __repr__(self) -> str:
        return f"<relattn backend {self.name!r}>"
