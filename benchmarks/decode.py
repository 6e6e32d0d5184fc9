"""CPU decoding benchmark: one new token against Nk cached keys (relattn auto vs SDPA with the
bias row materialized vs SDPA without a position term), per-call overhead at Nk = 128, and the
first call of a fresh process. Prints Markdown; ``--out`` also writes it.

    python benchmarks/decode.py --threads 1 2 --out decode.md

Every contender is warmed up first (3 calls) except in the cold-start section, whose numbers
are a fresh process's first call by design.
"""

from __future__ import annotations

import argparse
import sys

import torch

from relattn.benchmarking import decode
from relattn.benchmarking.common import format_machine, machine_info, write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nks", type=int, nargs="+", default=[128, 1024, 4096, 16384])
    parser.add_argument("--encodings", nargs="+", default=["t5", "alibi"], choices=decode.ENCODINGS)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--kv-heads", type=int, default=decode.H, help="Hkv (GQA below 8)")
    parser.add_argument("--cold", type=int, default=5, help="fresh processes for cold start")
    parser.add_argument("--out", help="write the Markdown here")
    parser.add_argument("--json", help="write the raw rows here")
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
        help="q, k, v and the encoding (default float32)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    info = machine_info()
    parts, rows = [], []
    for threads in args.threads:
        torch.set_num_threads(threads)
        got = decode.decode_rows(
            args.nks, args.encodings, args.repeats, hkv=args.kv_heads,
            progress=lambda s: print(s, file=sys.stderr), dtype=dtype,
        )  # fmt: skip
        for r in got:
            r["threads"] = threads
        rows += got
        parts.append(f"### {threads} torch thread(s)\n\n{decode.describe(dtype)}\n\n")
        parts.append(decode.to_markdown(got) + "\n\n")
    cold = decode.cold_start(args.cold) if args.cold else None
    if cold:
        lines = [f"- {k}: {v[1]:.3f} s (IQR {v[0]:.3f}–{v[2]:.3f})" for k, v in cold.items()]
        parts.append(
            f"### First call in a fresh process ({args.cold} processes, no warm-up)\n\n"
            + "\n".join(lines)
            + "\n"
        )
        rows.append({"cold_start": cold})
    text = f"{format_machine(info)}\n\n" + "".join(parts)
    write_report(text, info, rows, args.out, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
