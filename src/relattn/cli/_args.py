"""Argument types every command shares: bounded numbers (the message names the range) and
``--seed``."""

from __future__ import annotations

import argparse
from collections.abc import Callable

__all__ = ["SEED_MAX", "bounded_float", "bounded_int", "seed_flag"]

# Seeds reach torch.Generator.manual_seed, which takes at most 64 bits; 2**63 - 1 keeps every
# consumer (int64 tensors, numpy) safe.
SEED_MAX = 2**63 - 1


def bounded_int(low: int, high: int | None = None, what: str = "an int") -> Callable[[str], int]:
    """An argparse ``type=`` accepting integers in ``[low, high]``; the message names the range
    (argparse prefixes it with the flag)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            span = f"between {low} and {high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {what} {span}; got {text!r}")
        return value

    parse.__name__ = "int"
    return parse


def bounded_float(low: float, high: float, what: str = "a number") -> Callable[[str], float]:
    """An argparse ``type=`` accepting finite floats in ``[low, high]``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not low <= value <= high:  # NaN fails too
            raise argparse.ArgumentTypeError(
                f"must be {what} between {low:g} and {high:g}; got {text!r}"
            )
        return value

    parse.__name__ = "float"
    return parse


def seed_flag(parser: argparse._ActionsContainer, help: str, default: int | None = None) -> None:
    """``--seed S`` with S in ``[0, 2**63 - 1]``; ``help`` says what it seeds (and its default)."""
    parser.add_argument(
        "--seed",
        type=bounded_int(0, SEED_MAX),
        default=default,
        metavar="S",
        help=help,
    )
