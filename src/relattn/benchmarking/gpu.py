"""The GPU comparison: relattn's Triton backend against FlexAttention with the same encoding as a
compiled ``score_mod``, SDPA with the bias materialized, and SDPA's flash/cuDNN path with
``is_causal`` and no position term (the bias-free limit).

fp16 and bf16, D = 64 and 128, N = 1k … 16k at B·N = 16k tokens and H·D = 2048, causal, a
learnable T5 bias (and fixed ALiBi in closed form). Speed is reported as TFLOP/s on causal FLOPs
(lower triangle only) and as a ratio to SDPA is_causal measured in the same run; :func:`targets`
compares one run with the H100 targets of the GPU-readiness issue.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import relattn
from relattn.pe import ALiBi, T5Bias

from .common import machine_info, markdown_table, peak_memory, time_interleaved

TOKENS = 16384  # B·N
MODEL_DIM = 2048  # H·D
NS = [1024, 2048, 4096, 8192, 16384]
HEAD_DIMS = [64, 128]
DTYPES = [torch.float16, torch.bfloat16]
# SDPA with a materialized bias is skipped when its N×N tensors would pass this share of memory.
MEMORY_SHARE = 0.6

CONTENDERS = {
    "triton": "relattn triton (T5 table)",
    "triton_alibi": "relattn triton, fixed ALiBi (closed form)",
    "flex": "FlexAttention, T5 table as score_mod",
    "sdpa_bias": "SDPA + materialized bias (attn_mask)",
    "sdpa_causal": "SDPA flash/cuDNN is_causal, no position term",
}


def causal_flops(b: int, h: int, n: int, d: int, backward: bool) -> float:
    """FLOPs of q·kᵀ and p·v over the N(N+1)/2 visible pairs; the backward counts 2.5× the
    forward (five matmuls instead of two), as FlashAttention reports it."""
    fwd = 4.0 * b * h * d * n * (n + 1) / 2
    return fwd * 3.5 if backward else fwd


# FlexAttention's kernel options, tried in turn: its defaults, then smaller backward tiles (with a
# captured table whose gradient it computes, its default D = 128 backward needs more shared memory
# than an H100 has: "No valid triton configs" in torch 2.11).
FLEX_OPTIONS: list[dict[str, int] | None] = [
    None,
    {"BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32},
    {"BLOCK_M1": 16, "BLOCK_N1": 32, "BLOCK_M2": 32, "BLOCK_N2": 16, "num_stages": 1},
]


def _flex_attention(q, k, v, table, block_mask, kernel_options=None):
    from torch.nn.attention.flex_attention import flex_attention

    def score_mod(score, b, h, q_idx, kv_idx):
        # the block mask hides q_idx < kv_idx; the clamp keeps partial blocks in bounds
        return score + table[h, (q_idx - kv_idx).clamp(min=0)]

    return flex_attention(
        q, k, v, score_mod=score_mod, block_mask=block_mask, kernel_options=kernel_options
    )


_COMPILED: dict[str, Callable] = {}


def _flex_compiled() -> Callable:
    if "flex" not in _COMPILED:
        _COMPILED["flex"] = torch.compile(_flex_attention, dynamic=False)
    return _COMPILED["flex"]


def _contenders(n: int, d: int, dtype: torch.dtype):
    """fwd and fwd+bwd callables per contender, notes for the ones skipped, compile times."""
    b, h = TOKENS // n, MODEL_DIM // d
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(n * d)
    q, k, v = (
        torch.randn(b, h, n, d, device=dev, dtype=dtype, generator=g).requires_grad_()
        for _ in range(3)
    )
    grad = torch.randn(b, h, n, d, device=dev, dtype=dtype, generator=g)
    pe = T5Bias(h).to(dev)
    fwd: dict[str, Callable[[], Any]] = {}
    fb: dict[str, Callable[[], Any]] = {}
    notes: dict[str, str] = {}
    extra: dict[str, dict[str, Any]] = {}

    def both(forward: Callable[[], torch.Tensor]) -> tuple[Callable, Callable]:
        def f():
            with torch.no_grad():
                forward()

        def fbwd():
            forward().backward(grad)

        return f, fbwd

    fwd["triton"], fb["triton"] = both(lambda: relattn.attention(q, k, v, pe, backend="triton"))
    alibi = ALiBi(h).to(dev)
    fwd["triton_alibi"], fb["triton_alibi"] = both(
        lambda: relattn.attention(q, k, v, alibi, backend="triton")
    )

    try:
        from torch.nn.attention.flex_attention import create_block_mask

        mask = create_block_mask(lambda b_, h_, qi, ki: qi >= ki, None, None, n, n, device=dev)
        flex = _flex_compiled()
        start = time.perf_counter()
        failures = []
        for options in FLEX_OPTIONS:
            run_flex = lambda o=options: flex(q, k, v, pe.table(0, n - 1), mask, o)
            try:
                run_flex().backward(grad)
            except Exception as e:  # noqa: BLE001  (the next options may fit)
                failures.append(f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
                continue
            torch.cuda.synchronize()
            extra["flex"] = {"compile_s": time.perf_counter() - start}
            fwd["flex"], fb["flex"] = both(run_flex)
            if options is not None:
                notes["flex"] = f"kernel_options {options} (its defaults failed)"
            break
        else:
            notes["flex"] = "failed: " + failures[0]
    except Exception as e:  # noqa: BLE001  (the reason is the result)
        notes["flex"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"

    # bias (fp32 from the table) + its dtype copy + grads, H·N² each
    need = h * n * n * (4 + 2 * dtype.itemsize + 4)
    total = torch.cuda.get_device_properties(dev).total_memory
    if need > MEMORY_SHARE * total:
        notes["sdpa_bias"] = f"skipped: N² bias tensors need ~{need / 2**30:.0f} GiB"
    else:
        hidden = torch.ones(n, n, dtype=torch.bool, device=dev).triu_(1)

        def sdpa_bias():
            bias = pe.bias(n, n).masked_fill(hidden, float("-inf")).to(dtype)[None]
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

        fwd["sdpa_bias"], fb["sdpa_bias"] = both(sdpa_bias)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa_causal():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    fwd["sdpa_causal"], fb["sdpa_causal"] = both(sdpa_causal)
    return (b, h), fwd, fb, notes, extra


def run(
    quick: bool = False, progress: Callable[[str], None] | None = None, check: bool = False
) -> list[dict]:
    """Time every contender at every (dtype, D, N).

    Args:
        quick: bf16, N = 1024 and 4096 only, at least 3 rounds, no memory measurement.
        progress: called with a line of text as each measurement finishes.
        check: what the targets need (bf16, D = 128, N = 8192 and 16384, 5 repetitions, peak
            memory), a few minutes on an H100; ``make gpu-check`` runs this.

    Returns:
        One dict per (dtype, D, N, contender): ``dtype``, ``d``, ``n``, ``b``, ``h``, ``key``,
        ``contender``, ``fwd_ms``, ``fwdbwd_ms``, ``fwd_tflops``, ``fwdbwd_tflops``,
        ``fwd_ratio`` / ``fwdbwd_ratio`` (time ÷ SDPA is_causal), ``peak_fwd_mib``,
        ``peak_fwdbwd_mib``, ``compile_s`` and ``note``.

    Raises:
        RuntimeError: without CUDA.
    """
    if not torch.cuda.is_available():
        raise RuntimeError(
            "the GPU benchmark needs CUDA; torch.cuda.is_available() is False on this machine"
        )
    say = progress or (lambda line: None)
    dtypes = [torch.bfloat16] if quick or check else DTYPES
    ns = [1024, 4096] if quick else ([8192, 16384] if check else NS)
    head_dims = [128] if check else HEAD_DIMS
    repeats = 3 if quick else (5 if check else 10)
    rows: list[dict] = []
    for dtype in dtypes:
        for d in head_dims:
            for n in ns:
                (b, h), fwd, fb, notes, extra = _contenders(n, d, dtype)
                # sub-millisecond calls: more rounds until they add up to half a second
                t_fwd = time_interleaved(fwd, repeats, warmup=2, device="cuda", min_time=0.5)
                t_fb = time_interleaved(fb, repeats, warmup=2, device="cuda", min_time=0.5)
                mem_fwd, mem_fb = {}, {}
                if not quick:
                    for name, fn in fwd.items():
                        if isinstance(t_fwd.get(name), float):
                            mem_fwd[name] = peak_memory(fn, "cuda") / 2**20
                    for name, fn in fb.items():
                        if isinstance(t_fb.get(name), float):
                            mem_fb[name] = peak_memory(fn, "cuda") / 2**20
                say(f"{dtype} D={d} N={n}: fwd {t_fwd} fwd+bwd {t_fb}")
                rows += _rows(dtype, d, n, b, h, t_fwd, t_fb, mem_fwd, mem_fb, notes, extra)
                torch.cuda.empty_cache()
    return rows


def _rows(dtype, d, n, b, h, t_fwd, t_fb, mem_fwd, mem_fb, notes, extra) -> list[dict]:
    rows = []
    for name, label in CONTENDERS.items():
        row: dict[str, Any] = {
            "dtype": str(dtype).removeprefix("torch."),
            "d": d,
            "n": n,
            "b": b,
            "h": h,
            "key": name,
            "contender": label,
        }
        note = [notes[name]] if name in notes else []
        for key, times, backward in (("fwd", t_fwd, False), ("fwdbwd", t_fb, True)):
            t, base = times.get(name), times.get("sdpa_causal")
            if isinstance(t, str):
                note.append(f"{key} failed: {t[:120]}")
            elif t is not None:
                row[f"{key}_ms"] = t * 1e3
                row[f"{key}_tflops"] = causal_flops(b, h, n, d, backward) / t / 1e12
                if isinstance(base, float):
                    row[f"{key}_ratio"] = t / base
        row["peak_fwd_mib"] = mem_fwd.get(name)
        row["peak_fwdbwd_mib"] = mem_fb.get(name)
        row.update(extra.get(name, {}))
        row["note"] = "; ".join(note) or None
        rows.append(row)
    return rows


COLUMNS = [
    ("dtype", "dtype"),
    ("d", "D"),
    ("n", "N"),
    ("contender", "contender"),
    ("fwd_ms", "fwd ms"),
    ("fwd_tflops", "fwd TFLOP/s"),
    ("fwd_ratio", "fwd ÷ SDPA causal"),
    ("fwdbwd_ms", "fwd+bwd ms"),
    ("fwdbwd_tflops", "fwd+bwd TFLOP/s"),
    ("fwdbwd_ratio", "fwd+bwd ÷ SDPA causal"),
    ("peak_fwd_mib", "peak fwd MiB"),
    ("peak_fwdbwd_mib", "peak fwd+bwd MiB"),
    ("compile_s", "compile s"),
    ("note", "note"),
]


def to_markdown(rows: list[dict]) -> str:
    """The results of :func:`run` as a Markdown table."""
    return markdown_table(rows, COLUMNS)


# The GPU-readiness issue's targets: H100, bf16, D = 128, B·N = 16k tokens, H·D = 2048, N = 8192
# (memory at N = 16384). Each is (what, contender, reference, column, at least or at most, bound);
# speed columns are times, so "TFLOP/s >= x × reference" is "reference time / time >= x".
TARGETS = [
    ("forward vs SDPA flash causal", "triton", "sdpa_causal", "fwd_ms", 0.9),
    ("forward+backward vs SDPA flash causal", "triton", "sdpa_causal", "fwdbwd_ms", 0.75),
    ("forward+backward vs FlexAttention", "triton", "flex", "fwdbwd_ms", 1.2),
    ("fixed ALiBi forward vs SDPA flash causal", "triton_alibi", "sdpa_causal", "fwd_ms", 0.95),
]


def targets(rows: list[dict], n: int = 8192, n_memory: int = 16384) -> list[dict]:
    """The issue's targets from one run's rows (bf16, D = 128): measured value, bound, met."""

    def pick(key: str, at: int) -> dict:
        for r in rows:
            if (r["key"], r["n"], r["d"], r["dtype"]) == (key, at, 128, "bfloat16"):
                return r
        return {}

    def entry(what: str, value: float | None, bound: str, met: bool | None) -> dict:
        return {"target": what, "value": value, "bound": bound, "met": met}

    out = []
    for what, mine, ref, column, bound in TARGETS:
        a, b = pick(mine, n).get(column), pick(ref, n).get(column)
        value = b / a if a and b else None
        met = None if value is None else value >= bound
        out.append(entry(f"{what} (N = {n})", value, f">= {bound}", met))
    a = pick("triton", n_memory).get("peak_fwdbwd_mib")
    b = pick("sdpa_causal", n_memory).get("peak_fwdbwd_mib")
    value = a / b if a and b else None
    met = None if value is None else value <= 1.1
    out.append(entry(f"peak memory fwd+bwd vs SDPA flash (N = {n_memory})", value, "<= 1.1", met))
    return out


def targets_markdown(rows: list[dict]) -> str:
    """:func:`targets` as a Markdown table (values are ratios; blank: not measured)."""
    lines = ["| target | measured | bound | met |", "|---|---|---|---|"]
    for t in targets(rows):
        value = "" if t["value"] is None else f"{t['value']:.2f}"
        met = "" if t["met"] is None else ("yes" if t["met"] else "no")
        lines.append(f"| {t['target']} | {value} | {t['bound']} | {met} |")
    return "\n".join(lines)


def describe() -> str:
    """A header line for the results: configuration and machine."""
    info = machine_info()
    return (
        f"causal, learnable T5Bias, B·N = {TOKENS} tokens, H·D = {MODEL_DIM}; GPU: {info['gpu']}, "
        f"torch {info['torch']}, triton {info['triton']}, Python {info['python']}. TFLOP/s count "
        "the lower triangle only (backward = 2.5× forward)."
    )
