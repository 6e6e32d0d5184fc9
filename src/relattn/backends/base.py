"""The backend protocol: what every exact attention kernel provides, and nothing more.

A backend receives the rotated q, k, v, the summed encoding table (or the closed-form slopes
of a fixed ALiBi) and the :class:`~relattn.problem.Problem`, and returns the output with its
log-sum-exp; its backward returns dq, dk, dv and the table's gradient
``g[h, Δ] = Σ_{b, i - j = Δ} ∂L/∂score[b, h, i, j]``. Shapes:

    q (B, Hq, Nq, D)   k, v (B, Hkv, Nk, D)   table (Hq, T), column t = offset lo + t
    slopes (Hq,)       out (B, Hq, Nq, D) contiguous, q's dtype
    lse (B, Hq, Nq)    float32 (float64 for float64 inputs), -inf for rows that see no key

``table`` and ``slopes`` are never both given.

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
from typing import ClassVar, Literal

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


class Backend:
    """Base class of the backends; subclass it and :func:`relattn.backends.register` it.

    Attributes:
        name: the ``backend=`` string users pass.
        fused: True if calls run through the custom op (``forward``/``backward``); False for a
            backend that is plain differentiable PyTorch (the reference), called through
            :meth:`attention`.
        layout: the strides its kernel can read q, k, v in (see :class:`Layout`); inputs
            arrive conformed to it. Contiguous by default, which is safe for any native code;
            a backend that handles more declares it and saves its callers the copies.
    """

    name: str = ""
    fused: bool = True
    layout: ClassVar[Layout] = Layout()

    def priority(self, q: Tensor, k: Tensor, problem: Problem) -> float | None:
        """How much ``backend="auto"`` prefers this backend here (higher wins), from static
        facts only (device, dtype, shapes), so dispatch also works under ``torch.compile``.
        None: auto never picks it for these inputs."""
        return None

    def unsupported(self, q: Tensor, k: Tensor, problem: Problem) -> str | None:
        """None if the backend can run these inputs, else the reason, for the user."""
        return None

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        table: Tensor | None,
        slopes: Tensor | None,
        problem: Problem,
    ) -> tuple[Tensor, Tensor]:
        """``(out, lse)``; see the module docstring for shapes."""
        raise NotImplementedError

    def backward(
        self,
        grad_out: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        table: Tensor | None,
        slopes: Tensor | None,
        problem: Problem,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """``(dq, dk, dv, dtable)`` shaped like q, k, v and table (None without a table)."""
        raise NotImplementedError

    def attention(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        table: Tensor | None,
        slopes: Tensor | None,
        problem: Problem,
    ) -> tuple[Tensor, Tensor]:
        """``(out, lse)`` with autograd: through the custom op for a fused backend."""
        from .._custom_op import fused_attention

        return fused_attention(q, k, v, table, slopes, problem, self.name)

    def __repr__(self) -> str:
        return f"<relattn backend {self.name!r}>"
