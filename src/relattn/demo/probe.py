"""Looking inside a trained TinyLM: its learned position tables, a layer's queries, keys and
values, and every head's attention weights."""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import numpy as np
import torch
from torch import Tensor

import relattn

from ..models import TinyLM
from ..models.tinylm import Block
from ..nn import RelativeSelfAttention

__all__ = [
    "attention_maps",
    "block",
    "blocks",
    "byte_label",
    "encoding_names",
    "layer_input",
    "layer_qkv",
    "learned_tables",
]


def encoding_names(attn: RelativeSelfAttention) -> list[str]:
    """The registered names of an attention layer's encodings (rotation first), looked up by
    class in :func:`relattn.pe.specs`; a module of an unregistered class shows its class name."""
    names = []
    for module in (attn.rope, attn.pe):
        if module is not None:
            found = [s.name for s in relattn.pe.specs() if type(module) is s.cls]
            names.append(found[0] if found else type(module).__name__)
    return names


def blocks(model: TinyLM) -> Iterable[Block]:
    """The model's transformer blocks, in order (typed: ``model.blocks`` is a ModuleList)."""
    return cast("Iterable[Block]", model.blocks)


def block(model: TinyLM, layer: int) -> Block:
    """Block ``layer`` of the model."""
    return cast(Block, model.blocks[layer])


def byte_label(b: int) -> str:
    """How a byte token is shown: the character, or a visible stand-in for spaces and controls."""
    special = {32: "␣", 10: "⏎", 9: "⇥", 13: "␍"}
    if b in special:
        return special[b]
    return chr(b) if 33 <= b < 127 else f"\\x{b:02x}"


@torch.no_grad()
def learned_tables(model: TinyLM, max_offset: int) -> list[np.ndarray]:
    """Each layer's additive position table over offsets ``0 .. max_offset``.

    Returns:
        One ``(H, max_offset + 1)`` array per layer; empty if the model has no table encoding
        (none, or a term the tokens set: inkling, fox).
    """
    tables = []
    for layer in blocks(model):
        pe = layer.attn.pe
        if not isinstance(pe, relattn.pe.PositionEncoding):
            return []  # none, or a term the tokens set (no table over offsets)
        tables.append(pe.table(0, max_offset).float().cpu().numpy())
    return tables


@torch.no_grad()
def layer_qkv(model: TinyLM, idx: Tensor, layer: int) -> tuple[Tensor, Tensor, Tensor]:
    """The queries, keys and values that layer ``layer`` computes for the token ids ``idx``.

    The layer's input is captured with a forward pre-hook while the model runs, then passed
    through the layer's own fused q/k/v projection.

    Args:
        idx: ``(B, N)`` token ids.

    Returns:
        ``q: (B, H, N, D)``, ``k, v: (B, Hkv, N, D)``, before RoPE (which
        :func:`relattn.attention_weights` applies through ``pe``).
    """
    return block(model, layer).attn.project(layer_input(model, idx, layer))


@torch.no_grad()
def layer_input(model: TinyLM, idx: Tensor, layer: int) -> Tensor:
    """The input ``(B, N, d_model)`` of layer ``layer``'s attention for the token ids ``idx``
    ``(B, N)``, captured with a forward pre-hook while the model runs (in eval mode)."""
    attn = block(model, layer).attn
    captured: list[Tensor] = []
    handle = attn.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    was_training = model.training
    try:
        model.eval()
        model(idx)
    finally:
        model.train(was_training)
        handle.remove()
    return captured[0]


@torch.no_grad()
def attention_maps(model: TinyLM, idx: Tensor) -> np.ndarray:
    """Every head's attention weights on ``idx`` ``(1, N)``, every layer.

    Returns:
        ``(L, H, N, N)`` array; ``[l, h, i]`` holds α(i, ·) of head h in layer l, zero above
        the diagonal.
    """
    maps = []
    for layer, each in enumerate(blocks(model)):
        attn = each.attn
        x = layer_input(model, idx, layer)
        q, k, _ = attn.project(x)
        pe = attn.position_terms(x) or None  # RoPE, the table or the term the tokens set
        weights = relattn.attention_weights(q, k, pe, causal=True, scale=attn.scale)
        maps.append(weights[0].float().cpu().numpy())
    return np.stack(maps)
