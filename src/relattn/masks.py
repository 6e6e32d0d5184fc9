"""Which keys a query sees, described by positions and ids (never an N×N input tensor).

Query row r sits at position ``q_offset + r``, key column c at position ``c``;
``Δ = q_offset + r - c``. Key c is visible to row r iff all of:

- causal:            ``Δ >= 0``
- window W (> 0):    ``Δ < W`` (and ``Δ > -W`` when not causal)
- doc_ids (B, Nk):   ``doc_ids[b, c] == doc_ids[b, q_offset + r]``
- key_padding_mask:  ``key_padding_mask[b, c]`` (True = a real token)

This module is the one home of these rules on the host side; the Triton kernels keep their
own in-kernel copy.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .problem import Problem

__all__ = [
    "contiguous_documents",
    "doc_bounds",
    "key_span",
    "offset_bounds",
    "offset_range",
    "offset_visible",
    "visible",
    "within_doc_positions",
]


def offset_visible(delta: Tensor, causal: bool, window: int) -> Tensor:
    """The Δ rules alone (causal and window): a bool tensor shaped like ``delta``."""
    m = torch.ones_like(delta, dtype=torch.bool)
    if causal:
        m = m & (delta >= 0)
    if window > 0:
        m = m & (delta < window)
        if not causal:
            m = m & (delta > -window)
    return m


def visible(delta: Tensor, problem: Problem) -> Tensor:
    """Visibility of every (row, column) as a bool tensor broadcastable to (B, H, Nq, Nk).

    Args:
        delta: ``(Nq, Nk)`` offsets ``q_offset + r - c``.
    """
    m = offset_visible(delta, problem.causal, problem.window)[None, None]
    if problem.doc_ids is not None:
        nq, p0 = delta.shape[0], problem.q_offset
        q_doc = problem.doc_ids[:, p0 : p0 + nq]  # (B, Nq)
        m = m & (q_doc[:, None, :, None] == problem.doc_ids[:, None, None, :])
    if problem.key_padding_mask is not None:
        m = m & problem.key_padding_mask[:, None, None, :]
    return m


def offset_bounds(nq: int, nk: int, causal: bool, q_offset: int, window: int) -> tuple[int, int]:
    """The smallest and largest offset Δ of any pair the Δ rules leave visible; ``hi < lo``
    when they hide every pair."""
    lo, hi = q_offset - (nk - 1), q_offset + nq - 1
    if causal:
        lo = max(lo, 0)
    if window > 0:
        hi = min(hi, window - 1)
        if not causal:
            lo = max(lo, -(window - 1))
    return lo, hi


def offset_range(nq: int, nk: int, causal: bool, q_offset: int, window: int) -> tuple[int, int]:
    """:func:`offset_bounds` as a table range: ``lo <= hi`` always (a range whose offsets are all
    masked is returned as a single column, never read)."""
    lo, hi = offset_bounds(nq, nk, causal, q_offset, window)
    # A branch, not max(lo, hi): under torch.compile with a symbolic cache length the branch is
    # a guard and the table's width a plain symbol, where max() put ``1 + max(0, s)`` into the
    # loop bound of the generated C++, on which GCC 12.2 crashes with Intel's AVX-512 tuning
    # (tests/test_compile.py).
    return lo, (hi if hi >= lo else lo)


def key_span(pos_first: int, pos_last: int, nk: int, causal: bool, window: int) -> tuple[int, int]:
    """Key columns ``[c0, c1)`` that the Δ rules leave visible to some query whose position is
    in ``pos_first .. pos_last`` (an empty span has ``c1 <= c0``)."""
    c0 = max(0, pos_first - window + 1) if window > 0 else 0
    if causal:
        c1 = pos_last + 1
    elif window > 0:
        c1 = pos_last + window
    else:
        c1 = nk
    return c0, min(max(c1, 0), nk)


def contiguous_documents(doc_ids: Tensor) -> Tensor:
    """A 0-d bool tensor: True iff every row of ``doc_ids (B, N)`` gives each document one
    contiguous run (the number of runs equals the number of distinct ids). No host sync."""
    runs = (doc_ids[:, 1:] != doc_ids[:, :-1]).sum(1)
    ordered = doc_ids.sort(dim=1).values
    distinct = (ordered[:, 1:] != ordered[:, :-1]).sum(1)
    return (runs == distinct).all()


def doc_bounds(doc_ids: Tensor) -> tuple[Tensor, Tensor]:
    """For each position, the first position of its document and one past its last.

    Documents are contiguous runs of equal ids (checked by validation), so "same document" is
    "inside the run". Returns two int64 tensors shaped like ``doc_ids (B, Nk)``.
    """
    nk = doc_ids.shape[1]
    _, start = within_doc_positions(doc_ids)
    pos = torch.arange(nk, device=doc_ids.device).expand_as(doc_ids)
    ends = torch.ones_like(doc_ids, dtype=torch.bool)
    ends[:, :-1] = doc_ids[:, 1:] != doc_ids[:, :-1]
    # Ends only shrink going left: the running min from the right of "end here, else Nk".
    end = torch.where(ends, pos + 1, nk).flip(1).cummin(dim=1).values.flip(1)
    return start, end


def within_doc_positions(
    doc_ids: Tensor,
    offset: int = 0,
    last_doc: Tensor | None = None,
    doc_start: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Position of each token inside its document (RoPE restarts at 0 on every new document).

    Args:
        doc_ids: ``(B, N)`` document id of tokens at absolute positions ``offset .. offset+N-1``.
        offset: absolute position of column 0.
        last_doc, doc_start: ``(B,)`` document of the token before column 0 and the absolute
            position where that document started (None when column 0 starts the sequence).

    Returns:
        ``(positions (B, N), starts (B, N))``: position within the document, and the absolute
        position where each token's document started.
    """
    b, n = doc_ids.shape
    t = offset + torch.arange(n, device=doc_ids.device).expand(b, n)
    is_start = torch.ones_like(doc_ids, dtype=torch.bool)
    is_start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    base = torch.zeros(b, dtype=torch.long, device=doc_ids.device)
    if last_doc is not None and doc_start is not None:
        is_start[:, 0] = doc_ids[:, 0] != last_doc
        base = doc_start
    # Starts only grow, so the running max of "start here, else the previous start" is the start.
    starts = torch.where(is_start, t, base[:, None]).cummax(dim=1).values
    return t - starts, starts
