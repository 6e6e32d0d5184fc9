"""CPU benchmark: relattn chunked vs reference vs SDPA (with and without the bias) vs
FlexAttention. The same flags as ``relattn bench`` (see ``--help``); the numbers in
BENCHMARKS.md come from

    python benchmarks/cpu_attention.py --n 1024,2048,4096,8192,16384,32768 --repeats 11 \
        --out cpu.md --json cpu.json
"""

from __future__ import annotations

from relattn.cli.bench import main

if __name__ == "__main__":
    raise SystemExit(main(device="cpu"))
