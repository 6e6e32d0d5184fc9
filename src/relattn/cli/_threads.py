"""Torch CPU threads for a command: how many cores there are, how many are idle, ``--threads``,
and running with a number of threads."""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator

from ._args import bounded_int

__all__ = ["available_cores", "default_threads", "threads_flag", "torch_threads"]


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """Torch threads for a small model: every available core on an idle machine, fewer when
    other processes already keep cores busy (oversubscribed intra-op threads spin and wait on
    each other, which costs far more than it gains for matrices this small)."""
    cores = available_cores()
    try:
        busy = int(os.getloadavg()[0] + 0.5)
    except (AttributeError, OSError):
        busy = 0
    return max(1, min(cores, cores - busy))


def threads_flag(parser: argparse.ArgumentParser, default_help: str) -> None:
    """``--threads N`` with N between 1 and this machine's core count (more threads than cores
    only slow torch down, and thousands of them can exhaust a process limit)."""
    cores = os.cpu_count() or 1
    parser.add_argument(
        "--threads",
        type=bounded_int(1, cores, "a thread count"),
        metavar="N",
        help=f"torch CPU threads, 1..{cores} (default: {default_help})",
    )


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` torch threads; in-process callers (tests, notebooks) get theirs back."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
