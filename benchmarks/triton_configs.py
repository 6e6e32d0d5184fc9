"""Tile configs of the Triton kernels, timed one by one on this GPU: the data behind
``CANDIDATES`` in src/relattn/backends/triton_kernels.py (run it on a new GPU to tune for it).

The shape of the GPU targets (BENCHMARKS.md): causal, B·N = 16k tokens, H·D = 2048, N = 8192,
bf16, D = 128. For each kernel (forward, backward dq, backward dk/dv) and each config whose
shared memory fits the device, it times the kernels alone through the backend protocol (the
forward with a table and with fixed ALiBi slopes; the backward with a table, the other
backward kernel held at its first candidate), then the best configs together against SDPA's
flash/cuDNN ``is_causal`` path in the same run. The table is a default ``T5Bias``'s (constant
past max_distance, which the forward reads once per tile there), or with ``--random-table``
random values (every tile reads the table per score).

    python benchmarks/triton_configs.py [--n 8192] [--d 128] [--random-table] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from pathlib import Path

# The kernel not being swept runs its first candidate (set before the kernels are imported).
os.environ["RELATTN_TRITON_AUTOTUNE"] = "0"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SWEEP = {
    "attn_fwd": [
        (64, 32, 4, 3), (64, 32, 4, 2), (64, 64, 4, 3), (64, 64, 4, 2), (128, 32, 8, 3),
        (128, 64, 8, 3), (128, 64, 4, 3), (128, 64, 8, 2), (64, 128, 4, 2), (128, 128, 8, 2),
    ],
    "attn_bwd_dq": [
        (64, 32, 4, 2), (32, 32, 4, 2), (64, 64, 4, 2), (64, 64, 4, 3), (128, 32, 8, 2),
        (128, 64, 8, 2),
    ],
    "attn_bwd_dkdv": [
        (32, 32, 4, 2), (16, 64, 4, 2), (32, 64, 4, 2), (64, 64, 4, 2), (64, 64, 8, 2),
        (32, 128, 4, 2), (64, 128, 8, 2),
    ],
}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument(
        "--random-table", action="store_true", help="a random table instead of T5Bias's"
    )
    parser.add_argument("--out", help="write the Markdown tables here")
    parser.add_argument("--json", help="write every measurement here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/triton_configs.py needs a CUDA GPU", file=sys.stderr)
        return 2

    import triton.testing

    from relattn.backends import triton_kernels as K
    from relattn.backends.base import Call
    from relattn.backends.triton_backend import BACKEND
    from relattn.problem import Problem

    n, d, dtype, dev = args.n, args.d, torch.bfloat16, torch.device("cuda")
    b, h = max(1, 16384 // n), 2048 // d
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v, do = (torch.randn(b, h, n, d, device=dev, dtype=dtype, generator=g) for _ in "qkvo")
    if args.random_table:
        table = torch.randn(h, n, device=dev, generator=g)
    else:
        from relattn.pe import T5Bias

        with torch.no_grad():
            table = T5Bias(h).to(dev).table(0, n - 1).float().contiguous()
    slopes = torch.rand(h, device=dev, generator=g) * 0.1
    problem = Problem(lo=0, scale=1 / math.sqrt(d))
    limit = K.device_shared_memory(dev.index or 0)
    from relattn.benchmarking.gpu import causal_flops

    flops = causal_flops(b, h, n, d, backward=False)
    bench = lambda fn: triton.testing.do_bench(fn, warmup=10, rep=60)
    say = lambda s: print(s, file=sys.stderr, flush=True)
    rows: list[dict] = []

    def measure(kernel: str, config, encoding: str, fn) -> None:
        has_table = encoding == "t5"
        smem = K.shared_memory_estimate(kernel, config, max(16, d), 2, has_table)
        row = {"kernel": kernel, "config": list(config), "encoding": encoding, "smem": smem}
        if smem > limit:
            row["note"] = f"skipped: needs ~{smem // 1024} KiB of shared memory"
        else:
            try:
                with K.forced_config(kernel, config):
                    row["ms"] = bench(fn)
            except Exception as e:  # noqa: BLE001  (the failure is the result)
                row["note"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}"
        say(f"{kernel} {config} {encoding}: {row.get('ms', row.get('note'))}")
        rows.append(row)

    def call(tab, slo):  # the backend's prepared call for this table or these slopes
        return Call(q, k, v, tab, slo, problem, BACKEND)

    for config in SWEEP["attn_fwd"]:
        for encoding, tab, slo in (("t5", table, None), ("alibi", None, slopes)):
            fn = lambda tab=tab, slo=slo: BACKEND.forward(call(tab, slo))
            measure("attn_fwd", config, encoding, fn)
    out, lse = BACKEND.forward(call(table, None))
    backward = lambda: BACKEND.backward(call(table, None), do, out, lse)
    for kernel in ("attn_bwd_dq", "attn_bwd_dkdv"):
        for config in SWEEP[kernel]:
            measure(kernel, config, "t5", backward)

    def best(kernel: str, encoding: str):
        timed = [r for r in rows if r["kernel"] == kernel and r["encoding"] == encoding]
        timed = [r for r in timed if "ms" in r]
        return tuple(min(timed, key=lambda r: r["ms"])["config"]) if timed else None

    chosen = {
        "t5": {kern: best(kern, "t5") for kern in SWEEP},
        "alibi": {"attn_fwd": best("attn_fwd", "alibi")},
    }

    @contextlib.contextmanager
    def forced(configs: dict):
        with contextlib.ExitStack() as stack:
            for kern, config in configs.items():
                if config is not None:
                    stack.enter_context(K.forced_config(kern, config))
            yield

    from torch.nn.attention import SDPBackend, sdpa_kernel

    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]

    def sdpa(backward: bool):
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
            o = F.scaled_dot_product_attention(*leaves, is_causal=True)
        if backward:
            torch.autograd.grad(o, leaves, do)

    def relattn_t5(backward: bool):
        o, lse_ = BACKEND.forward(call(table, None))
        if backward:
            BACKEND.backward(call(table, None), do, o, lse_)

    totals = {}
    totals["sdpa fwd"] = bench(lambda: sdpa(False))
    totals["sdpa fwd+bwd"] = bench(lambda: sdpa(True))
    with forced(chosen["t5"]):
        totals["t5 fwd"] = bench(lambda: relattn_t5(False))
        totals["t5 fwd+bwd"] = bench(lambda: relattn_t5(True))
    with forced(chosen["alibi"]):
        totals["alibi fwd"] = bench(lambda: BACKEND.forward(call(None, slopes)))

    gpu = torch.cuda.get_device_name()
    lines = [
        f"# Triton tile configs on {gpu}",
        "",
        f"bf16, causal, B={b}, H={h}, N={n}, D={d}; "
        f"{'a random' if args.random_table else 'a T5Bias'} table; "
        f"shared memory limit {limit // 1024} KiB; "
        "config = (BLOCK_M, BLOCK_N, warps, stages); kernels alone (backend protocol), "
        "triton.testing.do_bench means.",
        "",
        "| kernel | config | encoding | ms | TFLOP/s | smem est. KiB | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        scale = 2.5 if r["kernel"] != "attn_fwd" else 1.0  # backward rows time the backward alone
        tf = f"{flops * scale / r['ms'] / 1e9:.0f}" if "ms" in r else ""
        ms = f"{r['ms']:.3f}" if "ms" in r else ""
        cfg = tuple(r["config"])
        lines.append(
            f"| {r['kernel']} | {cfg} | {r['encoding']} | {ms} | {tf} | "
            f"{r['smem'] // 1024} | {r.get('note', '')} |"
        )
    lines += [
        "",
        f"Best configs: {chosen}",
        "",
        "| what | ms | TFLOP/s | ÷ SDPA flash causal time |",
        "|---|---|---|---|",
    ]
    for name, ms in totals.items():
        backward = "bwd" in name
        base = totals["sdpa fwd+bwd" if backward else "sdpa fwd"]
        tf = flops * (3.5 if backward else 1.0) / ms / 1e9
        lines.append(f"| {name} | {ms:.3f} | {tf:.0f} | {ms / base:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    if args.json:
        result = {"gpu": gpu, "rows": rows, "chosen": chosen, "totals": totals}
        Path(args.json).write_text(json.dumps(result, indent=1, default=list))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
