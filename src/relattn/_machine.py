"""The CPU this process runs on, read once at import: cache sizes and vector extensions, and
the block and buffer sizes the CPU backends derive from them.

Cache sizes come from Linux's ``/sys/devices/system/cpu/cpu0/cache`` (level, type, size of
each cache of core 0), with safe defaults elsewhere. ``RELATTN_CPU_CACHES`` overrides them,
e.g. ``RELATTN_CPU_CACHES=l1d=32K,l2=512K,l3=32M``, to run another machine's schedule (the
benchmarks use it, with ``ATEN_CPU_CAPABILITY=avx2``, for an AVX2-class setting).
"""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["CPU", "SCHEDULE", "CpuInfo", "Schedule", "detect", "parse_size", "schedule"]

ENV = "RELATTN_CPU_CACHES"
_SYSFS = Path("/sys/devices/system/cpu/cpu0/cache")
# Used for any cache size the OS does not report: a common x86 server core.
DEFAULTS = {"l1d": 32 << 10, "l2": 1 << 20, "l3": 32 << 20}
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


@dataclass(frozen=True)
class CpuInfo:
    """What the schedule depends on, and what a benchmark reports with its numbers.

    Attributes:
        model: the CPU's model name (``/proc/cpuinfo``), or the platform's machine name.
        l1d, l2: per-core L1 data and L2 cache in bytes.
        l3: one L3 cache (shared by several cores) in bytes.
        flags: the CPU's feature flags (``avx2``, ``avx512f``, ...), empty if unknown.
        isa: the vector instruction set torch's own CPU kernels use (``"AVX512"``,
            ``"AVX2"``, ``"DEFAULT"``; ``ATEN_CPU_CAPABILITY`` lowers it).
        source: where the cache sizes came from: ``"sysfs"``, ``"env"`` or ``"default"``.
    """

    model: str
    l1d: int
    l2: int
    l3: int
    flags: frozenset[str]
    isa: str
    source: str

    def describe(self) -> str:
        """One line for a benchmark report."""
        named = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16")
        vec = [f for f in named if f in self.flags]
        return (
            f"{self.model}; L1d {_show(self.l1d)}, L2 {_show(self.l2)} per core, "
            f"L3 {_show(self.l3)} ({self.source}); flags: {' '.join(vec) or 'unknown'}; "
            f"torch kernels: {self.isa}"
        )


@dataclass(frozen=True)
class Schedule:
    """Block and buffer sizes of the chunked CPU backend.

    A step scores several heads' blocks in one batched matmul, and the softmax and the
    product with v then work on those scores while they are still in cache.

    Attributes:
        block_m: query rows per block.
        scores_per_step: scores (floats) per step, in general.
        scores_per_step_l2: scores per step when four or more heads' blocks fit in the L2
            (then the whole step does).
    """

    block_m: int
    scores_per_step: int
    scores_per_step_l2: int


def parse_size(text: str) -> int:
    """``"32K"``, ``"1024K"``, ``"32M"``, ``"512"`` (bytes; binary units) as an int."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)(?:i?B)?\s*", text, flags=re.IGNORECASE)
    if not m or int(m.group(1)) <= 0:
        raise ValueError(f"a cache size must look like 32K, 1M or 1048576; got {text!r}")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def _show(size: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} B"


def _from_sysfs(root: Path) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for index in sorted(root.glob("index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = parse_size((index / "size").read_text())
        except (OSError, ValueError):
            continue
        if kind == "Instruction":
            continue
        name = "l1d" if level == "1" else f"l{level}"
        if name in DEFAULTS:
            sizes.setdefault(name, size)
    return sizes


def _from_env(value: str) -> dict[str, int]:
    sizes = {}
    for part in value.split(","):
        name, _, size = part.partition("=")
        name = name.strip().lower()
        if name not in DEFAULTS or not size:
            raise ValueError(
                f"{ENV} must look like 'l1d=32K,l2=512K,l3=32M' (any of l1d, l2, l3); got {value!r}"
            )
        try:
            sizes[name] = parse_size(size)
        except ValueError as e:
            raise ValueError(f"{ENV}: {e}") from None
    return sizes


def _cpuinfo() -> tuple[str, frozenset[str]]:
    model, flags = platform.machine() or "unknown", None
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == platform.machine():
                    model = value.strip()
                elif key.strip() == "flags" and flags is None:
                    flags = value.split()
    except OSError:
        pass
    return model, frozenset(flags or ())


def detect(env: Mapping[str, str] | None = None, sysfs: Path = _SYSFS) -> CpuInfo:
    """The CPU as the OS reports it (``env`` defaults to ``os.environ``)."""
    env = os.environ if env is None else env
    sizes, source = _from_sysfs(sysfs), "sysfs"
    if env.get(ENV):
        sizes, source = {**sizes, **_from_env(env[ENV])}, "env"
    elif not sizes:
        source = "default"
    sizes = {**DEFAULTS, **sizes}
    model, flags = _cpuinfo()
    return CpuInfo(model, sizes["l1d"], sizes["l2"], sizes["l3"], flags, _isa(), source)


def _isa() -> str:
    try:
        return torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):  # older torch
        return "unknown"


def schedule(cpu: CpuInfo) -> Schedule:
    """The chunked backend's block and buffer sizes for ``cpu``.

    Measured on a 2-core AMD EPYC (Zen 4 in a VM; 1 MiB L2 per core, 32 MiB L3 shared with
    other tenants) with torch 2.13, fp32, B = 1, H = 8, D = 64, forward+backward, one thread,
    as ratios to bias-free SDPA (median of 3-5 interleaved rounds), with torch's kernels at
    AVX-512 and at AVX2 (``ATEN_CPU_CAPABILITY=avx2``):

    - scores per step, at 128-row blocks, N = 4096: 1 MiB of fp32 1.26 / 1.39 ×, 2 MiB
      1.21 / 1.36 ×, 4 MiB 1.18 / 1.31 ×, 8 MiB 1.28 / 1.36 ×, 16 MiB 1.30 / 1.35 ×
      (AVX-512 / AVX2); N = 2048: 4 MiB 1.10 / 1.26 ×, 16 MiB 1.22 / 1.39 ×. The score block
      is written by the matmul and read by the softmax and the product with v: it should stay
      near the core, and four L2s' worth did best (an L3 shared with other tenants or cores
      keeps less of a larger block);
    - when several heads' blocks fit in the L2 (short sequences, many heads: a TinyLM training
      step, B = 16, N = 128, H = 4, D = 16, the batch folded into 64 heads), steps of one
      L2's worth of scores (16 heads) took 90 ms per step against 116 ms for 4 MiB (one thread)
      and 283 ms against 349 ms with two threads on busy cores: there the whole step stays in
      the L2, and that matters more than the number of ops;
    - rows per block: 128 beat 64 by 0.05-0.15 × and 256 by 0.1 × at both ISAs: fewer rows
      add per-block overhead, more rows waste the diagonal block's masked half. The L2 size
      did not move it, so it stays 128 wherever the L2 holds a 128-row block's queries and
      keys (it always does).
    """
    l2 = min(max(cpu.l2, 256 << 10), 8 << 20)  # bytes
    fp32 = 4
    return Schedule(block_m=128, scores_per_step=4 * l2 // fp32, scores_per_step_l2=l2 // fp32)


CPU = detect()
SCHEDULE = schedule(CPU)
