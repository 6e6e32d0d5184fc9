"""Which tokens of a sequence each rank of a context-parallel group holds.

A sequence of N tokens is cut into equal chunks and every rank holds its chunks concatenated in
increasing position order ("the shard"):

- ``"contiguous"``: W chunks of N/W tokens; rank r holds chunk r.
- ``"zigzag"``: 2W chunks of N/(2W) tokens; rank r holds chunks r and 2W-1-r. Under a causal
  mask every rank then has the same number of visible (query, key) pairs: an early chunk sees
  few keys, its mirror sees many.

For W = 2 and N = 8 (tokens 0..7)::

    contiguous   rank 0: 0 1 2 3        rank 1: 4 5 6 7
    zigzag       rank 0: 0 1 | 6 7      rank 1: 2 3 | 4 5
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["LAYOUTS", "chunks", "shard", "shard_positions", "unshard"]

LAYOUTS = ("zigzag", "contiguous")


def world(group) -> tuple[int, int]:
    """``(rank, world size)`` of this process in ``group``; ``(0, 1)`` without torch.distributed
    initialized and ``group=None`` (one process holds the whole sequence)."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("group was given but torch.distributed is not initialized")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def check_layout(layout) -> str:
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")
    return layout


def chunks(rank: int, world_size: int, n_local: int, layout: str) -> list[tuple[int, int]]:
    """``[(first global position, length), ...]`` of the chunks rank ``rank`` holds, in the
    order they sit in its shard of ``n_local`` tokens."""
    if layout == "contiguous":
        return [(rank * n_local, n_local)]
    c = n_local // 2
    return [(rank * c, c), ((2 * world_size - 1 - rank) * c, c)]


def _divisor(world_size: int, layout: str) -> int:
    return world_size if layout == "contiguous" else 2 * world_size


def shard(x: Tensor, group=None, layout: str = "zigzag", *, dim: int) -> Tensor:
    """This rank's shard of a tensor that every rank holds whole.

    Args:
        x: any shape; ``x.shape[dim]`` is the sequence length N, a multiple of W
            (``"contiguous"``) or of 2W (``"zigzag"``).
        group: the context-parallel process group (None: the default group).
        layout: ``"zigzag"`` or ``"contiguous"`` (see the module docstring).
        dim: the sequence dimension (2 for ``(B, H, N, D)``, 1 for ``(B, N)`` or ``(B, N, C)``).

    Returns:
        ``x`` with ``x.shape[dim]`` reduced to N/W: this rank's chunks in position order.
    """
    layout = check_layout(layout)
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
    rank, size = world(group)
    n = x.shape[dim]
    if n % _divisor(size, layout):
        raise ValueError(
            f"layout={layout!r} over {size} ranks needs a sequence length divisible by "
            f"{_divisor(size, layout)}; got x.shape[{dim}] = {n}"
        )
    pieces = [x.narrow(dim, s, c) for s, c in chunks(rank, size, n // size, layout)]
    return torch.cat(pieces, dim=dim)


def unshard(x: Tensor, group=None, layout: str = "zigzag", *, dim: int) -> Tensor:
    """The whole sequence from every rank's shard: a collective every rank of ``group`` calls.
    Not differentiable (for evaluation, logging and tests).

    Args:
        x: this rank's shard; ``x.shape[dim]`` is N/W, the same shape on every rank.

    Returns:
        ``x`` with ``x.shape[dim]`` = N, tokens in position order, on every rank.

    Raises:
        ValueError, TypeError: on every rank, if any rank's shard is not a tensor or the
        shards' shapes, dtypes or devices differ.
    """
    from ._agree import agree, comm_device, text_fact

    rank, size = world(group)
    error = None
    try:
        check_layout(layout)
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
        if layout == "zigzag" and x.shape[dim] % 2:
            raise ValueError(
                f"layout='zigzag' needs an even shard length; got x.shape[{dim}] = {x.shape[dim]}"
            )
    except (TypeError, ValueError, IndexError) as e:
        error = e if not isinstance(e, IndexError) else ValueError(f"dim={dim}: {e}")
    if size == 1:
        if error is not None:
            raise error
        return x
    desc = f"{tuple(x.shape)} {x.dtype} {x.device.type}" if isinstance(x, Tensor) else "-"
    hint = x.device if isinstance(x, Tensor) else None
    facts = {"shard shape, dtype and device": (text_fact(desc), desc)}
    agree(group, comm_device(group, hint), facts, error, "unshard")
    return gather(x, group, layout, dim=dim)


def gather(x: Tensor, group, layout: str, *, dim: int) -> Tensor:
    """:func:`unshard` for shards already known to agree (no checks, one ``all_gather``)."""
    _, size = world(group)
    n_local = x.shape[dim]
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.detach().contiguous(), group=group)
    out: list[Tensor | None] = [None] * (2 * size if layout == "zigzag" else size)
    for r, part in enumerate(parts):
        offset = 0
        for start, c in chunks(r, size, n_local, layout):
            out[start // c] = part.narrow(dim, offset, c)
            offset += c
    pieces = [p for p in out if p is not None]
    assert len(pieces) == len(out), "the layout's chunks cover every slot"
    return torch.cat(pieces, dim=dim)


def positions_of(rank: int, world_size: int, n_local: int, layout: str, device=None) -> Tensor:
    """Global positions ``(n_local,)`` int64 of the tokens rank ``rank`` holds."""
    spans = chunks(rank, world_size, n_local, layout)
    return torch.cat([torch.arange(s, s + c, device=device) for s, c in spans])


def shard_positions(
    n_local: int, group=None, layout: str = "zigzag", device: torch.device | str | None = None
) -> Tensor:
    """Global positions ``(n_local,)`` int64 of the tokens in this rank's shard (what RoPE
    rotates by, and what every offset ``i - j`` is computed from)."""
    layout = check_layout(layout)
    rank, size = world(group)
    return positions_of(rank, size, n_local, layout, device)
