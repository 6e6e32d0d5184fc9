"""Rotary position embedding (Su et al., 2021): rotates q and k by position."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._validate import check_float, check_int
from .registry import Param, register


def _build(num_heads: int, head_dim: int | None = None, **kwargs) -> RoPE:
    if head_dim is None:
        raise ValueError("the 'rope' encoding needs head_dim (it rotates q and k)")
    return RoPE(head_dim, **kwargs)


@register(
    "rope",
    description="RoPE: rotates q and k by position, not an additive term (Su et al. 2021)",
    learnable=False,
    additive=False,
    params=(Param("base", float, 10000.0, "frequency base"),),
    build=_build,
)
class RoPE(nn.Module):
    """Rotates pairs of channels of q and k by an angle proportional to their position, so that
    ``q_i · k_j`` depends on ``i - j`` only. It is not an additive term and composes with any
    table encoding.

    Channel pairs are ``(x[..., :D/2], x[..., D/2:])`` (the "rotate half" layout used by
    GPT-NeoX and Llama).

    Args:
        head_dim: D (even).
        base: the frequency base; pair ``p`` turns by ``position · base^(-2p/D)``.
    """

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        head_dim = check_int("head_dim", head_dim, min=2, hint=" (even)")
        if head_dim % 2:
            raise ValueError(f"head_dim must be even; got {head_dim}")
        self.head_dim = head_dim
        self.base = check_float("base", base, min=1.0, min_open=True)

    def frequencies(self, device=None) -> Tensor:
        """``base^(-2p/D)`` for each channel pair p, float64, shape ``(D/2,)``. Computed, not
        stored: a floating buffer would follow ``module.half()`` and lose the phase."""
        p = torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=device)
        return self.base ** (-p / self.head_dim)

    def rotate(self, x: Tensor, positions: Tensor | int = 0) -> Tensor:
        """Rotate ``x`` of shape ``(B, H, N, D)`` by its positions.

        Args:
            x: ``(B, H, N, D)``.
            positions: an int (the position of row 0; rows follow consecutively), or an int
                tensor of shape ``(N,)`` or ``(B, N)`` with each row's position.

        Returns:
            Tensor of the same shape and dtype as ``x``.
        """
        if x.dim() != 4 or x.shape[-1] != self.head_dim:
            raise ValueError(f"x must have shape (B, H, N, {self.head_dim}); got {tuple(x.shape)}")
        n = x.shape[2]
        if isinstance(positions, int):
            pos = torch.arange(positions, positions + n, device=x.device)
        else:
            pos = positions.to(x.device)
            if pos.shape not in ((n,), (x.shape[0], n)):
                raise ValueError(
                    f"positions must have shape ({n},) or ({x.shape[0]}, {n}); "
                    f"got {tuple(pos.shape)}"
                )
        # Angles in float64 (positions up to 1e6 keep their phase), rounded once to the compute
        # dtype: float32 for half/float32 inputs, float64 for float64 inputs.
        ang = pos.to(torch.float64).unsqueeze(-1) * self.frequencies(pos.device)
        if ang.dim() == 3:
            ang = ang.unsqueeze(1)  # (B, 1, N, D/2)
        compute = torch.promote_types(x.dtype, torch.float32)
        cos = ang.cos().to(compute)
        sin = ang.sin().to(compute)
        x1, x2 = x.to(compute).chunk(2, dim=-1)
        cos, sin = cos.to(compute), sin.to(compute)
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        return out.to(x.dtype)

    def forward(self, q: Tensor, k: Tensor, q_offset: int = 0) -> tuple[Tensor, Tensor]:
        """Rotate q at positions ``q_offset + r`` and k at positions ``c``."""
        return self.rotate(q, q_offset), self.rotate(k, 0)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}"
