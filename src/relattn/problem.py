"""One attention call's problem, as a frozen object: everything but the tensors q, k, v and the
encoding's table.

It travels from :func:`relattn.attention` down to the backends; the custom op is the one place
that flattens it into plain arguments (torch.library ops take tensors and scalars only).
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class Problem(NamedTuple):
    """The masks, scale and position alignment of one call (see :mod:`relattn.masks`).

    Immutable; a named tuple rather than a frozen dataclass because a one-token decoding step
    builds one per call (0.3 µs against 1 µs).

    Attributes:
        lo: the offset that column 0 of the table holds (table column ``t`` is ``Δ = lo + t``).
        scale: multiplies ``q·k``.
        causal: hide keys after the query (``Δ < 0``).
        q_offset: position of query row 0 minus that of key 0; ``Δ = q_offset + r - c``.
        window: sliding window W (0 for none): a key is visible iff ``Δ < W`` (and ``Δ > -W``
            when not causal).
        doc_ids: ``(B, Nk)`` integer document id per key position, or None.
        key_padding_mask: ``(B, Nk)`` bool, True for real keys, or None.
    """

    lo: int
    scale: float
    causal: bool = True
    q_offset: int = 0
    window: int = 0
    doc_ids: Tensor | None = None
    key_padding_mask: Tensor | None = None
