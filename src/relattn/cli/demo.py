"""``relattn demo``: train short, test long.

Trains one small byte-level language model per position encoding on short windows of real text
(the Python standard library's own source by default), measures held-out perplexity on windows
up to 8× (16× with ``--long``) longer, and writes a report folder with tables, plots, every number
and the checkpoints.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..demo.train import DEFAULT_ENCODINGS, ENCODINGS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's flags."""
    parser.add_argument(
        "--pe",
        default=",".join(DEFAULT_ENCODINGS),
        help=f"comma-separated encodings to train, from {','.join(ENCODINGS)} "
        f"(default: {','.join(DEFAULT_ENCODINGS)})",
    )
    parser.add_argument("--context", type=int, help="training length L in bytes (default 128)")
    parser.add_argument("--long", action="store_true", help="also evaluate at 16L")
    parser.add_argument(
        "--data", help="a text file or directory to use instead of the stdlib's .py files"
    )
    parser.add_argument("--out", default="relattn-report", help="report folder")
    parser.add_argument("--seed", type=int, default=0, help="file split, init and batch order")
    parser.add_argument("--quick", action="store_true", help="tiny models, few steps (< 1 min)")
    parser.add_argument(
        "--resume", action="store_true", help="keep the models a previous run in --out finished"
    )
    parser.add_argument("--steps", type=int, help="training steps per model")
    parser.add_argument("--batch-size", type=int, help="training windows per step")
    parser.add_argument("--max-bytes", type=int, help="cap on training bytes read")
    parser.add_argument("--eval-bytes", type=int, help="held-out bytes evaluated per length")
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (default: the cores not already busy)"
    )


def _encodings(text: str) -> list[str]:
    from .main import CLIError

    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if not names:
        raise CLIError(f"--pe must name at least one encoding from {','.join(ENCODINGS)}")
    unknown = [n for n in names if n not in ENCODINGS]
    if unknown:
        raise CLIError(f"--pe: unknown encoding {unknown[0]!r}; choose from {','.join(ENCODINGS)}")
    if len(set(names)) != len(names):
        raise CLIError(f"--pe lists an encoding twice: {text!r}")
    return names


def settings_from_args(args: argparse.Namespace):
    """Validate the flags and turn them into :class:`relattn.demo.settings.DemoSettings`."""
    from ..demo.settings import DemoSettings
    from .main import CLIError

    s = DemoSettings.preset(args.quick)
    s.encodings = _encodings(args.pe)
    s.long = bool(args.long)
    s.seed = args.seed
    minimum = {"context": 2, "steps": 1, "batch_size": 1, "max_bytes": 1, "eval_bytes": 1}
    for name, low in minimum.items():
        value = getattr(args, name)
        if value is not None and value < low:
            raise CLIError(f"--{name.replace('_', '-')} must be >= {low}; got {value}")
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
            raise CLIError(f"--data {args.data!r} does not exist")
        s.data = str(Path(args.data).expanduser().resolve())
    if args.threads is not None and args.threads < 1:
        raise CLIError(f"--threads must be >= 1; got {args.threads}")
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
    import torch

    from ..demo import experiment
    from ..demo.settings import default_threads
    from .main import CLIError

    settings = settings_from_args(args)
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {args.out!r} exists and is not a directory")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or default_threads())
    try:
        results, summary = experiment.run(settings, out, resume=args.resume)
    except experiment.DemoError as e:
        raise CLIError(str(e)) from None
    except KeyboardInterrupt:
        print(
            f"relattn demo: stopped; finished models are saved in {out / 'results.json'} — "
            "run again with --resume to continue",
            file=sys.stderr,
        )
        raise
    finally:  # in-process callers (tests, notebooks) get their setting back
        torch.set_num_threads(previous_threads)
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
