"""``relattn demo``: train short, test long.

Trains one small byte-level language model per position encoding on short windows of real text
(the Python standard library's own source by default, or --data FILE_OR_FOLDER), measures
held-out perplexity on windows up to 8x (16x with --long) longer, and writes a report folder
with tables, plots, what each model attends to, sample generations, every number and the
checkpoints (each usable with `relattn generate` and `relattn explain --checkpoint`).

--data takes a text file or a folder of text files. Text is split into training and held-out
parts by file; a single file is cut into chunks first. Evaluation needs --eval-bytes of held-out
text (at least two windows of the longest length); with a small file, lower --eval-bytes or
--context as the error message says.
"""

from __future__ import annotations

import argparse
import sys

from .._errors import UserError
from ._args import bounded_int, seed_flag
from ._paths import check_writable_dir
from ._pe_flags import parse_pe
from ._threads import default_threads, threads_flag, torch_threads


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's flags."""
    from ..demo.trainer import DEFAULT_ENCODINGS

    parser.add_argument(
        "--pe",
        default=",".join(DEFAULT_ENCODINGS),
        help="comma-separated models to train, each an encoding (none, a registered name) or a "
        f"composition like rope+t5 (default: {','.join(DEFAULT_ENCODINGS)})",
    )
    parser.add_argument(
        "--context",
        type=bounded_int(2, 1 << 16),
        metavar="L",
        help="training length L in bytes (default 128; 64 with --quick)",
    )
    parser.add_argument("--long", action="store_true", help="also evaluate at 16L")
    parser.add_argument(
        "--data",
        metavar="FILE_OR_FOLDER",
        help="a text file or folder of text files instead of the stdlib's .py files",
    )
    parser.add_argument("--out", default="relattn-report", help="report folder")
    seed_flag(parser, "file split, init and batch order (default 0)", default=0)
    parser.add_argument("--quick", action="store_true", help="tiny models, few steps (< 1 min)")
    parser.add_argument(
        "--resume", action="store_true", help="keep the models a previous run in --out finished"
    )
    parser.add_argument(
        "--steps", type=bounded_int(1, 10**9), metavar="N", help="training steps per model"
    )
    parser.add_argument(
        "--batch-size", type=bounded_int(1, 1 << 16), metavar="B", help="training windows per step"
    )
    parser.add_argument(
        "--max-bytes", type=bounded_int(1, 1 << 40), metavar="N", help="cap on training bytes read"
    )
    parser.add_argument(
        "--eval-bytes",
        type=bounded_int(1, 1 << 30),
        metavar="N",
        help="held-out bytes evaluated per length",
    )
    threads_flag(parser, "the cores not already busy")


def _encodings(text: str) -> list[str]:
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if not names:
        raise UserError("--pe must name at least one encoding (e.g. alibi,t5)")
    canonical = ["+".join(parse_pe(n)) or "none" for n in names]
    if len(set(canonical)) != len(canonical):
        raise UserError(f"--pe lists an encoding twice: {text!r}")
    from ..demo.trainer import model_encoding

    for name in canonical:
        try:
            model_encoding([n for n in name.split("+") if n != "none"])
        except ValueError as e:
            raise UserError(f"--pe {name}: {e}") from None
    return canonical


def settings_from_args(args: argparse.Namespace):
    """Validate the flags and turn them into :class:`relattn.demo.settings.DemoSettings`."""
    from pathlib import Path

    from ..demo.settings import DemoSettings

    s = DemoSettings.preset(args.quick)
    s.encodings = _encodings(args.pe)
    s.long = bool(args.long)
    s.seed = args.seed
    for flag, field in (
        ("context", "context"),
        ("steps", "steps"),
        ("batch_size", "batch_size"),
        ("max_bytes", "train_bytes"),
        ("eval_bytes", "eval_bytes"),
    ):
        if getattr(args, flag) is not None:
            setattr(s, field, getattr(args, flag))
    if args.data is not None:
        if not Path(args.data).expanduser().exists():
            raise UserError(f"--data {args.data!r} does not exist")
        s.data = str(Path(args.data).expanduser().resolve())
    return s


def _table(results: dict, names: list[str]) -> str:
    rows = [(n, results["models"][n]["eval"]) for n in names if n in results["models"]]
    lengths = [r["length"] for r in rows[0][1]]
    width = max(8, *(len(n) for n, _ in rows))
    lines = [f"{'encoding':<{width}}" + "".join(f"{f'N={n}':>10}" for n in lengths)]
    for name, ev in rows:
        lines.append(f"{name:<{width}}" + "".join(f"{r['ppl']:>10.3f}" for r in ev))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run the demo; prints the perplexity table, where the report is, and what it shows."""
    from ..demo import experiment

    settings = settings_from_args(args)
    out = check_writable_dir("--out", args.out)
    try:
        with torch_threads(args.threads or default_threads()):
            results, summary = experiment.run(settings, out, resume=args.resume)
    except experiment.DemoError as e:
        raise UserError(str(e)) from None
    except KeyboardInterrupt:
        print(
            f"relattn demo: stopped; finished models are saved in {out / 'results.json'} — "
            "run again with --resume to continue",
            file=sys.stderr,
        )
        raise
    print(f"\nHeld-out perplexity per byte (trained at N={settings.context}):\n")
    print(_table(results, settings.encodings))
    print(f"\nReport: {out / 'report.md'} (also report.html, results.json, plots, checkpoints/)")
    if settings.quick:
        summary.append(
            "(--quick trains tiny models for a few seconds: it checks that everything runs; "
            "run without --quick for numbers worth reading.)"
        )
    print("\n" + "\n".join(summary))
    return 0
