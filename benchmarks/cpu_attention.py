"""CPU benchmark: relattn chunked vs reference vs SDPA (with and without the bias) vs
FlexAttention. Prints a Markdown table and optionally writes it to ``--out``.

    python benchmarks/cpu_attention.py --ns 1024 2048 4096 --repeats 11 --out cpu.md
"""

from __future__ import annotations

import argparse
import sys

from relattn.bench import cpu
from relattn.bench.common import format_machine, machine_info, write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ns", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--quick", action="store_true", help="one repetition, no memory")
    parser.add_argument("--out", help="write the Markdown table here")
    parser.add_argument("--json", help="write the raw rows here")
    args = parser.parse_args(argv)
    info = machine_info()
    rows = cpu.run(
        args.ns, args.repeats, quick=args.quick, progress=lambda s: print(s, file=sys.stderr)
    )
    text = f"{cpu.describe()}\n\n{format_machine(info)}\n\n{cpu.to_markdown(rows)}\n"
    write_report(text, info, rows, args.out, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
