"""The Triton kernels with and without tensor descriptors (TMA), side by side, on one CUDA GPU.

The targets' shape (BENCHMARKS.md: bf16, D = 128, N = 8192, B·N = 16k tokens, H = 16, causal):
relattn's forward and forward + backward with a learnable T5 table, a table that varies at every
offset (KERPLE) and fixed ALiBi, each with ``RELATTN_TRITON_TMA`` on ("auto": descriptors on
Hopper) and off (pointers), and SDPA flash/cuDNN ``is_causal`` without a position term, all
timed in interleaved rounds of one run. Autotuning is off (each kernel's first config), so the
two paths differ in the descriptors only. Written for ``tools/gpu_check.py``; not yet run on
a GPU.

    python benchmarks/gpu_tma.py --out tma.md --json tma.json
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path

os.environ["RELATTN_TRITON_AUTOTUNE"] = "0"  # before the kernels are imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import relattn  # noqa: E402
from relattn.backends import triton_backend  # noqa: E402
from relattn.benchmarking.common import machine_info, time_interleaved  # noqa: E402
from relattn.pe import ALiBi, Kerple, T5Bias  # noqa: E402

B, H, N, D = 2, 16, 8192, 128


def contenders(n: int, smoke: bool = False) -> tuple[dict, dict]:
    """fwd and fwd+bwd callables: ``{encoding}/{tma|pointers}`` and ``sdpa_flash``. ``smoke``:
    tiny float32 shapes on the CPU in Triton's interpreter (the script's own test)."""
    dev = torch.device("cpu" if smoke else "cuda")
    b, h, d = (1, 2, 16) if smoke else (B * N // n, H, D)
    dtype = torch.float32 if smoke else torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(21)
    q, k, v = (
        torch.randn(b, h, n, d, device=dev, dtype=dtype, generator=g).requires_grad_()
        for _ in range(3)
    )
    grad = torch.randn(b, h, n, d, device=dev, dtype=dtype, generator=g)
    encodings = {"t5": T5Bias(h), "kerple": Kerple(h, "log"), "alibi": ALiBi(h)}
    K = triton_backend._kernels()
    fwd: dict[str, Callable] = {}
    fb: dict[str, Callable] = {}

    def with_mode(mode: str, run: Callable) -> Callable:
        def call():
            was = K.TMA_MODE
            K.TMA_MODE = mode
            try:
                return run()
            finally:
                K.TMA_MODE = was

        return call

    for name, pe in encodings.items():
        pe = pe.to(dev)
        run = lambda pe=pe: relattn.attention(q, k, v, pe, backend="triton")

        def forward(run=run):
            with torch.no_grad():
                run()

        def train(run=run):
            run().backward(grad)

        for mode, label in (("on" if smoke else "auto", "tma"), ("off", "pointers")):
            fwd[f"{name}/{label}"] = with_mode(mode, forward)
            fb[f"{name}/{label}"] = with_mode(mode, train)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa():
        if smoke:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def sdpa_fwd():
        with torch.no_grad():
            sdpa()

    fwd["sdpa_flash"] = sdpa_fwd
    fb["sdpa_flash"] = lambda: sdpa().backward(grad)
    return fwd, fb


def _ms(t) -> str:
    return f"{t * 1e3:.2f}" if isinstance(t, float) else str(t)


def _ratio(a, b) -> str:
    return f"{a / b:.2f}" if isinstance(a, float) and isinstance(b, float) else "–"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ns", type=int, nargs="+", default=[8192])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", help="write the Markdown table here")
    parser.add_argument("--json", help="write every time here")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes on the CPU in Triton's interpreter"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the backend first imports triton
    elif not torch.cuda.is_available():
        parser.error("needs a CUDA GPU; torch.cuda.is_available() is False here")
    device = "cpu" if args.smoke else "cuda"
    info = machine_info()
    lines = [
        f"GPU: {info.get('gpu')}; bf16, D = {D}, H = {H}, B·N = {B * N}, causal; "
        + ("SMOKE RUN (CPU interpreter, tiny float32 shapes, times meaningless); " * args.smoke)
        + "autotuning off; medians of interleaved rounds",
        "",
        "| N | encoding | fwd ms TMA | fwd ms pointers | TMA ÷ pointers | fwd ÷ SDPA flash "
        "| fwd+bwd ms TMA | fwd+bwd ms pointers | TMA ÷ pointers | fwd+bwd ÷ SDPA flash |",
        "|" + "---|" * 10,
    ]
    record = {"machine": info, "times": {}}
    for n in args.ns:
        fwd, fb = contenders(n, args.smoke)
        warmup = 0 if args.smoke else 2
        t_f = time_interleaved(fwd, args.repeats, warmup=warmup, device=device)
        t_b = time_interleaved(fb, args.repeats, warmup=warmup, device=device)
        record["times"][n] = {"fwd": t_f, "fwd+bwd": t_b}
        for name in ("t5", "kerple", "alibi"):
            cells = []
            for t in (t_f, t_b):
                a, p, s = t[f"{name}/tma"], t[f"{name}/pointers"], t["sdpa_flash"]
                cells += [_ms(a), _ms(p), _ratio(a, p), _ratio(s, a)]
            lines.append(f"| {n} | {name} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
