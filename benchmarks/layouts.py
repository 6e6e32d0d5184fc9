"""What a memory layout costs: the copy that conforming an input to a backend's declared layout
forces (``relattn.backends.base.conform``), in a full call at N = 4096 and in one decoding step
against a 4096-key cache. Prints Markdown; ``--out`` also writes it.

    python benchmarks/layouts.py --threads 1 --out layouts.md

Layouts: ``contiguous``; ``bnhd`` ((B, N, H, D) storage viewed as (B, H, N, D), what splitting
heads after a projection gives: D dense); ``strided_d`` (``x[..., ::2]``); ``permuted`` ((D, N,
H, B) storage). Median of ``--repeats`` timed calls after 3 warm-up calls.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import relattn
from relattn.benchmarking.common import format_machine, machine_info, write_report
from relattn.pe import T5Bias

B, H, D = 1, 8, 64


def _lay(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "bnhd":
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if name == "strided_d":
        buf = torch.empty(*x.shape[:-1], 2 * x.shape[-1])
        buf[..., ::2] = x
        return buf[..., ::2]
    if name == "permuted":
        return x.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0)
    return x


def _median(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def full_rows(n: int, repeats: int) -> list[str]:
    """Forward (no grad) of a full causal call through ``auto`` (the CPU kernel)."""
    g = torch.Generator().manual_seed(0)
    pe = T5Bias(H)
    base = [torch.randn(B, H, n, D, generator=g) for _ in range(3)]
    rows = []
    with torch.no_grad():
        ref = None
        for name in ("contiguous", "bnhd", "strided_d", "permuted"):
            q, k, v = (_lay(x, name) for x in base)
            call = _median(lambda q=q, k=k, v=v: relattn.attention(q, k, v, pe), repeats)
            copy = _median(lambda q=q, k=k, v=v: [x.contiguous() for x in (q, k, v)], repeats)
            ref = ref or call
            rows.append(
                f"| full N={n} | {name} | {call * 1e3:.1f} ms | {copy * 1e3:.2f} ms | "
                f"{(call / ref - 1) * 100:+.1f} % |"
            )
    return rows


def step_rows(nk: int, repeats: int) -> list[str]:
    """One generated token (no grad) against an ``nk``-key cache through ``auto``: the strided
    query is copied (B·Hq·D elements); a cache with D strided is copied whole at every step."""
    g = torch.Generator().manual_seed(1)
    pe = T5Bias(H)
    q0 = torch.randn(B, H, 1, D, generator=g)
    k0, v0 = (torch.randn(B, H, nk, D, generator=g) for _ in range(2))
    rows = []
    with torch.no_grad():
        ref = None
        for q_name, kv_name in (
            ("contiguous", "contiguous"),
            ("strided_d", "contiguous"),
            ("contiguous", "bnhd"),
            ("contiguous", "strided_d"),
        ):
            q, k, v = _lay(q0, q_name), _lay(k0, kv_name), _lay(v0, kv_name)
            call = _median(lambda q=q, k=k, v=v: relattn.attention(q, k, v, pe, q_offset=nk - 1),
                           repeats)  # fmt: skip
            ref = ref or call
            rows.append(
                f"| step Nk={nk} | q {q_name}, k/v {kv_name} | {call * 1e6:.1f} µs | | "
                f"{(call / ref - 1) * 100:+.1f} % |"
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--step-repeats", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="write the Markdown here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lines = [
        f"Layouts (fp32, B={B}, H={H}, D={D}, T5, no grad, {args.threads} thread(s))",
        "",
        format_machine(machine_info()),
        "",
        "| call | layout | time | copies alone | vs contiguous |",
        "|---|---|---|---|---|",
        *full_rows(args.n, args.repeats),
        *step_rows(args.n, args.step_repeats),
    ]
    write_report("\n".join(lines), machine_info(), [], args.out, None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
