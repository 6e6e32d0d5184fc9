"""ALiBi: a linear penalty on distance with fixed per-head slopes (Press et al., 2022)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import PositionEncoding, check_num_heads, offsets


def alibi_slopes(num_heads: int) -> list[float]:
    """The ALiBi paper's head slopes: a geometric sequence starting at ``2^(-8/n)``.

    For a head count that is not a power of two, the paper takes the slopes of the closest
    smaller power of two and fills the rest with every other slope of twice that count.
    """

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if num_heads & (num_heads - 1) == 0:
        return power_of_two(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return power_of_two(closest) + power_of_two(2 * closest)[0::2][: num_heads - closest]


class ALiBi(PositionEncoding):
    """``PE(i, j) = -m_h · |i - j|`` with the paper's slopes ``m_h``.

    Args:
        num_heads: H.
        learnable: make the slopes parameters (kept as given; no positivity constraint is
            imposed, so training may flip a head's sign).
    """

    def __init__(self, num_heads: int, learnable: bool = False) -> None:
        super().__init__()
        self.num_heads = check_num_heads(num_heads)
        self.learnable = bool(learnable)
        m = torch.tensor(alibi_slopes(num_heads), dtype=torch.float32)
        if self.learnable:
            self._slopes = nn.Parameter(m)
        else:
            self.register_buffer("_slopes", m)

    @property
    def slopes(self) -> Tensor:
        """The per-head slopes ``m_h``, shape ``(H,)``."""
        return self._slopes

    def table(self, lo: int, hi: int) -> Tensor:
        d = offsets(lo, hi, device=self._slopes.device).abs().to(self._slopes.dtype)
        return -self._slopes.unsqueeze(1) * d.unsqueeze(0)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, learnable={self.learnable}"
