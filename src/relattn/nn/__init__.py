"""Layers built on :func:`relattn.attention`."""

from .attention import ENCODINGS, RelativeSelfAttention, make_encoding

__all__ = ["ENCODINGS", "RelativeSelfAttention", "make_encoding"]
