"""``relattn bench``: relattn's backends against PyTorch's attention, on this machine.

The one front end of the benchmarks: ``relattn bench`` and the scripts in benchmarks/ (which
call :func:`main` with ``--device``) take the same flags. The CPU benchmark runs always (unless
--device gpu), the GPU benchmark where CUDA is available; a progress bar shows each measurement,
the tables are printed, and --out / --json write them (checked before anything is measured).
The measurements themselves live in :mod:`relattn.benchmarking`.
"""

from __future__ import annotations

import argparse
import json
import sys

from .._errors import UserError
from .._progress import Progress
from ._args import bounded_int
from ._paths import check_writable_file
from ._threads import available_cores, threads_flag, torch_threads

# Sizes when --n is not given: a few seconds with --quick, a few minutes without.
QUICK_NS = [256, 512]
DEFAULT_NS = [1024, 2048, 4096]
# The fewest timed rounds per contender, and the seconds of timed calls per N and pass
# (forward, forward+backward) below which more rounds are taken: short calls get many rounds.
DEFAULT_REPEATS = 5
QUICK_REPEATS = 7
MIN_TIME = 2.0
QUICK_MIN_TIME = 0.5
QUICK_CAVEAT = (
    "--quick is a smoke run: small N, a fraction of a second of timed calls per N, and a "
    "machine whose other work is not controlled. It shows that every contender runs; its times "
    "and ratios are not a measurement. Compare backends with a run without --quick."
)
MAX_N = 1 << 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's flags."""
    parser.add_argument(
        "--n",
        metavar="N,N,...",
        help="comma-separated sequence lengths for the CPU benchmark (e.g. 1024,2048)",
    )
    parser.add_argument(
        "--repeats",
        type=bounded_int(1, 1000),
        metavar="R",
        help=(
            "the fewest timed rounds per contender (more are taken while the calls are short; "
            f"median; default {DEFAULT_REPEATS}, {QUICK_REPEATS} with --quick)"
        ),
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds")
    parser.add_argument(
        "--check",
        action="store_true",
        help="GPU: what the targets need (bf16, D=128, N=8k and 16k) and the targets table",
    )
    parser.add_argument(
        "--device",
        choices=("all", "cpu", "gpu"),
        default="all",
        help="which benchmarks to run (default all: GPU only with CUDA)",
    )
    parser.add_argument("--no-gpu", action="store_true", help="same as --device cpu")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="the CPU benchmark's dtype: inputs and the encoding's table (default float32)",
    )
    parser.add_argument("--out", metavar="FILE", help="also write the tables as Markdown")
    parser.add_argument("--json", metavar="FILE", help="also write the raw rows as JSON")
    threads_flag(parser, "all cores available")


def _lengths(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        ns = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(
            f"--n must be comma-separated integers like 1024,2048; got {text!r}"
        ) from None
    if not ns or any(not 1 <= n <= MAX_N for n in ns):
        raise UserError(f"--n must list sequence lengths between 1 and {MAX_N}; got {text!r}")
    return ns


def _bar(total: int, desc: str):
    """A progress callback for the benchmarks' ``progress(line)``: one call per measurement;
    the bar shows the part of the line before its first colon."""
    bar = Progress(total, desc)

    def progress(line: str) -> None:
        bar.update(1, at=line.split(":", 1)[0])

    return bar, progress


def measure(
    ns: list[int] | None,
    repeats: int | None,
    quick: bool,
    device: str,
    check: bool = False,
    dtype: str = "float32",
) -> dict:
    """Run the CPU and/or GPU benchmarks (``check``: the GPU targets' settings and table;
    ``dtype``: the CPU benchmark's, a key of :data:`relattn.benchmarking.cpu.DTYPES`).

    Returns:
        ``{"machine": {...}, "sections": [(key, title, description, markdown, rows), ...]}``.
    """
    import torch

    from ..benchmarking import common, cpu

    sections = []
    if device in ("all", "cpu"):
        cpu_dtype = cpu.DTYPES[dtype]
        ns = ns or (QUICK_NS if quick else DEFAULT_NS)
        reps = repeats or (QUICK_REPEATS if quick else DEFAULT_REPEATS)
        min_time = QUICK_MIN_TIME if quick else MIN_TIME
        bar, progress = _bar(len(ns) * (2 if quick else 3), "cpu")  # fwd, fwd+bwd (and memory)
        try:
            rows = cpu.run(
                ns, reps, quick=quick, progress=progress, min_time=min_time, dtype=cpu_dtype
            )
        finally:
            bar.close()
        about = cpu.describe(cpu_dtype) + (f"\n\n**{QUICK_CAVEAT}**" if quick else "")
        sections.append(("cpu", "CPU", about, cpu.to_markdown(rows), rows))
    if device == "gpu" and not torch.cuda.is_available():
        raise UserError("--device gpu needs CUDA; torch.cuda.is_available() is False here")
    if device in ("all", "gpu") and torch.cuda.is_available():
        from ..benchmarking import gpu

        steps = 2 if check else len(gpu.HEAD_DIMS) * (2 if quick else len(gpu.DTYPES) * len(gpu.NS))
        bar, progress = _bar(steps, "gpu")
        try:
            rows = gpu.run(quick=quick, progress=progress, check=check)
        finally:
            bar.close()
        table = gpu.to_markdown(rows)
        if check:
            table += "\nTargets (ratios from this run):\n\n" + gpu.targets_markdown(rows)
        sections.append(("gpu", "GPU", gpu.describe(), table, rows))
    return {"machine": common.machine_info(), "sections": sections}


def run(args: argparse.Namespace) -> int:
    """Run the benchmarks and print (and optionally write) the tables."""
    from ..benchmarking import common

    ns = _lengths(args.n)
    device = "cpu" if args.no_gpu else args.device
    out = check_writable_file("--out", args.out) if args.out else None
    json_path = check_writable_file("--json", args.json) if args.json else None
    with torch_threads(args.threads or available_cores()):
        result = measure(ns, args.repeats, args.quick, device, args.check, args.dtype)
    text = "# relattn bench\n\n" + common.format_machine(result["machine"]) + "\n"
    for _key, title, about, table, _rows in result["sections"]:
        text += f"\n## {title}\n\n{about}\n\n{table.rstrip()}\n"
    print(text)
    try:
        if out is not None:
            out.write_text(text)
            print(f"wrote {out}")
        if json_path is not None:
            rows = {key: rows for key, _t, _a, _m, rows in result["sections"]}
            json_path.write_text(
                json.dumps({"machine": result["machine"], "rows": rows}, indent=1, default=str)
            )
            print(f"wrote {json_path}")
    except OSError as e:
        raise UserError(f"cannot write the results: {e.strerror or e}") from None
    return 0


def main(argv: list[str] | None = None, device: str = "all") -> int:
    """``relattn bench`` with ``--device device`` first (what the scripts in benchmarks/ call)."""
    from .main import main as relattn_main

    args = list(sys.argv[1:] if argv is None else argv)
    return relattn_main(["bench", "--device", device, *args])
