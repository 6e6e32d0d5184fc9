"""Looking inside a trained TinyLM: its learned position tables and one head's attention weights."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

import relattn


@torch.no_grad()
def learned_tables(model: nn.Module, max_offset: int) -> list[np.ndarray]:
    """Each layer's additive position table over offsets ``0 .. max_offset``.

    Returns:
        One ``(H, max_offset + 1)`` array per layer; empty if the model has no additive encoding.
    """
    tables = []
    for block in model.blocks:
        pe = block.attn.pe
        if pe is None:
            return []
        tables.append(pe.table(0, max_offset).float().cpu().numpy())
    return tables


@torch.no_grad()
def layer_qk(model: nn.Module, idx: Tensor, layer: int) -> tuple[Tensor, Tensor]:
    """The queries and keys that layer ``layer`` computes for the token ids ``idx`` ``(B, N)``.

    The layer's input is captured with a forward pre-hook while the model runs, then passed
    through the layer's own fused q/k/v projection.

    Returns:
        ``q: (B, H, N, D)`` and ``k: (B, Hkv, N, D)``, before RoPE (which
        :func:`relattn.attention_weights` applies through ``pe``).
    """
    attn = model.blocks[layer].attn
    captured: list[Tensor] = []
    handle = attn.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        was_training = model.training
        model.eval()
        model(idx)
        model.train(was_training)
    finally:
        handle.remove()
    q, k, _ = attn.project(captured[0])
    return q, k


@torch.no_grad()
def attention_map(model: nn.Module, idx: Tensor, layer: int, head: int) -> np.ndarray:
    """Head ``head`` of layer ``layer``'s attention weights on ``idx`` ``(1, N)``.

    Returns:
        ``(N, N)`` array; row i holds α(i, ·), zero above the diagonal.
    """
    attn = model.blocks[layer].attn
    q, k = layer_qk(model, idx, layer)
    pe = [m for m in (attn.rope, attn.pe) if m is not None] or None
    weights = relattn.attention_weights(q, k, pe, causal=True)
    return weights[0, head].float().cpu().numpy()
