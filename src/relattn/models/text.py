"""Text to byte ids and back, for byte-level models such as :class:`relattn.models.TinyLM`.

:func:`text_to_ids` and :func:`ids_to_text` were first named ``encode`` and ``decode``; those
names still work (they are the same functions), but ``decode`` also names relattn's decoding
backend, so the library and its docs use the names that say which way the text goes.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ids_to_text", "text_to_ids"]


def text_to_ids(text: str) -> Tensor:
    """The UTF-8 bytes of ``text`` as token ids.

    Returns:
        ``(N,)`` int64 tensor of values in ``[0, 256)``; ``N`` is the byte length of ``text``.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str; got {type(text).__name__}")
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def ids_to_text(ids: Tensor) -> str:
    """The text of byte ids (bytes that do not form valid UTF-8 become U+FFFD).

    Args:
        ids: ``(N,)`` integer tensor (or a sequence of ints) of values in ``[0, 256)``.
    """
    values = ids.tolist() if isinstance(ids, Tensor) else list(ids)
    if values and isinstance(values[0], list):
        raise ValueError(
            "ids must be one sequence (N,); turn each row of a batch into text separately"
        )
    if any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 256 for v in values):
        raise ValueError("ids must be byte values: integers in [0, 256)")
    return bytes(values).decode("utf-8", errors="replace")


# The first names, kept: the same functions.
encode = text_to_ids
decode = ids_to_text
