"""ALiBi: a linear penalty on distance with fixed per-head slopes (Press et al., 2022)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .._validate import check_bool
from .base import PositionEncoding, offsets
from .registry import Param, register


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


@register(
    "alibi",
    description="ALiBi: -m_h·|i-j| with the paper's fixed per-head slopes (Press et al. 2022)",
    learnable=False,
    params=(Param("learnable", bool, False, "make the slopes trainable parameters"),),
)
class ALiBi(PositionEncoding):
    """``PE(i, j) = -m_h · |i - j|`` with the paper's slopes ``m_h`` (or your own).

    Args:
        num_heads: H.
        learnable: make the slopes parameters (kept as given; no positivity constraint is
            imposed, so training may flip a head's sign).
        slopes: custom per-head slopes, a sequence or tensor of H finite numbers (for models
            whose slopes differ from the paper's, e.g. MPT's ``alibi_bias_max``); default the
            paper's :func:`alibi_slopes`.
    """

    def __init__(
        self, num_heads: int, learnable: bool = False, slopes: Tensor | list[float] | None = None
    ) -> None:
        super().__init__(num_heads)
        self.learnable = check_bool("learnable", learnable)
        if slopes is None:
            m = torch.tensor(alibi_slopes(num_heads), dtype=torch.float32)
        else:
            try:
                m = torch.as_tensor(slopes, dtype=torch.float32).detach().clone()
            except (TypeError, ValueError, RuntimeError):
                raise TypeError(
                    f"slopes must be a sequence or tensor of {num_heads} numbers; "
                    f"got {type(slopes).__name__}"
                ) from None
            if m.shape != (num_heads,) or not bool(torch.isfinite(m).all()):
                raise ValueError(
                    f"slopes must hold num_heads={num_heads} finite numbers; got shape "
                    f"{tuple(m.shape)}"
                )
        if self.learnable:
            self._slopes = nn.Parameter(m)
        else:
            self.register_buffer("_slopes", m)

    @property
    def slopes(self) -> Tensor:
        """The per-head slopes ``m_h``, shape ``(H,)``."""
        return self._slopes

    def closed_form_slopes(self) -> Tensor | None:
        """The fixed slopes (kernels compute ``-m·|Δ|`` without a table); None if learnable."""
        return None if self.learnable else self._slopes

    def table(self, lo: int, hi: int) -> Tensor:
        d = offsets(lo, hi, device=self._slopes.device).abs().to(self._slopes.dtype)
        return -self._slopes.unsqueeze(1) * d.unsqueeze(0)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, learnable={self.learnable}"
