"""GPU benchmark: relattn triton vs FlexAttention (score_mod) vs SDPA with the bias vs SDPA
flash/cuDNN is_causal. Prints a Markdown table and optionally writes it to ``--out``.

    python benchmarks/gpu_attention.py --out gpu.md --json gpu.json
"""

from __future__ import annotations

import argparse
import sys

from relattn.bench import gpu
from relattn.bench.common import format_machine, machine_info, write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="bf16, two N, no memory")
    parser.add_argument(
        "--check", action="store_true", help="what the targets need: bf16, D=128, N=8k and 16k"
    )
    parser.add_argument("--out", help="write the Markdown table here")
    parser.add_argument("--json", help="write the raw rows here")
    args = parser.parse_args(argv)
    say = lambda s: print(s, file=sys.stderr, flush=True)
    rows = gpu.run(quick=args.quick, progress=say, check=args.check)
    info = machine_info()
    text = f"{gpu.describe()}\n\n{format_machine(info)}\n\n{gpu.to_markdown(rows)}\n"
    text += f"\nTargets (ratios from this run):\n\n{gpu.targets_markdown(rows)}\n"
    write_report(text, info, rows, args.out, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
