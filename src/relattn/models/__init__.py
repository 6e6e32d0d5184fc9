"""Small models built from relattn layers, and byte-level text helpers for them.

``encode`` and ``decode`` are the first names of :func:`text_to_ids` and :func:`ids_to_text`,
kept as aliases.
"""

from .text import decode as decode  # the first names, re-exported
from .text import encode as encode
from .text import ids_to_text, text_to_ids
from .tinylm import TinyLM, TinyLMConfig

__all__ = ["TinyLM", "TinyLMConfig", "ids_to_text", "text_to_ids"]
