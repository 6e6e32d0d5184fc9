"""``relattn`` entry point. Each subcommand lives in its own module with ``add_arguments(parser)``
and ``run(args) -> int``; bad input is one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .._errors import UserError

__all__ = ["SUBCOMMANDS", "build_parser", "main"]

SUBCOMMANDS = {
    "explain": "show which dot products each query computes, the PE term and the weights",
    "train": "train a small byte-level model on your own text (a file, a folder, or the stdlib)",
    "generate": "continue a prompt with a trained checkpoint, streaming, with the KV cache",
    "demo": "train short, test long: perplexity of small models per position encoding",
    "bench": "benchmark relattn's backends against PyTorch's attention on this machine",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        raise UserError(message)


def build_parser() -> argparse.ArgumentParser:
    """The ``relattn`` parser with every subcommand's flags."""
    import relattn

    parser = _Parser(prog="relattn", description="Causal attention with relative positions.")
    parser.add_argument("--version", action="version", version=f"relattn {relattn.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, help_text in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=_module(name).__doc__)
        p.formatter_class = argparse.RawDescriptionHelpFormatter
        _module(name).add_arguments(p)
    return parser


def _module(name: str):
    return importlib.import_module(f"relattn.cli.{name}")


def main(argv: list[str] | None = None) -> int:
    """Run ``relattn`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            raise UserError(f"choose a command: {', '.join(SUBCOMMANDS)} (see relattn --help)")
        return int(_module(args.command).run(args) or 0)
    except UserError as e:
        print(f"relattn: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help and --version
        return e.code if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        print("relattn: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (``relattn explain ... | head``): stop quietly. Point stdout at
        # /dev/null so the interpreter's final flush does not raise again.
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a writer killed by the pipe


if __name__ == "__main__":
    # Run as a script this file is a second module, `__main__`; call the package's copy.
    from relattn.cli.main import main as _main

    sys.exit(_main())
