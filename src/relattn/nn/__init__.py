"""Layers built on :func:`relattn.attention`."""

from .attention import RelativeSelfAttention

__all__ = ["RelativeSelfAttention"]
