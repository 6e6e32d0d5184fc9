"""Relative position encodings. Each additive one is a small table over offsets."""

from .alibi import ALiBi, alibi_slopes
from .base import PositionEncoding, offsets_grid
from .kerple import Kerple
from .offset import OffsetBias
from .rope import RoPE
from .t5 import T5Bias

__all__ = [
    "ALiBi",
    "Kerple",
    "OffsetBias",
    "PositionEncoding",
    "RoPE",
    "T5Bias",
    "alibi_slopes",
    "offsets_grid",
]
