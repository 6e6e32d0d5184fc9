"""Small models built from relattn layers."""

from .tinylm import TinyLM, TinyLMConfig

__all__ = ["TinyLM", "TinyLMConfig"]
