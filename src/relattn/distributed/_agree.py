"""Every rank raises the same error, or none does.

A rank that raises on bad input before a collective leaves the others waiting in it forever.
So each rank first checks its own arguments without raising, then all ranks exchange a small
record (the facts that must agree, and the local error if any) in one ``all_gather``, and every
rank raises — or proceeds — from the same gathered records.
"""

from __future__ import annotations

import struct
import zlib

import torch
import torch.distributed as dist

_MSG_BYTES = 400
# 0 means "no error"; any other exception type travels as RuntimeError (3).
_KINDS: dict[type[Exception], int] = {ValueError: 1, TypeError: 2, RuntimeError: 3}
_BY_CODE: dict[int, type[Exception]] = {code: kind for kind, code in _KINDS.items()}


def float_fact(x: float) -> int:
    """A float as an int64 (its bits), so ranks compare it exactly."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def text_fact(text: str) -> int:
    return zlib.crc32(text.encode())


def comm_device(group, hint: torch.device | None) -> torch.device:
    """Where collectives on ``group`` take their tensors (CUDA for NCCL)."""
    if dist.get_backend(group) == "nccl":
        if hint is not None and hint.type == "cuda":
            return hint
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(
    group,
    device: torch.device,
    facts: dict[str, tuple[int, str]],
    error: Exception | None,
    where: str,
) -> None:
    """Raise on every rank if any rank has ``error`` or the ranks' ``facts`` differ.

    Args:
        facts: name -> (int to compare, human-readable value for the message); the same names
            in the same order on every rank (the caller's code guarantees it).
        error: this rank's own input error, or None.
        where: the function's name, for the messages.
    """
    names = list(facts)
    record = torch.zeros(len(names) + 2 + _MSG_BYTES, dtype=torch.int64)
    record[: len(names)] = torch.tensor([facts[n][0] for n in names], dtype=torch.int64)
    readable = "\x00".join(facts[n][1] for n in names).encode()[:_MSG_BYTES]
    if error is not None:
        record[len(names)] = _KINDS.get(type(error), 3)
        msg = str(error).encode()[:_MSG_BYTES]
    else:
        msg = readable
    record[len(names) + 1] = len(msg)
    record[len(names) + 2 : len(names) + 2 + len(msg)] = torch.tensor(list(msg), dtype=torch.int64)
    size = dist.get_world_size(group)
    gathered = [torch.empty_like(record, device=device) for _ in range(size)]
    dist.all_gather(gathered, record.to(device), group=group)
    table = torch.stack(gathered).cpu()

    def text(r: int) -> str:
        n = int(table[r, len(names) + 1])
        start = len(names) + 2
        return bytes(table[r, start : start + n].tolist()).decode(errors="replace")

    codes = table[:, len(names)].tolist()
    if error is not None:
        raise error
    for r, code in enumerate(codes):
        if code:
            kind = _BY_CODE.get(code, RuntimeError)
            raise kind(f"{where}: rank {r} of the group rejected its input: {text(r)}")
    for i, name in enumerate(names):
        column = table[:, i]
        if bool((column != column[0]).any()):
            parts = [text(r).split("\x00") for r in range(size)]
            values = [p[i] if i < len(p) else "(too long to show)" for p in parts]
            shown = ", ".join(f"rank {r}: {val}" for r, val in enumerate(values))
            raise ValueError(
                f"{where}: every rank of the group must pass the same {name}; got {shown}"
            )
