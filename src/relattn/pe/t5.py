"""T5's bucketed relative bias (Raffel et al., 2020)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .._validate import check_bool, check_int
from .base import PositionEncoding, offsets, tied_run_start
from .registry import Param, register


@register(
    "t5",
    description="T5: a learnable scalar per head per log-spaced bucket of i-j (Raffel et al. 2020)",
    learnable=True,
    params=(
        Param("num_buckets", int, 32, "number of buckets"),
        Param("max_distance", int, 128, "offsets at or beyond this share the last bucket"),
    ),
)
class T5Bias(PositionEncoding):
    """One learnable scalar per head per bucket of offsets.

    Bucketing is T5's, offset for offset: the first ``num_buckets // 2`` buckets (of each
    direction, when bidirectional) hold one offset each, the rest grow logarithmically up to
    ``max_distance``, and the last bucket takes every offset beyond. The logarithm is taken in
    float32 as in the original, so boundary offsets land in the same bucket.

    Args:
        num_heads: H.
        num_buckets: total number of buckets (both directions together when bidirectional).
        max_distance: offsets at or beyond this share the last bucket.
        bidirectional: give negative offsets (keys after the query) their own buckets; when
            False, negative offsets fall into bucket 0, as in T5's decoder.
    """

    def __init__(
        self,
        num_heads: int,
        num_buckets: int = 32,
        max_distance: int = 128,
        bidirectional: bool = False,
    ) -> None:
        super().__init__(num_heads)
        bidirectional = check_bool("bidirectional", bidirectional)
        min_buckets = 4 if bidirectional else 2
        hint = f" (bidirectional={bidirectional})"
        num_buckets = check_int("num_buckets", num_buckets, min=min_buckets, max=1 << 20, hint=hint)
        exact = (num_buckets // 2 if bidirectional else num_buckets) // 2
        max_distance = check_int(
            "max_distance", max_distance, min=exact + 1, hint=" (beyond the exact-bucket range)"
        )
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bidirectional = bidirectional
        self.weight: Tensor = nn.Parameter(torch.zeros(num_heads, num_buckets))
        nn.init.normal_(self.weight, std=0.02)

    @classmethod
    def from_textbook(cls, num_heads: int, n_b: int, dist_max: int) -> T5Bias:
        """The textbook parametrisation: ``n_b + 1`` buckets; offsets ``0 .. (n_b+1)/2 - 1``
        one to one, larger ones logarithmically up to ``dist_max``, bucket ``n_b`` for the rest.
        """
        return cls(num_heads, num_buckets=n_b + 1, max_distance=dist_max, bidirectional=False)

    def buckets(self, offsets: Tensor | int) -> Tensor:
        """Bucket index (int64) of each offset ``Δ = i - j``; same shape as ``offsets``."""
        n = torch.as_tensor(offsets, dtype=torch.long)
        num_buckets = self.num_buckets
        ret = torch.zeros_like(n)
        if self.bidirectional:
            num_buckets //= 2
            ret = ret + (n < 0).long() * num_buckets
            n = n.abs()
        else:
            n = n.clamp(min=0)
        max_exact = num_buckets // 2
        is_small = n < max_exact
        # float32 exactly as T5: log(n / max_exact) / log(max_distance / max_exact) * (nb - me)
        n_f = n.to(torch.float32).clamp(min=1.0)
        val_if_large = max_exact + (
            torch.log(n_f / max_exact)
            / math.log(self.max_distance / max_exact)
            * (num_buckets - max_exact)
        ).to(torch.long)
        val_if_large = val_if_large.clamp(max=num_buckets - 1)
        return ret + torch.where(is_small, n, val_if_large)

    def table(self, lo: int, hi: int) -> Tensor:
        idx = self.buckets(offsets(lo, hi)).to(self.weight.device)
        return self.weight[:, idx]

    def tied_from(self, lo: int, hi: int) -> int | None:
        """The offsets past ``max_distance`` share the last bucket: where that run starts."""
        return tied_run_start(self.buckets(offsets(lo, hi)), lo)

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, num_buckets={self.num_buckets}, "
            f"max_distance={self.max_distance}, bidirectional={self.bidirectional}"
        )
