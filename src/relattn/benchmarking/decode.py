"""The decoding benchmark on the CPU: one new token against a cache of Nk keys, relattn's
``auto`` (the decode backend) against SDPA with the bias row materialized (what users do today)
and SDPA with no position term (the limit); the per-call overhead at a short cache; and the
cost of a fresh process's first call.

Workload: fp32, B = 1, H = 8, D = 64, ``q_offset = Nk - 1``, no autograd, a T5 bias
(``T5Bias(8)``, weights not requiring grad, as in inference), fixed ALiBi, or a term the tokens
set: ``inkling`` (the new query's r against ``QueryConditionedBias(8, 16, 1024)``) or ``fox``
(the cache's F at every key, as ``KVCache`` keeps it: ``GateTerm.from_cumulative``).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import relattn
from relattn._machine import CPU
from relattn.pe import ALiBi, GateTerm, QueryConditionedBias, T5Bias

from .common import markdown_table, medians, round_ratios, time_rounds

__all__ = ["cold_start", "decode_rows", "describe", "to_markdown"]

B, H, D = 1, 8, 64

CONTENDERS = {
    "relattn": "relattn auto",
    "sdpa_bias": "SDPA + bias row materialized",
    "sdpa": "SDPA, no position term",
}


ENCODINGS = ("t5", "alibi", "inkling", "fox")


def _encoding(name: str, nk: int, g: torch.Generator, dtype: torch.dtype):
    """What the step passes as ``pe`` (a table encoding, or this step's token term)."""
    if name == "t5":
        return T5Bias(H).requires_grad_(False).to(dtype)
    if name == "alibi":
        return ALiBi(H).to(dtype)
    if name == "inkling":
        qcb = QueryConditionedBias(H, 16, 1024).requires_grad_(False)
        return qcb(torch.randn(B, H, 1, 16, generator=g) / 4)
    if name == "fox":
        log_f = torch.nn.functional.logsigmoid(torch.randn(B, H, nk, generator=g) + 4)
        return GateTerm.from_cumulative(log_f.cumsum(-1))
    raise ValueError(f"encoding must be one of {ENCODINGS}; got {name!r}")


def _contenders(
    nk: int, encoding: str, hkv: int, dtype: torch.dtype = torch.float32
) -> dict[str, Callable[[], Any]]:
    g = torch.Generator().manual_seed(nk)
    q = torch.randn(B, H, 1, D, generator=g).to(dtype)
    k, v = (torch.randn(B, hkv, nk, D, generator=g).to(dtype) for _ in range(2))
    pe = _encoding(encoding, nk, g, dtype)
    gqa = hkv != H

    def ours():
        with torch.no_grad():
            return relattn.attention(q, k, v, pe, q_offset=nk - 1)

    def sdpa_bias():
        with torch.no_grad():
            bias = pe.bias(1, nk, nk - 1)  # (1, H, 1, Nk), built per call as users do
            bias = (bias if bias.dim() == 4 else bias[None]).to(dtype)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=gqa)

    def sdpa():
        with torch.no_grad():
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)

    return {"relattn": ours, "sdpa_bias": sdpa_bias, "sdpa": sdpa}


def decode_rows(
    nks: list[int],
    encodings: list[str],
    repeats: int,
    hkv: int = H,
    progress: Callable[[str], None] | None = None,
    dtype: torch.dtype = torch.float32,
) -> list[dict[str, Any]]:
    """Time one decode step of each contender at each cache length, interleaved, with q, k, v
    and the encoding in ``dtype``.

    Returns:
        One dict per (encoding, Nk): ``encoding``, ``nk``, ``hkv``, the median seconds per
        contender (``<key>_s``), and, round by round as (p25, median, p75),
        ``vs_sdpa`` (relattn ÷ SDPA without position term), ``vs_bias`` (relattn ÷ SDPA with
        the bias row), ``overhead_us`` (relattn − SDPA without position term, µs) and
        ``paired_overhead_us`` (the same from rounds of those two alone); a ratio or overhead
        is None where a contender failed and has no times.
    """
    say = progress or (lambda line: None)
    rows = []
    for encoding in encodings:
        for nk in nks:
            fns = _contenders(nk, encoding, hkv, dtype)
            rounds = time_rounds(fns, repeats, warmup=3)
            med = medians(rounds)
            row: dict[str, Any] = {"encoding": encoding, "nk": nk, "hkv": hkv, "rounds": repeats}
            row.update({f"{name}_s": t for name, t in med.items()})
            row["vs_sdpa"] = round_ratios(rounds, "relattn", "sdpa")
            row["vs_bias"] = round_ratios(rounds, "relattn", "sdpa_bias")
            row["overhead_us"] = _differences(rounds)
            # The same two alone, alternating: the cost of the call itself. In the rounds above
            # the bias contender runs between them and evicts relattn's Python code and data
            # from the caches, which its next call pays for (SDPA's C++ path barely).
            pair = {name: fns[name] for name in ("relattn", "sdpa")}
            row["paired_overhead_us"] = _differences(time_rounds(pair, repeats, warmup=3))
            say(f"{encoding} Nk={nk}: {med}")
            rows.append(row)
    return rows


def _differences(rounds: dict[str, list[float] | str]) -> tuple[float, float, float] | None:
    """(p25, median, p75) of relattn − SDPA without position term, µs, round by round; None
    where a contender has no times (as the ratios)."""
    ours, sdpa = rounds["relattn"], rounds["sdpa"]
    if not (isinstance(ours, list) and isinstance(sdpa, list)):
        return None
    diffs = sorted((a - b) * 1e6 for a, b in zip(ours, sdpa, strict=True))
    q1, q2, q3 = statistics.quantiles(diffs, n=4, method="inclusive")
    return q1, q2, q3


_COLD = r"""
import json, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import relattn
t2 = time.perf_counter()
q = torch.randn(1, 8, 16, 64)
relattn.attention(q, q, q, relattn.pe.T5Bias(8))
t3 = time.perf_counter()
relattn.attention(q, q, q, relattn.pe.T5Bias(8))
t4 = time.perf_counter()
print(json.dumps({"torch": t1 - t0, "import": t2 - t1, "first": t3 - t2, "second": t4 - t3}))
"""


def cold_start(processes: int) -> dict[str, tuple[float, float, float]]:
    """Seconds a fresh process spends importing torch, importing relattn, on its first and on
    its second ``relattn.attention`` call (small input, autograd on), as (p25, median, p75)
    over ``processes`` processes; ``beyond_torch`` is import + first call."""
    runs = []
    for _ in range(processes):
        out = subprocess.run(
            [sys.executable, "-c", _COLD], capture_output=True, text=True, check=True,
            env=dict(os.environ),
        )  # fmt: skip
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    result = {}
    for key in ("torch", "import", "first", "second", "beyond_torch"):
        values = [r["import"] + r["first"] if key == "beyond_torch" else r[key] for r in runs]
        values = values * 2 if len(values) == 1 else values
        q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
        result[key] = (q1, q2, q3)
    return result


def _q(x: tuple[float, float, float] | None, fmt: str = ".3g") -> str:
    return "" if x is None else f"{x[1]:{fmt}} ({x[0]:{fmt}}–{x[2]:{fmt}})"


def to_markdown(rows: list[dict[str, Any]]) -> str:
    """The rows of :func:`decode_rows` as a Markdown table (ratios: median and IQR over the
    rounds)."""
    table = [
        {
            "encoding": r["encoding"],
            "nk": r["nk"],
            "ours": r["relattn_s"] * 1e3,
            "bias": r["sdpa_bias_s"] * 1e3,
            "sdpa": r["sdpa_s"] * 1e3,
            "vs_sdpa": _q(r["vs_sdpa"]),
            "vs_bias": _q(r["vs_bias"]),
            "over": _q(r["overhead_us"], ".0f"),
            "paired": _q(r.get("paired_overhead_us"), ".0f"),
        }
        for r in rows
    ]
    columns = [
        ("encoding", "PE"),
        ("nk", "Nk"),
        ("ours", "relattn auto ms"),
        ("bias", "SDPA + bias row ms"),
        ("sdpa", "SDPA no PE ms"),
        ("vs_sdpa", "relattn ÷ SDPA no PE"),
        ("vs_bias", "relattn ÷ SDPA + bias"),
        ("over", "relattn − SDPA no PE, µs"),
        ("paired", "the same, the two alone, µs"),
    ]
    return markdown_table(table, columns)


def describe(dtype: torch.dtype = torch.float32) -> str:
    """The workload and machine, for the report's header."""
    return (
        f"{str(dtype)[6:]}, B={B}, H={H}, D={D}, one new token (Nq=1, q_offset=Nk-1), no autograd; "
        f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
        f"load average {os.getloadavg()[0]:.2f}; CPU: {CPU.describe()}"
    )
