"""GPU benchmark of the query-conditioned band (issue 24) in the Triton backend, on one CUDA GPU:
bf16, D = 128, N = 8192, Hq = 64 / Hkv = 8, rank 16, W = 1024, causal, one sequence; the band
forward and forward + backward against SDPA flash/cuDNN ``is_causal`` without a position term
and against FlexAttention with r and P captured in its ``score_mod``. Written for
``tools/gpu_check.py`` (one short step, a few minutes at most); not yet run on a GPU.

The Triton backend runs through its ``Call`` (forward, then backward with the band's gradients),
the way the custom op drives it, so the numbers hold the kernels and their host-side steps.

    python benchmarks/gpu_token.py --out token.md --json token.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from relattn.backends import get
from relattn.backends.base import Call, TokenTerms
from relattn.benchmarking.common import machine_info, peak_memory, time_interleaved
from relattn.masks import offset_range
from relattn.problem import Problem

B, HQ, HKV, N, D, RANK, EXTENT = 1, 64, 8, 8192, 128, 16, 1024


def contenders(n: int = N) -> tuple[dict, dict, dict[str, str]]:
    """fwd and fwd+bwd callables per contender, and notes for the ones that could not run."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(24)
    rnd = lambda *shape, dtype=torch.bfloat16: torch.randn(
        *shape, device=dev, dtype=dtype, generator=g
    )
    q, k, v = rnd(B, HQ, n, D), rnd(B, HKV, n, D), rnd(B, HKV, n, D)
    grad = rnd(B, HQ, n, D)
    r = rnd(B, HQ, n, RANK, dtype=torch.float32)
    weight = 0.1 * rnd(1, RANK, EXTENT, dtype=torch.float32)
    backend = get("triton")
    lo, _ = offset_range(n, n, True, 0, 0)
    call = Call(q, k, v, None, None, Problem(lo=lo, scale=D**-0.5), backend,
                token=TokenTerms(r, weight, None, None))  # fmt: skip
    fwd: dict = {}
    fb: dict = {}
    notes: dict[str, str] = {}

    fwd["triton_band"] = lambda: backend.forward(call)

    def triton_fb():
        out, lse = backend.forward(call)
        return backend.backward(call, grad, out, lse)

    fb["triton_band"] = triton_fb

    from torch.nn.attention import SDPBackend, sdpa_kernel

    qs, ks, vs = (x.detach().clone().requires_grad_() for x in (q, k, v))

    def sdpa():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)

    fwd["sdpa_causal"] = lambda: sdpa()
    fb["sdpa_causal"] = lambda: sdpa().backward(grad)

    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        rq = r.detach().clone().requires_grad_()
        pw = weight[0].detach().clone().requires_grad_()

        def score_mod(score, b, h, q_idx, kv_idx):
            d = q_idx - kv_idx
            dc = d.clamp(0, EXTENT - 1)
            band = rq[b, h, q_idx, 0] * pw[0, dc]
            for c in range(1, RANK):
                band = band + rq[b, h, q_idx, c] * pw[c, dc]
            return score + torch.where(d < EXTENT, band, 0.0)

        mask = create_block_mask(lambda b_, h_, qi, ki: qi >= ki, None, None, n, n, device=dev)
        flex = torch.compile(flex_attention, dynamic=False)
        run = lambda: flex(qs, ks, vs, score_mod=score_mod, block_mask=mask, enable_gqa=True)
        start = time.perf_counter()
        run().backward(grad)
        torch.cuda.synchronize()
        notes["flex_compile_s"] = f"{time.perf_counter() - start:.0f}"
        fwd["flex_band"] = run
        fb["flex_band"] = lambda: run().backward(grad)
    except Exception as e:  # noqa: BLE001  (the reason is the result)
        notes["flex_band"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return fwd, fb, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_token.py needs CUDA")
    fwd, fb, notes = contenders()
    with torch.no_grad():
        t_fwd = time_interleaved(fwd, args.repeats, warmup=2, device="cuda", min_time=0.3)
    t_fb = time_interleaved(fb, args.repeats, warmup=2, device="cuda", min_time=0.3)
    mem = {name: peak_memory(fn, "cuda") / 2**20 for name, fn in fb.items()}
    rows = []
    for name in fwd:
        row = {"contender": name, "fwd_ms": None, "fwdbwd_ms": None, "peak_fwdbwd_mib": mem[name]}
        for key, times in (("fwd", t_fwd), ("fwdbwd", t_fb)):
            t, base = times.get(name), times.get("sdpa_causal")
            if isinstance(t, float):
                row[f"{key}_ms"] = t * 1e3
                if isinstance(base, float):
                    row[f"{key}_vs_sdpa"] = t / base
            elif t is not None:
                row[f"{key}_error"] = str(t)[:160]
        rows.append(row)
    lines = [
        f"band: bf16, D = {D}, N = {N}, Hq = {HQ}, Hkv = {HKV}, rank {RANK}, W = {EXTENT}, "
        f"causal, B = {B}; GPU: {machine_info()['gpu']}",
        "",
        "| contender | fwd ms | fwd ÷ SDPA | fwd+bwd ms | fwd+bwd ÷ SDPA | peak fwd+bwd MiB |",
        "|---|---|---|---|---|---|",
    ]
    fmt = lambda x: "" if x is None else f"{x:.2f}"
    for row in rows:
        lines.append(
            f"| {row['contender']} | {fmt(row.get('fwd_ms'))} | {fmt(row.get('fwd_vs_sdpa'))} | "
            f"{fmt(row.get('fwdbwd_ms'))} | {fmt(row.get('fwdbwd_vs_sdpa'))} | "
            f"{fmt(row.get('peak_fwdbwd_mib'))} |"
        )
    lines += [f"- {k}: {v}" for k, v in notes.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "notes": notes}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
