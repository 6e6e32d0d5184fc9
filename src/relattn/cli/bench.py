"""`relattn bench` (not yet built)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    from .main import CLIError

    raise CLIError("'relattn bench' is not built yet")
