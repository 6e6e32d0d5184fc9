"""The backend protocol: what every exact attention kernel provides, and nothing more.

A backend receives the rotated q, k, v, the summed encoding table (or the closed-form slopes
of a fixed ALiBi) and the :class:`~relattn.problem.Problem`, and returns the output with its
log-sum-exp; its backward returns dq, dk, dv and the table's gradient
``g[h, Δ] = Σ_{b, i - j = Δ} ∂L/∂score[b, h, i, j]``. Shapes:

    q (B, Hq, Nq, D)   k, v (B, Hkv, Nk, D)   table (Hq, T), column t = offset lo + t
    slopes (Hq,)       out (B, Hq, Nq, D) contiguous, q's dtype
    lse (B, Hq, Nq)    float32 (float64 for float64 inputs), -inf for rows that see no key

``table`` and ``slopes`` are never both given.
"""

from __future__ import annotations

from torch import Tensor

from ..problem import Problem


class Backend:
    """Base class of the backends; subclass it and :func:`relattn.backends.register` it.

    Attributes:
        name: the ``backend=`` string users pass.
        fused: True if calls run through the custom op (``forward``/``backward``); False for a
            backend that is plain differentiable PyTorch (the reference), called through
            :meth:`attention`.
    """

    name: str = ""
    fused: bool = True

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
