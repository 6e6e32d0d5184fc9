"""``relattn`` entry point. Each subcommand lives in its own module with ``add_arguments(parser)``
and ``run(args) -> int``; bad input is one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "explain": "show which dot products each query computes, the PE term and the weights",
    "demo": "train short, test long: perplexity of small models per position encoding",
    "bench": "benchmark relattn's backends against PyTorch's attention on this machine",
}


class CLIError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        raise CLIError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="relattn", description="Causal attention with relative positions.")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, help_text in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _module(name).add_arguments(p)
    return parser


def _module(name: str):
    return importlib.import_module(f"relattn.cli.{name}")


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            raise CLIError(f"choose a command: {', '.join(SUBCOMMANDS)} (see relattn --help)")
        return int(_module(args.command).run(args) or 0)
    except CLIError as e:
        print(f"relattn: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("relattn: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # Run as a script this file is a second module, `__main__`, whose CLIError is not the one the
    # subcommands raise: call the package's copy.
    from relattn.cli.main import main as _main

    sys.exit(_main())
