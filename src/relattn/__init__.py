"""relattn: exact, fast, memory-light causal attention with relative position encodings."""

from . import pe
from .ops import attention, attention_weights

__all__ = ["attention", "attention_weights", "pe"]
__version__ = "0.1.0"
