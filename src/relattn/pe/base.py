"""The contract every additive relative position encoding follows: a table over offsets."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._validate import check_int


class PositionEncoding(nn.Module):
    """An additive relative position term ``PE(i, j) = f_h(i - j)``.

    Subclasses call ``super().__init__(num_heads)`` and implement :meth:`table`; everything
    else (the dense bias for inspection, every backend's fast path and the gradient into the
    module's parameters) is derived from it.

    Args:
        num_heads: H, the number of query heads the encoding serves (a subclass that passes
            None must set ``self.num_heads`` itself).
    """

    num_heads: int

    def __init__(self, num_heads: int | None = None) -> None:
        super().__init__()
        if num_heads is not None:
            self.num_heads = check_int("num_heads", num_heads, min=1)

    def table(self, lo: int, hi: int) -> Tensor:
        """PE for the offsets ``lo .. hi`` (inclusive).

        Returns:
            Tensor of shape ``(H, hi - lo + 1)`` whose column ``t`` holds PE for offset
            ``Δ = lo + t``. Gradients flow from it into the module's parameters.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement table(lo, hi)")

    def closed_form_slopes(self) -> Tensor | None:
        """Per-head slopes ``m_h`` of shape ``(H,)`` when ``PE = -m_h·|Δ|`` exactly and nothing
        about it is learned; kernels then compute the term in closed form instead of reading a
        table. None (the default) means: read the table."""
        return None

    def bias(self, nq: int, nk: int, q_offset: int = 0) -> Tensor:
        """The dense bias, for inspection only (kernels never build it).

        Returns:
            Tensor of shape ``(H, nq, nk)`` with entry ``[h, r, c] = PE_h(q_offset + r - c)``.
        """
        lo, hi = q_offset - (nk - 1), q_offset + nq - 1
        t = self.table(lo, hi)
        delta = offsets_grid(nq, nk, q_offset, device=t.device)
        return t[:, delta - lo]

    def forward(self, lo: int, hi: int) -> Tensor:
        return self.table(lo, hi)


def offsets_grid(nq: int, nk: int, q_offset: int = 0, device=None) -> Tensor:
    """``Δ[r, c] = q_offset + r - c`` as a ``(nq, nk)`` int64 tensor."""
    r = torch.arange(nq, device=device).unsqueeze(1)
    c = torch.arange(nk, device=device).unsqueeze(0)
    return q_offset + r - c


def offsets(lo: int, hi: int, device=None) -> Tensor:
    """The offsets ``lo .. hi`` as an int64 tensor of length ``hi - lo + 1``."""
    if hi < lo:
        raise ValueError(f"table(lo, hi) needs lo <= hi; got lo={lo}, hi={hi}")
    return torch.arange(lo, hi + 1, device=device)
