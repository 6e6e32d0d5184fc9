"""Device-independent benchmark helpers: the machine, interleaved medians, peak memory, tables."""

from __future__ import annotations

import ctypes
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


def machine_info() -> dict[str, Any]:
    """The machine and library versions a result was measured with.

    Returns:
        dict with ``cpu`` (model, cache sizes, AVX2 / AVX-512 / AVX-512-BF16 / AMX flags and
        torch's kernel ISA), ``cores``, ``torch_threads``, ``gpu`` (or None), ``python``,
        ``torch``, ``triton`` (or None), ``relattn`` and ``loadavg`` (1-minute load at the call;
        other work on the machine distorts timings).
    """
    from .._machine import detect

    cpu = detect().describe()  # model, caches, vector and matrix flags, torch's kernels
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import relattn

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "relattn": getattr(relattn, "__version__", "unknown"),
        "loadavg": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for queued GPU work (no-op on CPU) so wall-clock timings are honest."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_rounds(
    contenders: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 1,
    device: torch.device | str | None = None,
    min_time: float = 0.0,
    max_rounds: int = 1000,
) -> dict[str, list[float] | str]:
    """Wall times in seconds of each contender in each round, run round-robin so that drifts in
    the machine's state (clock, other load) hit every contender alike.

    Every contender first runs ``warmup`` untimed calls (a first call builds caches, compiles
    kernels, faults in memory). Then at least ``repeats`` rounds are timed, and more while the
    timed rounds together have taken less than ``min_time`` seconds (at most ``max_rounds``):
    calls of a millisecond get enough rounds for a median and quartiles to mean something.

    A contender that raises is dropped and reported by its error message instead of times.
    """
    results: dict[str, list[float] | str] = {name: [] for name in contenders}
    live = dict(contenders)
    for _ in range(warmup):
        for name, fn in list(live.items()):
            try:
                fn()
                synchronize(device)
            except Exception as e:  # noqa: BLE001  (a failing contender is a result)
                results[name] = f"{type(e).__name__}: {e}"
                del live[name]
    times: dict[str, list[float]] = {name: [] for name in live}
    spent, rounds = 0.0, 0
    while live and (rounds < repeats or (spent < min_time and rounds < max_rounds)):
        for name, fn in live.items():
            start = time.perf_counter()
            fn()
            synchronize(device)
            took = time.perf_counter() - start
            times[name].append(took)
            spent += took
        rounds += 1
    results.update(times)
    return results


def medians(rounds: dict[str, list[float] | str]) -> dict[str, float | str]:
    """The median of each contender's times from :func:`time_rounds` (errors pass through)."""
    return {n: statistics.median(r) if isinstance(r, list) else r for n, r in rounds.items()}


def time_interleaved(
    contenders: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 1,
    device: torch.device | str | None = None,
    min_time: float = 0.0,
) -> dict[str, float | str]:
    """Median wall time in seconds of each contender over interleaved rounds
    (:func:`time_rounds`)."""
    return medians(time_rounds(contenders, repeats, warmup, device, min_time=min_time))


def round_ratios(
    rounds: dict[str, list[float] | str], num: str, den: str
) -> tuple[float, float, float] | None:
    """Quartiles ``(p25, median, p75)`` of ``time[num] / time[den]`` taken round by round: the
    two ran back to back in each round, so the ratio sheds most of the machine's drift.
    None where either contender has no times."""
    a, b = rounds.get(num), rounds.get(den)
    if not isinstance(a, list) or not isinstance(b, list) or not a or len(a) != len(b):
        return None
    ratios = sorted(x / y for x, y in zip(a, b, strict=True))
    if len(ratios) == 1:
        return ratios[0], ratios[0], ratios[0]
    q1, q2, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return q1, q2, q3


# Fewer rounds than this give a median but no interquartile range worth printing.
MIN_ROUNDS_FOR_IQR = 5


def spread(q: tuple[float, float, float] | None, rounds: int | None, fmt: str = ".3g") -> str:
    """``median (p25–p75)`` of :func:`round_ratios`' quartiles, where ``rounds`` (how many rounds
    they came from) are enough for a spread to mean something; with fewer, the median and the
    count alone, so that one round never prints as a range. A range wider than the median
    itself is marked ``noisy``."""
    if q is None:
        return ""
    if rounds is not None and rounds < MIN_ROUNDS_FOR_IQR:
        return f"{q[1]:{fmt}} ({rounds} round{'s' if rounds != 1 else ''}: no spread)"
    noisy = " noisy" if q[2] - q[0] > abs(q[1]) else ""
    return f"{q[1]:{fmt}} ({q[0]:{fmt}}–{q[2]:{fmt}}){noisy}"


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS so RSS reflects live memory (glibc only)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(
    fn: Callable[[], Any], device: torch.device | str = "cpu", interval: float = 0.0005
) -> int:
    """Peak extra memory in bytes while ``fn()`` runs, above what was live before it.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: a background thread samples the resident
    set (``/proc/self/statm``) every ``interval`` seconds; freed heap is trimmed first so the
    baseline is what is really live. Sampling can miss a peak shorter than the interval.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    _release_freed_memory()
    base = _rss_bytes()
    peak = base
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    peak = max(peak, _rss_bytes())
    _release_freed_memory()
    return peak - base


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """Render ``rows`` as a Markdown table; ``columns`` is ``(key, header)`` pairs. Missing
    values print as an empty cell; floats keep 3 significant digits."""

    def cell(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value).replace("|", "\\|")

    lines = [
        "| " + " | ".join(h for _, h in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(cell(row.get(k)) for k, _ in columns) + " |")
    return "\n".join(lines)


def format_machine(info: dict[str, Any]) -> str:
    """One Markdown bullet list describing the machine."""
    keys = ["cpu", "cores", "torch_threads", "gpu", "python", "torch", "triton", "relattn"]
    keys.append("loadavg")
    return "\n".join(f"- {k}: {info.get(k)}" for k in keys if k in info)


def write_report(  # kept for benchmarks/gpu_attention.py until it calls relattn.cli.bench.main
    text: str,
    info: dict[str, Any],
    rows: list[dict[str, Any]],
    out: str | None,
    json_path: str | None,
) -> None:
    """Print a benchmark's Markdown ``text``; also write it to ``out`` and the raw ``rows`` with
    the machine ``info`` to ``json_path`` when given."""
    print(text)
    if out:
        with open(out, "w") as fh:
            fh.write(text)
    if json_path:
        with open(json_path, "w") as fh:
            json.dump({"machine": info, "rows": rows}, fh, indent=1)
