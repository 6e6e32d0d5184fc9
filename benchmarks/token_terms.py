"""CPU training speed and memory of the terms that depend on the tokens in the fused C++ kernel
(``cpu_kernel``): the query-conditioned banded bias (r, P) and the forget gate (F), against
SDPA, side by side in one process: forward+backward, fp32, causal, B=1, H=8, D=64, rank 16,
extent 1024, every gradient (q, k, v and r, P or F). Contenders:

* ``sdpa``: ``scaled_dot_product_attention(is_causal=True)`` without a position term (the
  bias-free limit);
* ``sdpa_band``: SDPA with the banded bias materialized as a (B, H, N, N) float mask (r·P
  gathered by offset, zero outside the band, -inf above the diagonal; gradients to r and P by
  autograd), what a user writes today;
* ``kernel``: ``cpu_kernel`` without a term; ``kernel_band``, ``kernel_gate``: with the band,
  with the forget gate (the backend driven through a ``Call``, its forward and backward).

Medians over interleaved rounds, the per-round ratio's quartiles, and the peak extra resident
memory of one step (``relattn.benchmarking.common.peak_memory``, RSS sampled every 0.5 ms).

    python benchmarks/token_terms.py --n 4096 --threads 1 2 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

NAMES = ("sdpa", "sdpa_band", "kernel", "kernel_band", "kernel_gate")


def contenders(
    n: int, heads: int = 8, d: int = 64, rank: int = 16, extent: int = 1024
) -> dict[str, Callable[[], object]]:
    """One training step (forward + backward, every gradient) of each contender at length n."""
    from relattn.backends import get
    from relattn.backends.base import Call, TokenTerms
    from relattn.problem import Problem

    g = torch.Generator().manual_seed(0)
    q, k, v, grad_out = (torch.randn(1, heads, n, d, generator=g) for _ in range(4))
    r = torch.randn(1, heads, n, rank, generator=g)
    w = 0.1 * torch.randn(1, rank, extent, generator=g)
    f = F.logsigmoid(3 + torch.randn(1, heads, n, generator=g)).cumsum(-1)
    backend = get("cpu_kernel")
    problem = Problem(0, d**-0.5)
    plain = Call(q, k, v, None, None, problem, backend)
    band = plain._replace(token=TokenTerms(r, w, None, None))
    gate = plain._replace(token=TokenTerms(None, None, f, f))

    def kernel(call: Call) -> Callable[[], object]:
        def step() -> object:
            out, lse = backend.forward(call)
            return backend.backward(call, grad_out, out, lse)

        return step

    delta = torch.arange(n)[:, None] - torch.arange(n)[None, :]
    index = torch.where((delta >= 0) & (delta < extent), delta, extent)  # extent: a zero column
    causal = torch.zeros(n, n).masked_fill(delta < 0, float("-inf"))

    def sdpa() -> object:
        qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
        out = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True)
        out.backward(grad_out)
        return qq.grad

    def sdpa_band() -> object:
        qq, kk, vv, rr, ww = (x.detach().requires_grad_() for x in (q, k, v, r, w))
        rp = F.pad(rr @ ww, (0, 1))  # (B, H, N, extent + 1), the last column 0
        bias = rp.gather(-1, index.expand(1, heads, n, n)) + causal
        out = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=bias)
        out.backward(grad_out)
        return rr.grad

    return {
        "sdpa": sdpa,
        "sdpa_band": sdpa_band,
        "kernel": kernel(plain),
        "kernel_band": kernel(band),
        "kernel_gate": kernel(gate),
    }


def main(argv: list[str] | None = None) -> int:
    from relattn.benchmarking.common import (
        format_machine,
        machine_info,
        peak_memory,
        round_ratios,
        spread,
        time_rounds,
    )

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--names", nargs="+", default=list(NAMES), choices=NAMES)
    args = parser.parse_args(argv)
    fns = {name: fn for name, fn in contenders(args.n).items() if name in args.names}
    print(format_machine(machine_info()), flush=True)
    lines = ["| threads | contender | s / step | / sdpa (round IQR) | peak MiB |", "|---" * 5 + "|"]
    for threads in args.threads:
        torch.set_num_threads(threads)
        rounds = time_rounds(fns, args.rounds, warmup=1)
        memory = {name: peak_memory(fn) for name, fn in fns.items()} if threads == 1 else {}
        for name in fns:
            times = rounds[name]
            if not isinstance(times, list):
                lines.append(f"| {threads} | {name} | {times} | | |")
                continue
            med = sorted(times)[len(times) // 2]
            ratio = spread(round_ratios(rounds, name, "sdpa"), len(times), ".2f")
            mib = f"{memory[name] / 2**20:.0f}" if name in memory else ""
            lines.append(f"| {threads} | {name} | {med:.3f} | {ratio} | {mib} |")
            print(lines[-1], flush=True)
        print(f"(threads {threads}: load average {os.getloadavg()[0]:.1f})", flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
