"""A free learnable scalar per head per offset (Shaw et al., 2018, scalar form)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._validate import check_bool, check_int
from .base import PositionEncoding, offsets, tied_run_start
from .registry import Param, register


@register(
    "offset",
    description="a free learnable scalar per head per offset, clipped (Shaw et al. 2018)",
    learnable=True,
    params=(Param("max_offset", int, 128, "largest offset with its own parameter"),),
)
class OffsetBias(PositionEncoding):
    """``PE(i, j) = u_h[clip(i - j, 0, max_offset)]``: one parameter per head per offset.

    Offsets beyond ``max_offset`` share the last parameter. Negative offsets (keys after the
    query, only seen with ``causal=False``) use ``u_h[|Δ|]`` (symmetric) unless
    ``bidirectional=True``, which gives them their own ``max_offset`` parameters.

    Args:
        num_heads: H.
        max_offset: the largest offset with a parameter of its own.
        bidirectional: separate parameters for negative offsets.
    """

    def __init__(self, num_heads: int, max_offset: int = 128, bidirectional: bool = False) -> None:
        super().__init__(num_heads)
        # Beyond 2^24 parameters per head the table is a model of its own, not a bias.
        self.max_offset = check_int("max_offset", max_offset, min=0, max=1 << 24)
        self.bidirectional = check_bool("bidirectional", bidirectional)
        n = 2 * max_offset + 1 if bidirectional else max_offset + 1
        self.weight = nn.Parameter(torch.zeros(num_heads, n))
        nn.init.normal_(self.weight, std=0.02)

    def index(self, delta: Tensor) -> Tensor:
        """Column of ``weight`` used by each offset."""
        m = self.max_offset
        if self.bidirectional:
            return delta.clamp(-m, m) + m
        return delta.abs().clamp(max=m)

    def table(self, lo: int, hi: int) -> Tensor:
        return self.weight[:, self.index(offsets(lo, hi, device=self.weight.device))]

    def tied_from(self, lo: int, hi: int) -> int | None:
        """The offsets past ``max_offset`` share its parameter: where that run starts."""
        return tied_run_start(self.index(offsets(lo, hi)), lo)

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, max_offset={self.max_offset}, "
            f"bidirectional={self.bidirectional}"
        )
