"""The CPU comparison: relattn (``backend="auto"``, which names the backend it picked, and the
chunked and reference backends) against torch's SDPA (with the bias materialized, and bias-free
as the limit) and FlexAttention, B=1, H=8, D=64, a learnable T5 bias, causal, in float32
(default), bfloat16 or float16 (inputs and the encoding's table alike: a model cast to it). Every
contender is warmed up (WARMUP untimed calls) before it is timed: a first call builds caches,
and auto's C++ kernel on its first use on a machine. Rounds are interleaved, and there are at
least ``repeats`` of them and more until the timed calls at one N have taken ``min_time``
seconds, so that millisecond calls are not judged from one sample."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import relattn
from relattn.pe import T5Bias
from relattn.problem import Problem

from .common import (
    MIN_ROUNDS_FOR_IQR,
    machine_info,
    markdown_table,
    medians,
    peak_memory,
    round_ratios,
    spread,
    time_rounds,
)

B, H, D = 1, 8, 64
# Untimed calls per contender before its timed rounds.
WARMUP = 2
# Skip a contender whose N×N tensors would need more than this.
MEMORY_LIMIT = 16 * 2**30
# N×N fp32 tensors alive at the peak of fwd+bwd (scores, weights, their grads, the bias...).
_QUADRATIC_COPIES = {"reference": 5, "sdpa_bias": 4}

CONTENDERS = {
    "auto": "relattn auto",
    "chunked": "relattn chunked",
    "reference": "relattn reference",
    "sdpa_bias": "SDPA + materialized bias (attn_mask, requires grad)",
    "sdpa_causal": "SDPA is_causal, no position term",
    "flex": "FlexAttention, bias as score_mod (fwd only)",
}


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _inputs(
    n: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, T5Bias, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(B, H, n, D, generator=g).to(dtype).requires_grad_() for _ in range(3))
    grad = torch.randn(B, H, n, D, generator=g).to(dtype)
    return q, k, v, T5Bias(H).to(dtype), grad


def _too_big(name: str, n: int) -> bool:
    copies = _QUADRATIC_COPIES.get(name, 0)
    return copies * B * H * n * n * 4 > MEMORY_LIMIT


def _flex(q, k, v, pe, n) -> tuple[Callable[[], Any] | None, float | None, str | None]:
    """A timed FlexAttention forward, its compile time, or why it cannot run.

    Compiled with static shapes (``dynamic=False``): left to its default, the second N would
    recompile it with dynamic shapes, which fails in inductor's C++ build on this CPU. The
    compile time is cold: dynamo is reset and inductor writes to a fresh cache directory.
    """
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        table = pe.table(0, n - 1).detach()
        q, k, v = q.detach(), k.detach(), v.detach()  # flex has no CPU backward

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + table[h, (q_idx - kv_idx).clamp(min=0)]

        def causal(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        mask = create_block_mask(causal, None, None, n, n, device="cpu")
        torch._dynamo.reset()
        compiled = torch.compile(flex_attention, dynamic=False)

        def run():
            with torch.no_grad():
                return compiled(q, k, v, score_mod=score_mod, block_mask=mask)

        with _fresh_inductor_cache():
            start = time.perf_counter()
            run()
            return run, time.perf_counter() - start, None
    except Exception as e:  # noqa: BLE001  (the reason is the result)
        return None, None, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"


@contextlib.contextmanager
def _fresh_inductor_cache():
    """Point inductor's on-disk cache at an empty directory for the duration."""
    old = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="relattn-bench-inductor-") as fresh:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = fresh
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = old


def _contenders(n: int, names: list[str], dtype: torch.dtype = torch.float32):
    q, k, v, pe, grad = _inputs(n, dtype)
    causal_mask = None

    def relattn_fn(backend: str, backward: bool):
        def fn():
            if backward:
                out = relattn.attention(q, k, v, pe, backend=backend)
                out.backward(grad)
            else:
                with torch.no_grad():
                    relattn.attention(q, k, v, pe, backend=backend)

        return fn

    def sdpa_bias(backward: bool):
        def fn():
            nonlocal causal_mask
            if causal_mask is None:
                causal_mask = torch.ones(n, n, dtype=torch.bool).triu_(1)
            with torch.set_grad_enabled(backward):
                bias = pe.bias(n, n).masked_fill(causal_mask, float("-inf"))[None]
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
                if backward:
                    out.backward(grad)

        return fn

    def sdpa_causal(backward: bool):
        def fn():
            with torch.set_grad_enabled(backward):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                if backward:
                    out.backward(grad)

        return fn

    fwd, fb, notes, extra = {}, {}, {}, {}
    for name in names:
        if _too_big(name, n):
            need = _QUADRATIC_COPIES[name] * B * H * n * n * 4 / 2**30
            notes[name] = f"skipped: N² tensors need ~{need:.0f} GiB"
            continue
        if name in ("auto", "chunked", "reference"):
            fwd[name], fb[name] = relattn_fn(name, False), relattn_fn(name, True)
        elif name == "sdpa_bias":
            fwd[name], fb[name] = sdpa_bias(False), sdpa_bias(True)
        elif name == "sdpa_causal":
            fwd[name], fb[name] = sdpa_causal(False), sdpa_causal(True)
        elif name == "flex":
            run, compile_s, why = _flex(q, k, v, pe, n)
            if run is None:
                notes[name] = f"failed on CPU: {why}"
            else:
                fwd[name] = run
                extra[name] = {"compile_s": compile_s}
                notes[name] = "fwd only: FlexAttention has no CPU backward"
    return fwd, fb, notes, extra


def _names_for(n: int, quick: bool) -> list[str]:
    if n > 16384:
        return ["auto", "chunked"]  # the others are quadratic in memory or too slow here
    if quick:  # a smoke run: FlexAttention alone would spend its time compiling
        return [name for name in CONTENDERS if name != "flex"]
    return list(CONTENDERS)


def _repeats_for(n: int, repeats: int) -> int:
    return max(1, repeats if n <= 4096 else repeats // 2 if n <= 8192 else repeats // 4)


# relattn's rows that get per-round ratios.
_PAIRED = ("auto", "chunked")


def auto_choice(n: int, dtype: torch.dtype = torch.float32) -> str:
    """The backend ``backend="auto"`` runs for this benchmark's training call at length n, and
    for the CPU kernel what it ran (:func:`relattn.backends.cpu_kernel.compute_path`)."""
    q = torch.empty(B, H, n, D, dtype=dtype, requires_grad=True)
    with torch.enable_grad():
        name = relattn.backends.choose("auto", q, q, Problem(-(n - 1), D**-0.5)).name
    if name == "cpu_kernel":
        from relattn.backends import cpu_kernel

        return f"{name}: {cpu_kernel.compute_path(dtype, D)}"
    return name


def run(
    ns: list[int],
    repeats: int,
    quick: bool = False,
    progress: Callable[[str], None] | None = None,
    min_time: float = 0.0,
    dtype: torch.dtype = torch.float32,
) -> list[dict[str, Any]]:
    """Time every contender at every N, in ``dtype``.

    Args:
        ns: sequence lengths.
        repeats: the fewest timed rounds at N <= 4096 (fewer at larger N); medians are
            reported.
        quick: no FlexAttention and no memory measurement (a smoke run; still warmed up).
        progress: called with a line of text as each measurement finishes.
        min_time: more rounds (beyond ``repeats``) until the timed calls of the forward, and
            then of the forward+backward, at one N have taken this many seconds.
        dtype: of q, k, v, the gradient and the encoding (one of :data:`DTYPES`).

    Returns:
        One dict per (N, contender): ``n``, ``contender``, ``fwd_s``, ``fwdbwd_s``,
        ``fwd_ratio`` and ``fwdbwd_ratio`` (to SDPA is_causal in the same run),
        ``peak_fwd_mib``, ``peak_fwdbwd_mib``, ``compile_s`` and ``note`` (which says when the
        forward+backward timed below the forward: noise); the auto and chunked rows add
        ``fwd_rounds`` and ``rounds`` (timed rounds of the forward and of the forward+backward)
        and, as (p25, median, p75) over the rounds,
        ``fwd_round_ratio`` and ``fwdbwd_round_ratio`` (to SDPA is_causal) and
        ``speedup_over_bias`` (SDPA with the materialized bias ÷ that row, fwd+bwd); the auto
        row's contender names the backend auto picked.
    """
    say = progress or (lambda line: None)
    rows = []
    for n in ns:
        names = _names_for(n, quick)
        fwd, fb, notes, extra = _contenders(n, names, dtype)
        reps = _repeats_for(n, repeats)
        # a cold first call is not what a user's loop sees
        r_fwd = time_rounds(fwd, reps, warmup=WARMUP, min_time=min_time)
        t_fwd = medians(r_fwd)
        say(f"N={n} fwd: {t_fwd}")
        r_fb = time_rounds(fb, reps, warmup=WARMUP, min_time=min_time)
        t_fb = medians(r_fb)
        say(f"N={n} fwd+bwd: {t_fb}")
        mem_fwd, mem_fb = {}, {}
        if not quick:
            for name, fn in fwd.items():
                if isinstance(t_fwd.get(name), float):
                    mem_fwd[name] = peak_memory(fn) / 2**20
            for name, fn in fb.items():
                if isinstance(t_fb.get(name), float):
                    mem_fb[name] = peak_memory(fn) / 2**20
            say(f"N={n} peak MiB fwd {mem_fwd} fwd+bwd {mem_fb}")
        base_f, base_fb = t_fwd.get("sdpa_causal"), t_fb.get("sdpa_causal")
        for name in names:
            row: dict[str, Any] = {"n": n, "contender": CONTENDERS[name], "key": name}
            if name == "auto":
                row["contender"] = f"relattn auto (ran {auto_choice(n, dtype)})"
            note = [notes[name]] if name in notes else []
            for key, times, base in (("fwd", t_fwd, base_f), ("fwdbwd", t_fb, base_fb)):
                t = times.get(name)
                if isinstance(t, str):
                    note.append(f"{key} failed: {t[:120]}")
                elif t is not None:
                    row[f"{key}_s"] = t
                    if isinstance(base, float):
                        row[f"{key}_ratio"] = t / base
            if row.get("fwdbwd_s", 1.0) < row.get("fwd_s", 0.0):
                note.append("fwd+bwd timed below fwd: noise (a busy machine or too few rounds)")
            row["peak_fwd_mib"] = mem_fwd.get(name)
            row["peak_fwdbwd_mib"] = mem_fb.get(name)
            row.update(extra.get(name, {}))
            row["note"] = "; ".join(note) or None
            if name in _PAIRED:
                r_f, r_b = r_fwd.get(name), r_fb.get(name)
                row["fwd_rounds"] = len(r_f) if isinstance(r_f, list) else 0
                row["rounds"] = len(r_b) if isinstance(r_b, list) else 0
                row["fwd_round_ratio"] = round_ratios(r_fwd, name, "sdpa_causal")
                row["fwdbwd_round_ratio"] = round_ratios(r_fb, name, "sdpa_causal")
                row["speedup_over_bias"] = round_ratios(r_fb, "sdpa_bias", name)
            rows.append(row)
    return rows


COLUMNS = [
    ("n", "N"),
    ("contender", "contender"),
    ("fwd_s", "fwd s"),
    ("fwd_ratio", "fwd ÷ SDPA causal"),
    ("fwdbwd_s", "fwd+bwd s"),
    ("fwdbwd_ratio", "fwd+bwd ÷ SDPA causal"),
    ("peak_fwd_mib", "peak fwd MiB"),
    ("peak_fwdbwd_mib", "peak fwd+bwd MiB"),
    ("compile_s", "compile s"),
    ("note", "note"),
]


def to_markdown(rows: list[dict[str, Any]]) -> str:
    """The results of :func:`run` as Markdown: the full table, then relattn's ratios (auto and
    chunked) taken round by round (median, and the interquartile range where there are enough
    rounds for one)."""
    paired = [
        {
            "n": r["n"],
            "contender": r["contender"],
            "rounds": _rounds_text(r),
            "fwd": spread(r.get("fwd_round_ratio"), r.get("fwd_rounds")),
            "fwdbwd": spread(r.get("fwdbwd_round_ratio"), r.get("rounds")),
            "bias": spread(r.get("speedup_over_bias"), r.get("rounds")),
        }
        for r in rows
        if r["key"] in _PAIRED
    ]
    columns = [
        ("n", "N"),
        ("contender", "contender"),
        ("rounds", "rounds"),
        ("fwd", "fwd ÷ SDPA causal"),
        ("fwdbwd", "fwd+bwd ÷ SDPA causal"),
        ("bias", "SDPA + bias fwd+bwd ÷ relattn"),
    ]
    return (
        markdown_table(rows, COLUMNS)
        + "\n\nPer-round ratios of relattn (median; in brackets the interquartile range, given "
        + f"from {MIN_ROUNDS_FOR_IQR} rounds; noisy: the range is wider than the median):\n\n"
        + markdown_table(paired, columns)
    )


def _rounds_text(row: dict[str, Any]) -> str | None:
    fwd, fb = row.get("fwd_rounds"), row.get("rounds")
    if fb is None:
        return None
    return str(fb) if fwd in (None, fb) else f"{fwd} fwd, {fb} fwd+bwd"


def describe(dtype: torch.dtype = torch.float32) -> str:
    """A header line for the results: configuration and machine."""
    info = machine_info()
    return (
        f"{str(dtype)[6:]}, B={B}, H={H}, D={D}, causal, learnable T5Bias; CPU: {info['cpu']}, "
        f"{info['cores']} cores ({info['torch_threads']} torch threads), torch {info['torch']}, "
        f"Python {info['python']}, load average {info['loadavg']}"
    )
