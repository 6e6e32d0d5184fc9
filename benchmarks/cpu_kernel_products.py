"""CPU training speed of the fused C++ kernel (``backend="cpu_kernel"``) against the chunked
backend and SDPA, side by side in one process: forward+backward, fp32, B=1, H=8, D=64, causal,
learnable T5Bias (SDPA: no position term, and with the bias materialized), per-round medians
round-robin. Settings: 1 thread, 2 threads, and 2 threads while a busy loop
(``python -c 'while True: pass'``) holds one core. ``cpu_kernel_blas`` is the same kernel with
its float32 tile products from the BLAS torch exports (MKL's ``sgemm_``) instead of its own,
``cpu_kernel_aten`` with nested ``at::addmm_`` calls.

    python benchmarks/cpu_kernel_products.py --ns 2048 4096 --rounds 7 --out cpu_kernel_products.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

NAMES = ("cpu_kernel", "cpu_kernel_blas", "cpu_kernel_aten", "chunked", "sdpa_causal", "sdpa_bias")


def _contenders(n: int, names: tuple[str, ...]) -> dict:
    """cpu_schedule.py's contenders (one set of inputs at length n) and the kernel with BLAS or
    nested ``at::addmm_`` for its matrix products."""
    from cpu_schedule import _contenders as shared  # this folder is the script's sys.path[0]

    from relattn.backends import cpu_kernel

    fns = shared(n)
    mod = cpu_kernel.load()

    def with_products(name: str):
        def run() -> None:
            mod.set_products(name)
            try:
                fns["cpu_kernel"]()
            finally:
                mod.set_products("tiles")

        return run

    fns["cpu_kernel_blas"] = with_products("blas")
    fns["cpu_kernel_aten"] = with_products("aten")
    return {name: fns[name] for name in names}


def run(ns: list[int], rounds: int, threads: int, names: tuple[str, ...]) -> list[dict]:
    """Median seconds of each contender at each N, round-robin (same process)."""
    import torch

    from relattn.benchmarking.common import time_rounds

    torch.set_num_threads(threads)
    rows = []
    for n in ns:
        times = time_rounds(_contenders(n, names), rounds, warmup=1)
        rows.append({"n": n, "median": {k: statistics.median(t) for k, t in times.items()}})
    return rows


def _pressure() -> str:
    """The kernel's CPU pressure line (how much runnable work waited for a core), if any."""
    try:
        with open("/proc/pressure/cpu") as f:
            return "(cpu pressure: " + f.readline().strip() + ")"
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ns", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--names", nargs="+", default=list(NAMES), choices=NAMES)
    parser.add_argument("--settings", nargs="+", default=["1", "2", "2+busy"])
    parser.add_argument("--out", default=None, help="write the markdown table here too")
    args = parser.parse_args(argv)
    names = tuple(args.names)
    lines = [
        "| threads | N | " + " | ".join(f"{n} s" for n in names) + " | kernel / SDPA causal "
        "| chunked / SDPA causal | SDPA+bias / kernel |",
        "|" + "---|" * (len(names) + 5),
    ]
    for setting in args.settings:
        threads = int(setting.split("+")[0])
        busy = None
        if setting.endswith("+busy"):
            busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            time.sleep(0.5)
        try:
            rows = run(args.ns, args.rounds, threads, names)
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
        print(f"{setting}: load average {os.getloadavg()[0]:.1f} {_pressure()}", flush=True)
        for row in rows:
            med = row["median"]
            cells = " | ".join(f"{med[n]:.3f}" if isinstance(med[n], float) else "-" for n in names)

            def ratio(a: str, b: str, med=med) -> str:
                x, y = med.get(a), med.get(b)
                ok = isinstance(x, float) and isinstance(y, float)
                return f"{x / y:.2f}×" if ok else "-"

            lines.append(
                f"| {setting} | {row['n']} | {cells} | {ratio('cpu_kernel', 'sdpa_causal')} | "
                f"{ratio('chunked', 'sdpa_causal')} | {ratio('sdpa_bias', 'cpu_kernel')} |"
            )
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
