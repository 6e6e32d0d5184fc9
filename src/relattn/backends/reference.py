"""The specification: the formula of DESIGN.md, symbol for symbol, materializing scores.

    α(i, j) = softmax_j( scale · q_i·k_j + PE(i, j) + Mask(i, j) ),    out_i = Σ_j α(i, j) · v_j

Readable, not fast: every other backend is tested against it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..masks import visible


def scores_and_weights(
    q: Tensor,
    k: Tensor,
    table: Tensor | None,
    lo: int,
    scale: float,
    causal: bool,
    q_offset: int,
    window: int,
    doc_ids: Tensor | None,
    key_padding_mask: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Scores ``scale·q·k + PE`` (B, Hq, Nq, Nk), the visibility mask and the weights α.

    Computed in float32 (float64 stays float64) whatever the input dtype.
    """
    compute = torch.promote_types(q.dtype, torch.float32)
    group = q.shape[1] // k.shape[1]
    k = k.to(compute).repeat_interleave(group, dim=1)  # query head h reads kv head h // group
    nq, nk = q.shape[2], k.shape[2]
    dot = q.to(compute) @ k.transpose(-1, -2)  # q_i · k_j
    scores = scale * dot
    rows = torch.arange(nq, device=q.device)[:, None]
    delta = q_offset + rows - torch.arange(nk, device=q.device)  # Δ = i - j
    if table is not None:
        t = table.to(compute)
        column = (delta - lo).clamp(0, t.shape[1] - 1)  # masked pairs may fall off the table
        scores = scores + t[:, column]  # PE(i, j) = T[h, i - j]
    mask = visible(delta, causal, q_offset, window, doc_ids, key_padding_mask)  # (B|1, 1, Nq, Nk)
    mask = mask.expand(scores.shape)
    scores = scores.masked_fill(~mask, float("-inf"))  # Mask(i, j) = -inf
    # A row that sees no key gives zero weights (not NaN): softmax it over zeros, then drop it.
    any_visible = mask.any(dim=-1, keepdim=True)
    weights = torch.softmax(torch.where(any_visible, scores, 0.0), dim=-1)
    weights = torch.where(mask, weights, 0.0)
    return scores, mask, weights


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    table: Tensor | None,
    lo: int,
    scale: float,
    causal: bool,
    q_offset: int,
    window: int,
    doc_ids: Tensor | None,
    key_padding_mask: Tensor | None,
) -> Tensor:
    """``out = α · v`` of shape (B, Hq, Nq, D) in q's dtype; autograd does the backward."""
    _, _, weights = scores_and_weights(
        q, k, table, lo, scale, causal, q_offset, window, doc_ids, key_padding_mask
    )
    group = q.shape[1] // k.shape[1]
    v = v.to(weights.dtype).repeat_interleave(group, dim=1)
    return (weights @ v).to(q.dtype)
