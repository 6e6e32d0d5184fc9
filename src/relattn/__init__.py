"""relattn: exact, fast, memory-light causal attention with relative position encodings."""

from . import models, nn, pe
from .cache import KVCache
from .ops import attention, attention_weights

__all__ = ["KVCache", "attention", "attention_weights", "models", "nn", "pe"]
__version__ = "0.1.0"
