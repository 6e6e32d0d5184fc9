"""CPU training speed under two machine settings on the machine at hand: forward+backward of
relattn (the fused C++ kernel ``cpu_kernel``, which ``auto`` picks, and the pure-PyTorch
``chunked``) against SDPA without a position term and SDPA with the bias materialized, fp32,
B=1, H=8, D=64, learnable T5Bias, causal; per-round ratios (median and IQR).

Settings (each in a fresh process, so torch and relattn read them at import):

- ``avx512``: the machine as it is (torch's kernels at their best ISA, caches from sysfs);
- ``avx2``: an AVX2-class machine: torch's kernels at AVX2 (``ATEN_CPU_CAPABILITY``), MKL and
  oneDNN capped at AVX2, relattn's C++ kernel built without its AVX-512 clone
  (``RELATTN_CPU_KERNEL_ISA``), and chunked's schedule for a Zen 3 core's caches (32 KiB L1d,
  512 KiB L2, 32 MiB L3) through ``RELATTN_CPU_CACHES``. The cache sizes themselves are still
  this machine's.

    python benchmarks/cpu_schedule.py --ns 2048 4096 --rounds 11 --out schedule.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SETTINGS = {
    "avx512": {},
    "avx2": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "RELATTN_CPU_CACHES": "l1d=32K,l2=512K,l3=32M",
        "RELATTN_CPU_KERNEL_ISA": "avx2",
    },
}
NAMES = ("cpu_kernel", "chunked", "sdpa_causal", "sdpa_bias")


def worker(ns: list[int], rounds: int, threads: int | None) -> dict:
    """Runs in the child: per-round forward+backward times of every contender at every N."""
    import torch

    from relattn._machine import CPU, SCHEDULE
    from relattn.benchmarking.common import time_rounds

    if threads:
        torch.set_num_threads(threads)
    result = {"cpu": CPU.describe(), "schedule": vars(SCHEDULE), "rows": []}
    result["threads"] = torch.get_num_threads()
    result["loadavg"] = os.getloadavg()[0]
    for n in ns:
        fns = _contenders(n)
        times = time_rounds(fns, rounds, warmup=1)
        result["rows"].append({"n": n, "times": times})
        print(f"N={n}: done", file=sys.stderr)
    return result


def _contenders(n: int) -> dict:
    """fwd+bwd of chunked, SDPA is_causal and SDPA with the materialized bias at length n."""
    import torch
    import torch.nn.functional as F

    import relattn
    from relattn.pe import T5Bias

    b, h, d = 1, 8, 64
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(b, h, n, d, generator=g).requires_grad_() for _ in range(3))
    grad = torch.randn(b, h, n, d, generator=g)
    pe = T5Bias(h)
    causal = torch.ones(n, n, dtype=torch.bool).triu_(1)

    def cpu_kernel():
        relattn.attention(q, k, v, pe, backend="cpu_kernel").backward(grad)

    def chunked():
        relattn.attention(q, k, v, pe, backend="chunked").backward(grad)

    def sdpa_causal():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)

    def sdpa_bias():
        bias = pe.bias(n, n).masked_fill(causal, float("-inf"))[None]
        F.scaled_dot_product_attention(q, k, v, attn_mask=bias).backward(grad)

    return {
        "cpu_kernel": cpu_kernel,
        "chunked": chunked,
        "sdpa_causal": sdpa_causal,
        "sdpa_bias": sdpa_bias,
    }


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    import statistics

    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ns", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--threads", type=int, nargs="+", default=[0], help="0: torch's default")
    parser.add_argument("--out")
    parser.add_argument("--json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.ns, args.rounds, args.threads[0] or None)))
        return 0
    runs = []
    for setting in args.settings:
        for threads in args.threads:
            env = {**os.environ, **SETTINGS[setting]}
            cmd = [sys.executable, __file__, "--worker", "--ns", *map(str, args.ns)]
            cmd += ["--rounds", str(args.rounds), "--threads", str(threads)]
            start = time.perf_counter()
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            run = json.loads(out.stdout.strip().splitlines()[-1])
            run["setting"] = setting
            runs.append(run)
            print(f"{setting}, {run['threads']} threads: {time.perf_counter() - start:.0f} s",
                  file=sys.stderr)  # fmt: skip
    lines = [
        "| setting | threads | N | cpu_kernel s | chunked s | SDPA causal s | SDPA + bias s | "
        "cpu_kernel ÷ SDPA causal | SDPA + bias ÷ cpu_kernel | chunked ÷ SDPA causal |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ratio(a: list[float], b: list[float], digits: int) -> str:
        q1, q2, q3 = _quartiles([x / y for x, y in zip(a, b, strict=True)])
        return f"{q2:.{digits}f} ({q1:.{digits}f}–{q3:.{digits}f})"

    for run in runs:
        for row in run["rows"]:
            t = row["times"]
            med = {name: _quartiles(t[name])[1] for name in NAMES}
            lines.append(
                f"| {run['setting']} | {run['threads']} | {row['n']} | "
                f"{med['cpu_kernel']:.3f} | {med['chunked']:.3f} | "
                f"{med['sdpa_causal']:.3f} | {med['sdpa_bias']:.3f} | "
                f"{ratio(t['cpu_kernel'], t['sdpa_causal'], 3)} | "
                f"{ratio(t['sdpa_bias'], t['cpu_kernel'], 2)} | "
                f"{ratio(t['chunked'], t['sdpa_causal'], 3)} |"
            )
    machines = "\n".join(
        f"- {r['setting']} ({r['threads']} threads, load {r['loadavg']:.1f}): {r['cpu']}; "
        f"schedule {r['schedule']}"
        for r in runs
    )
    text = f"{machines}\n\n" + "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(runs, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
