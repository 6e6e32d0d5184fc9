"""Looking inside a trained TinyLM: its learned position tables, a layer's queries, keys and
values, and every head's attention weights."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

import relattn

__all__ = ["attention_maps", "byte_label", "encoding_names", "layer_qkv", "learned_tables"]


def encoding_names(attn: nn.Module) -> list[str]:
    """The registered names of an attention layer's encodings (rotation first), looked up by
    class in :func:`relattn.pe.specs`; a module of an unregistered class shows its class name."""
    names = []
    for module in (attn.rope, attn.pe):
        if module is not None:
            found = [s.name for s in relattn.pe.specs() if type(module) is s.cls]
            names.append(found[0] if found else type(module).__name__)
    return names


def byte_label(b: int) -> str:
    """How a byte token is shown: the character, or a visible stand-in for spaces and controls."""
    special = {32: "␣", 10: "⏎", 9: "⇥", 13: "␍"}
    if b in special:
        return special[b]
    return chr(b) if 33 <= b < 127 else f"\\x{b:02x}"


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
def layer_qkv(model: nn.Module, idx: Tensor, layer: int) -> tuple[Tensor, Tensor, Tensor]:
    """The queries, keys and values that layer ``layer`` computes for the token ids ``idx``.

    The layer's input is captured with a forward pre-hook while the model runs, then passed
    through the layer's own fused q/k/v projection.

    Args:
        idx: ``(B, N)`` token ids.

    Returns:
        ``q: (B, H, N, D)``, ``k, v: (B, Hkv, N, D)``, before RoPE (which
        :func:`relattn.attention_weights` applies through ``pe``).
    """
    attn = model.blocks[layer].attn
    captured: list[Tensor] = []
    handle = attn.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    was_training = model.training
    try:
        model.eval()
        model(idx)
    finally:
        model.train(was_training)
        handle.remove()
    return attn.project(captured[0])


@torch.no_grad()
def attention_maps(model: nn.Module, idx: Tensor) -> np.ndarray:
    """Every head's attention weights on ``idx`` ``(1, N)``, every layer.

    Returns:
        ``(L, H, N, N)`` array; ``[l, h, i]`` holds α(i, ·) of head h in layer l, zero above
        the diagonal.
    """
    maps = []
    for layer, block in enumerate(model.blocks):
        attn = block.attn
        q, k, _ = layer_qkv(model, idx, layer)
        pe = [m for m in (attn.rope, attn.pe) if m is not None] or None
        weights = relattn.attention_weights(q, k, pe, causal=True, scale=attn.scale)
        maps.append(weights[0].float().cpu().numpy())
    return np.stack(maps)
