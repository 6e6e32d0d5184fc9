"""Which keys a query sees, described by positions and ids (never an N×N input tensor).

Query row r sits at position ``q_offset + r``, key column c at position ``c``;
``Δ = q_offset + r - c``.
Key c is visible to row r iff all of:

- causal:            ``Δ >= 0``
- window W (> 0):    ``Δ < W`` (and ``Δ > -W`` when not causal)
- doc_ids (B, Nk):   ``doc_ids[b, c] == doc_ids[b, q_offset + r]``
- key_padding_mask:  ``key_padding_mask[b, c]`` (True = a real token)
"""

from __future__ import annotations

import torch
from torch import Tensor


def visible(
    delta: Tensor,
    causal: bool,
    q_offset: int,
    window: int,
    doc_ids: Tensor | None,
    key_padding_mask: Tensor | None,
) -> Tensor:
    """Visibility of every (row, column) as a bool tensor broadcastable to (B, H, Nq, Nk).

    Args:
        delta: ``(Nq, Nk)`` offsets ``q_offset + r - c``.
        window: 0 for no window.
    """
    m = torch.ones_like(delta, dtype=torch.bool)
    if causal:
        m = m & (delta >= 0)
    if window > 0:
        m = m & (delta < window)
        if not causal:
            m = m & (delta > -window)
    m = m[None, None]
    if doc_ids is not None:
        nq = delta.shape[0]
        q_doc = doc_ids[:, q_offset : q_offset + nq]  # (B, Nq)
        m = m & (q_doc[:, None, :, None] == doc_ids[:, None, None, :])
    if key_padding_mask is not None:
        m = m & key_padding_mask[:, None, None, :]
    return m


def offset_range(nq: int, nk: int, causal: bool, q_offset: int, window: int) -> tuple[int, int]:
    """The smallest and largest offset of any visible pair (``lo <= hi`` always; a range whose
    offsets are all masked is returned as a single column, never read)."""
    lo, hi = q_offset - (nk - 1), q_offset + nq - 1
    if causal:
        lo = max(lo, 0)
    if window > 0:
        hi = min(hi, window - 1)
        if not causal:
            lo = max(lo, -(window - 1))
    if hi < lo:
        hi = lo
    return lo, hi
