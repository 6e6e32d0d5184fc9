"""The contract every additive relative position encoding follows: a table over offsets."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class PositionEncoding(nn.Module):
    """An additive relative position term PE(i, j) = f_h(i - j).

    Subclasses implement :meth:`table`; everything else (the dense bias for inspection, the
    fused kernels' fast path) is derived from it.
    """

    num_heads: int

    def table(self, lo: int, hi: int) -> Tensor:
        """PE for the offsets ``lo .. hi`` (inclusive).

        Returns:
            Tensor of shape ``(H, hi - lo + 1)`` whose column ``t`` holds PE for offset
            ``Δ = lo + t``. Gradients flow from it into the module's parameters.
        """
        raise NotImplementedError

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


def check_num_heads(num_heads: int) -> int:
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int; got {num_heads!r}")
    return num_heads
