"""Context parallelism on this machine: W processes (gloo) against one process, same N.

    python benchmarks/context_parallel.py [--sizes 8192 16384 32768] [--world 2]

For each N it runs, each in fresh processes (so peak memory is clean):

- one process over the whole sequence (``relattn.attention``, chunked backend) with one thread,
  and with W threads up to ``--max-threaded``;
- W processes of one thread each over their shards (``context_parallel_attention``, ring,
  zigzag), and the contiguous layout and the all-to-all strategy at the smallest N.

B = 1, H = 8, D = 64, float32, a learnable T5Bias, causal. Reported per configuration: wall time
of one forward+backward (median over repeats; the slowest rank for W > 1), the peak resident
memory of each rank over the step (inputs included, above the process's baseline after start-up),
the bytes each rank sends, and each rank's time inside attention kernels (the balance of the
layout). Peak memory is compared with the one-process, one-thread run. Output: a Markdown
table on stdout.

Large allocations go straight to mmap (MALLOC_MMAP_THRESHOLD_) so freed tensors leave the
resident set and the peak measures live memory, not the allocator's cache.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.multiprocessing as mp

B, H, D = 1, 8, 64


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS


def _worker(rank: int, world: int, port: int, cfg: dict, results) -> None:
    import torch.distributed as dist

    import relattn
    from relattn.distributed import context_parallel_attention
    from relattn.distributed.ring import STATS
    from relattn.pe import T5Bias

    torch.set_num_threads(cfg["threads"])
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)  # fmt: skip
    n, reps = cfg["n"], cfg["repeats"]
    torch.manual_seed(0)  # the same encoding parameters on every rank
    pe = T5Bias(H, 32, 128)

    def step(q, k, v, g):
        if world == 1:
            out = relattn.attention(q, k, v, pe, backend="chunked")
        else:
            out = context_parallel_attention(
                q, k, v, pe, strategy=cfg["strategy"], layout=cfg["layout"], backend="chunked"
            )
        out.backward(g)

    # Warm-up at a small size: imports and first-call costs stay out of the baseline.
    small = [torch.randn(B, H, 64, D, requires_grad=True) for _ in range(3)]
    step(*small, torch.randn(B, H, 64, D))
    del small
    base = _rss_mib("VmRSS")
    gen = torch.Generator().manual_seed(rank)
    local = n // world
    q, k, v = (torch.randn(B, H, local, D, generator=gen).requires_grad_() for _ in range(3))
    g = torch.randn(B, H, local, D, generator=gen)
    times, peaks, compute, sent = [], [], [], []
    for _ in range(reps):
        for t in (q, k, v):
            t.grad = None
        pe.zero_grad()
        if world > 1:
            dist.barrier()
        _reset_peak()
        c0, b0 = STATS["compute_s"], STATS["bytes_sent"]
        t0 = time.perf_counter()
        step(q, k, v, g)
        times.append(time.perf_counter() - t0)
        peaks.append(_rss_mib("VmHWM") - base)
        compute.append(STATS["compute_s"] - c0)
        sent.append(STATS["bytes_sent"] - b0)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    results.put(
        {
            "rank": rank,
            "time": statistics.median(times),
            "peak": max(peaks),
            "compute": statistics.median(compute),
            "sent": statistics.median(sent),
        }
    )


def run(world: int, cfg: dict) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    mp.start_processes(_worker, args=(world, port, cfg, results), nprocs=world,
                       start_method="spawn")  # fmt: skip
    return sorted((results.get() for _ in range(world)), key=lambda r: r["rank"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384, 32768])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="timed steps per configuration")
    p.add_argument("--max-threaded", type=int, default=16384,
                   help="largest N for the one-process run with W threads")  # fmt: skip
    args = p.parse_args()
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    w = args.world
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, W = {w}, B={B} H={H} D={D} fp32, "
          f"T5Bias (learnable), causal, chunked backend; load average at start "
          f"{os.getloadavg()[0]:.1f}\n")  # fmt: skip
    print("| N | run | time fwd+bwd (s) | peak MiB per rank | peak vs 1 process | "
          "MiB sent per rank | kernel s per rank | slowest / mean |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for i, n in enumerate(args.sizes):
        reps = args.repeats if n <= 16384 else 1
        one = {"strategy": "ring", "layout": "zigzag"}
        runs = [("1 process, 1 thread", 1, {"threads": 1, **one})]
        if n <= args.max_threaded:
            runs.append((f"1 process, {w} threads", 1, {"threads": w, **one}))
        runs.append((f"W={w} ring zigzag", w, {"threads": 1, "strategy": "ring",
                                               "layout": "zigzag"}))  # fmt: skip
        if i == 0:
            runs.append((f"W={w} ring contiguous", w, {"threads": 1, "strategy": "ring",
                                                       "layout": "contiguous"}))  # fmt: skip
            runs.append((f"W={w} all-to-all zigzag", w, {"threads": 1, "strategy": "all_to_all",
                                                         "layout": "zigzag"}))  # fmt: skip
        single_peak = None
        for label, world, cfg in runs:
            res = run(world, {**cfg, "n": n, "repeats": reps})
            wall = max(r["time"] for r in res)
            peaks = [r["peak"] for r in res]
            if single_peak is None:
                single_peak = peaks[0]
            comp = [r["compute"] for r in res]
            balance = max(comp) / statistics.mean(comp) if world > 1 and min(comp) > 0 else None
            cells = [
                str(n),
                label,
                f"{wall:.1f}",
                " / ".join(f"{x:.0f}" for x in peaks),
                f"{max(peaks) / single_peak:.2f}",
                " / ".join(f"{r['sent'] / 2**20:.0f}" for r in res),
                " / ".join(f"{x:.1f}" for x in comp) if world > 1 else "-",
                f"{balance:.3f}" if balance else "-",
            ]
            print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
