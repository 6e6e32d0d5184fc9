"""Relative position encodings. Each additive one is a small table over offsets.

The registry (:func:`register`, :func:`create`, :func:`names`) is the one list of encodings
that the layers, the model and the command-line tools read.
"""

from .alibi import ALiBi, alibi_slopes
from .base import PositionEncoding, offsets_grid
from .kerple import Kerple
from .offset import OffsetBias
from .registry import EncodingSpec, Param, create, names, register, spec, specs
from .rope import RoPE

# Importing the modules registers the built-in encodings, in this order.
from .t5 import T5Bias  # noqa: I001
from .token import BandTerm, ForgetGate, GateTerm, QueryConditionedBias, TokenTerm

__all__ = [
    "ALiBi",
    "BandTerm",
    "EncodingSpec",
    "ForgetGate",
    "GateTerm",
    "Kerple",
    "OffsetBias",
    "Param",
    "PositionEncoding",
    "QueryConditionedBias",
    "RoPE",
    "T5Bias",
    "TokenTerm",
    "alibi_slopes",
    "create",
    "names",
    "offsets_grid",
    "register",
    "spec",
    "specs",
]
