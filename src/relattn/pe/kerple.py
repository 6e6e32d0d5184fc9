"""KERPLE: conditionally positive definite kernels on distance (Chi et al., 2022)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validate import check_choice, check_float
from .base import PositionEncoding, offsets
from .registry import Param, register

# A floor under r1 and r2: softplus and sigmoid underflow to exactly 0 in float32 after a large
# optimizer step, which would leave a degenerate kernel with zero gradient for good.
_FLOOR = 1e-4


def _inv_softplus(x: float) -> float:
    return x + math.log(-math.expm1(-x))


@register(
    "kerple",
    description="KERPLE: -r1·log(1+r2·|i-j|) or -r1·|i-j|^r2, learnable r1, r2 (Chi et al. 2022)",
    learnable=True,
    params=(Param("kind", str, "log", "the kernel", choices=("log", "power")),),
)
class Kerple(PositionEncoding):
    """KERPLE's kernels, per head, with learnable ``r1, r2 > 0``.

    - ``kind="log"``: ``PE = -r1 · log(1 + r2 · |Δ|)``
    - ``kind="power"``: ``PE = -r1 · |Δ|^r2`` with ``0 < r2 <= 2``

    Positivity is kept by the parametrisation (``1e-4 + softplus``, and
    ``1e-4 + (2 - 1e-4)·sigmoid`` for the power kernel's exponent), so any optimizer step leaves a
    valid kernel.

    Args:
        num_heads: H.
        kind: ``"log"`` or ``"power"``.
        r1, r2: initial values (same for every head).
    """

    def __init__(self, num_heads: int, kind: str = "log", r1: float = 1.0, r2: float = 1.0):
        super().__init__(num_heads)
        self.kind = check_choice("kind", kind, ("log", "power"))
        r1 = check_float("r1", r1, min=_FLOOR, min_open=True)
        if kind == "power":
            r2 = check_float("r2", r2, min=_FLOOR, max=2.0, min_open=True, max_open=True)
        else:
            r2 = check_float("r2", r2, min=_FLOOR, min_open=True)
        self.raw_r1 = nn.Parameter(torch.full((num_heads,), _inv_softplus(r1 - _FLOOR)))
        if kind == "power":
            unit = (r2 - _FLOOR) / (2 - _FLOOR)
            raw2 = math.log(unit / (1 - unit))
        else:
            raw2 = _inv_softplus(r2 - _FLOOR)
        self.raw_r2 = nn.Parameter(torch.full((num_heads,), raw2))

    @property
    def r1(self) -> Tensor:
        """Per-head ``r1 > 0``, shape ``(H,)``."""
        return _FLOOR + F.softplus(self.raw_r1)

    @property
    def r2(self) -> Tensor:
        """Per-head ``r2`` (``> 0``; ``<= 2`` for the power kernel), shape ``(H,)``."""
        if self.kind == "power":
            return _FLOOR + (2.0 - _FLOOR) * torch.sigmoid(self.raw_r2)
        return _FLOOR + F.softplus(self.raw_r2)

    def table(self, lo: int, hi: int) -> Tensor:
        d = offsets(lo, hi, device=self.raw_r1.device).abs().to(self.raw_r1.dtype).unsqueeze(0)
        r1, r2 = self.r1.unsqueeze(1), self.r2.unsqueeze(1)
        if self.kind == "log":
            return -r1 * torch.log1p(r2 * d)
        # |Δ|^r2 with a safe base: d**r2 has an infinite log-derivative at d = 0.
        safe = torch.where(d > 0, d, torch.ones_like(d))
        return -r1 * torch.where(d > 0, safe**r2, torch.zeros_like(safe))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, kind={self.kind!r}"
