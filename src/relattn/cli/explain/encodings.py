"""The encodings ``relattn explain`` uses without a checkpoint, built from the registry.

An encoding with trainable parameters has no trained values here: its parameters get seeded
random offsets (illustrative values, visible in the numbers), while a fixed encoding (ALiBi)
keeps its real values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from relattn import pe
from relattn.pe import ForgetGate, PositionEncoding, QueryConditionedBias, RoPE, TokenTerm

from .compute import seeded

__all__ = ["build", "call_terms", "describe", "is_illustrative"]

# The encodings whose term the tokens set: what explain builds, and feeds per word.
_TOKEN_MODULES = (QueryConditionedBias, ForgetGate)


def build(
    names: list[str], num_heads: int, head_dim: int, seed: int, kwargs: dict[str, dict[str, Any]]
) -> list[nn.Module]:
    """One module per registered name, in order, with deterministic values from ``seed``.

    Raises:
        ValueError, TypeError: a parameter the encoding rejects, or an encoding that builds
            none of PositionEncoding, RoPE, QueryConditionedBias, ForgetGate.
    """
    modules: list[nn.Module] = []
    for name in names:
        with torch.random.fork_rng(devices=[]):  # constructors draw from the global RNG
            module = pe.create(name, num_heads, head_dim, **kwargs.get(name, {}))
        if not isinstance(module, (PositionEncoding, RoPE, *_TOKEN_MODULES)):
            raise TypeError(
                f"encoding {name!r} must build a relattn.pe.PositionEncoding, a RoPE, a "
                f"QueryConditionedBias or a ForgetGate; got {type(module).__name__}"
            )
        if pe.spec(name).learnable:
            g = seeded(seed, "pe", name)
            with torch.no_grad():
                for p in module.parameters():
                    p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype))
        modules.append(module.requires_grad_(False))
    return modules


def call_terms(
    modules: Sequence[nn.Module], tokens: list[str], num_heads: int, seed: int
) -> list[PositionEncoding | RoPE | TokenTerm]:
    """What ``relattn.attention`` takes as ``pe`` for ``tokens``: the modules as they are, and
    for an encoding whose term the tokens set, its term from seeded per-word inputs (as the
    words' q, k, v are): the banded bias's latents ``r`` (``rank`` numbers per head, scaled by
    ``1/√rank``) and the forget gates ``log f = logsigmoid(z + 2)`` (``z`` standard normal, so
    most gates stay near 1 and a few words forget). Equal words get equal inputs."""
    out: list[PositionEncoding | RoPE | TokenTerm] = []
    for module in modules:
        if isinstance(module, QueryConditionedBias):
            rank = module.rank
            per_word = [
                torch.randn(num_heads, rank, generator=seeded(seed, "r", w)) / rank**0.5
                for w in tokens
            ]
            out.append(module(torch.stack(per_word, dim=1).unsqueeze(0)))
        elif isinstance(module, ForgetGate):
            per_word = [torch.randn(num_heads, generator=seeded(seed, "gate", w)) for w in tokens]
            logits = torch.stack(per_word, dim=1).unsqueeze(0) + 2.0
            out.append(module(torch.nn.functional.logsigmoid(logits)))
        elif isinstance(module, (PositionEncoding, RoPE)):
            out.append(module)
    return out


def is_illustrative(names: list[str]) -> bool:
    """Whether any value shown comes from a random initialisation rather than a definition."""
    return any(pe.spec(name).learnable for name in names)


def describe(names: list[str], modules: Sequence[nn.Module], used: dict[str, Any]) -> list[str]:
    """Plain-language lines about the encodings: the registry's descriptions, their parameters,
    and per-head values where an encoding exposes them (slopes, r1/r2)."""
    if not names:
        return ["none: PE = 0, so apart from the mask attention cannot tell word order."]
    lines = []
    for name, module in zip(names, modules, strict=True):
        spec = pe.spec(name)
        lines.append(spec.description + ".")
        params = [
            f"{key.split('.', 1)[1]} {value}"
            for key, value in used.items()
            if key.startswith(name + ".")
        ]
        if params:
            lines.append("  " + ", ".join(params) + ".")
        lines += ["  " + line for line in _per_head(module)]
        if spec.token:
            lines.append(
                "  Its term depends on each query's input, not on the offset alone: here each "
                "word gets seeded "
                + ("latents r" if isinstance(module, QueryConditionedBias) else "forget gates")
                + " (a trained model computes them from the word); the PE rows show each "
                "query's own values."
            )
        if not spec.additive:
            lines.append(
                "  It rotates q and k by their positions before the dot product, so q_i·k_j "
                "itself depends on Δ; the dot products shown are rotated."
            )
    if is_illustrative(names):
        lines.append(
            "Learnable values here are ILLUSTRATIVE (random init from --seed): a trained model "
            "learns them (see --checkpoint)."
        )
    return lines


def _per_head(module: nn.Module) -> list[str]:
    out = []
    for attr in ("slopes", "r1", "r2"):
        values = getattr(module, attr, None)
        if isinstance(values, torch.Tensor) and values.dim() == 1:
            shown = ", ".join(f"h{h}: {x:.4g}" for h, x in enumerate(values.tolist()))
            out.append(f"{attr} {shown}")
    return out
