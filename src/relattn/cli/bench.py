"""``relattn bench``: relattn's backends against PyTorch's attention, on this machine.

Runs the CPU benchmark always and the GPU benchmark where CUDA is available, shows a progress
bar, prints the tables and, with ``--out FILE``, writes them as Markdown with the machine. The
measurements themselves live in :mod:`relattn.bench`; this module only drives them.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's flags."""
    parser.add_argument(
        "--n", help="comma-separated sequence lengths for the CPU benchmark (e.g. 1024,2048)"
    )
    parser.add_argument("--repeats", type=int, help="timed repeats per contender (median)")
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds")
    parser.add_argument("--out", help="also write the tables to this Markdown file")
    parser.add_argument("--no-gpu", action="store_true", help="skip the GPU benchmark")
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (default: all cores available)"
    )


def _lengths(text: str | None) -> list[int] | None:
    from .main import CLIError

    if text is None:
        return None
    try:
        ns = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CLIError(
            f"--n must be comma-separated integers like 1024,2048; got {text!r}"
        ) from None
    if not ns or any(n < 1 for n in ns):
        raise CLIError(f"--n must list positive sequence lengths; got {text!r}")
    return ns


# Sizes when --n is not given: a few seconds with --quick, a few minutes without.
QUICK_NS = [256, 512]
DEFAULT_NS = [1024, 2048, 4096]
DEFAULT_REPEATS = 3


class _Bar:
    """A progress bar fed by the benchmarks' ``progress(line)`` callback, one call per
    measurement; the bar shows the part of the line before its first colon."""

    def __init__(self, total: int, desc: str) -> None:
        from ..demo.progress import Progress

        self.bar = Progress(total, desc)

    def __call__(self, line: str) -> None:
        self.bar.update(1, at=line.split(":", 1)[0])

    def close(self) -> None:
        self.bar.close()


def _measure(ns: list[int] | None, args: argparse.Namespace) -> tuple[list[tuple], str]:
    """Run the CPU (and, with CUDA, GPU) benchmarks.

    Returns:
        ``[(title, description, markdown table), ...]`` and the machine as a Markdown list.
    """
    import torch

    from ..bench import common, cpu

    if ns is None:
        ns = QUICK_NS if args.quick else DEFAULT_NS
    repeats = args.repeats or (1 if args.quick else DEFAULT_REPEATS)
    bar = _Bar(len(ns) * (2 if args.quick else 3), "cpu")  # fwd, fwd+bwd (and memory)
    try:
        rows = cpu.run(ns, repeats, quick=args.quick, progress=bar)
    finally:
        bar.close()
    sections = [("CPU", cpu.describe(), cpu.to_markdown(rows))]
    if not args.no_gpu and torch.cuda.is_available():
        from ..bench import gpu

        steps = len(gpu.HEAD_DIMS) * (2 if args.quick else len(gpu.DTYPES) * len(gpu.NS))
        bar = _Bar(steps, "gpu")
        try:
            rows = gpu.run(quick=args.quick, progress=bar)
        finally:
            bar.close()
        sections.append(("GPU", gpu.describe(), gpu.to_markdown(rows)))
    return sections, common.format_machine(common.machine_info())


def run(args: argparse.Namespace) -> int:
    """Run the benchmarks and print (and optionally write) the tables."""
    import torch

    from ..demo.settings import available_cores
    from .main import CLIError

    ns = _lengths(args.n)
    if args.repeats is not None and args.repeats < 1:
        raise CLIError(f"--repeats must be >= 1; got {args.repeats}")
    if args.threads is not None and args.threads < 1:
        raise CLIError(f"--threads must be >= 1; got {args.threads}")
    out = Path(args.out).expanduser() if args.out else None
    if out is not None and (out.is_dir() or not out.parent.exists()):
        raise CLIError(f"--out {args.out!r} must be a file in an existing directory")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or available_cores())
    try:
        sections, machine = _measure(ns, args)
    finally:  # in-process callers (tests, notebooks) get their setting back
        torch.set_num_threads(previous_threads)
    text = "# relattn bench\n\n" + machine + "\n"
    for title, about, table in sections:
        text += f"\n## {title}\n\n{about}\n\n{table.rstrip()}\n"
    print(text)
    if out is not None:
        out.write_text(text)
        print(f"wrote {out}")
    return 0
