"""Small models built from relattn layers, and byte-level text helpers for them."""

from .text import decode, encode
from .tinylm import TinyLM, TinyLMConfig

__all__ = ["TinyLM", "TinyLMConfig", "decode", "encode"]
