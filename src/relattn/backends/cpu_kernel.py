"""Exact attention on the CPU in one fused C++ kernel: one parallel region per pass.

The chunked backend runs a few ATen ops per query block, and every op is an OpenMP parallel
region; on cores that other processes also use, each region waits for a descheduled thread, so
with torch's default threads it becomes several times slower than under one thread. This
backend's kernel (``_cpu_kernel.cpp``, shipped with the package) runs each pass as ONE
``at::parallel_for`` whose threads take (batch, head, query block) tasks from a shared counter.
The forward pass is an online softmax over key tiles; the backward pass recomputes the
probabilities from lse, sums dk, dv and the table gradient into per-thread buffers and reduces
them once. Float32, float64, bfloat16 and float16; any causal / window / q_offset, GQA, a
table, slopes or no position term, ``doc_ids`` and ``key_padding_mask``. Float32 tiles are
multiplied by the kernel's own register-tiled loops on CPUs with AVX2 + FMA or AVX-512 when the
head dim is a multiple of 16, else by the BLAS that torch ships (MKL). bfloat16 on a CPU with
AVX-512-BF16 (head dims that are a multiple of 32) multiplies in bf16 (``vdpbf16ps``: pairs of
bf16 products summed in float32); other 16-bit inputs are widened to float32 once per call and
computed like float32 ones. Either way the softmax statistics, the position term and every sum
(out, dq, dk, dv, the table gradient) are float32, and out, dq, dk, dv are rounded to the input
dtype once; :func:`compute_path` names the path that runs.

The extension is compiled with ``torch.utils.cpp_extension.load`` (needs a C++ compiler and
``ninja``) at its first use, into ``~/.cache/relattn`` or ``RELATTN_CPU_KERNEL_DIR``,
and reused from there by later processes. That first call blocks while it compiles, about
30 s (``COMPILE_TIME``; one line on stderr says so), like a first ``torch.compile``.
``RELATTN_CPU_KERNEL=0`` turns the backend off. If the build fails, the reason is kept, one
warning is given, the build is not tried again in this process, ``backend="auto"`` uses the
chunked backend, and ``backend="cpu_kernel"`` raises a RuntimeError with the reason.
``RELATTN_CPU_KERNEL_FLAGS`` adds compile and link flags (a build of its own name:
``tools/sanitize.py`` builds with AddressSanitizer and UBSan this way).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..masks import doc_bounds
from ..problem import Problem
from .base import Backend, Call, Layout, TokenTerms

__all__ = ["CpuKernelBackend", "available", "backward", "build_error", "forward", "load"]

SOURCE = Path(__file__).with_name("_cpu_kernel.cpp")
# How long the first build takes, as the stderr line, the README and the docs say it: measured
# with an empty RELATTN_CPU_KERNEL_DIR, 31 s on an Intel Xeon (Sapphire Rapids class, GCC 12.2)
# and 32 s and 34 s on 2 busy cores of an AMD EPYC (Zen 4 class); tests/test_readme.py checks
# that every mention agrees.
COMPILE_TIME = "about 30 s"
# Query rows per task and keys per tile. Measured (fp32, B=1, H=8, D=64, N=4096, causal,
# T5 table, 1 thread, AMD EPYC Zen 4 with 1 MiB L2 per core), forward / backward seconds:
# 64 x 1024: 0.32 / 0.73; 128 x 256: 0.30 / 0.62; 128 x 1024: 0.30 / 0.78; 256 x 256: 0.34 / 0.66;
# 32 x 512: 0.37 / 0.74. A 128 x 256 tile's scores are 128 KiB, two of them stay in the L2
# with the tile's k and v.
BLOCK_M = 128
BLOCK_N = 256

_lock = threading.Lock()
_module: Any = None
_error: str | None = None


def _disabled() -> str | None:
    if os.environ.get("RELATTN_CPU_KERNEL", "1").strip().lower() in ("0", "false", "no", "off"):
        return "the CPU kernel is turned off (RELATTN_CPU_KERNEL=0)"
    return None


def _cflags() -> list[str]:
    """-O3 for any CPU of the architecture (a cached build may move between machines; the row
    kernels are cloned per ISA inside). With torch's OpenMP thread pool, -fopenmp too: without
    it, at::parallel_for in the extension's code runs its body on the calling thread, and the
    nested ATen and MKL calls each open their own parallel region again. The OpenMP symbols then
    resolve to the runtime torch already loaded (nothing else is linked)."""
    flags = ["-O3", "-fno-trapping-math"]  # lets selects in the row loops vectorize
    if "OpenMP" in torch.__config__.parallel_info():
        flags.append("-fopenmp")
    # RELATTN_CPU_KERNEL_ISA=avx2: no AVX-512 clone (benchmarks emulate an AVX2-class machine).
    if os.environ.get("RELATTN_CPU_KERNEL_ISA", "").strip().lower() == "avx2":
        flags.append("-DRELATTN_ISA_AVX2")
    return flags + _extra_flags()


def _extra_flags() -> list[str]:
    """``RELATTN_CPU_KERNEL_FLAGS``: more flags for compiling and linking, after the defaults
    (so ``-O1`` overrides ``-O3``), e.g. ``-fsanitize=address,undefined`` for the sanitizer
    build of ``tools/sanitize.py``. They are part of the build's name, so such a build never
    replaces or is mistaken for the ordinary one."""
    return os.environ.get("RELATTN_CPU_KERNEL_FLAGS", "").split()


def _name() -> str:
    """The module's name: one per source, torch version and flags, so a cached build is never
    loaded into a torch it was not compiled against."""
    key = SOURCE.read_bytes() + f"{torch.__version__} {sys.version} {_cflags()}".encode()
    return "relattn_cpu_kernel_" + hashlib.sha256(key).hexdigest()[:12]


def _build_dir(name: str) -> str:
    """``RELATTN_CPU_KERNEL_DIR/<name>``, else ``<XDG cache>/relattn/<name>`` (``~/.cache`` by
    default). Not torch's extensions directory: finding that imports
    ``torch.utils.cpp_extension`` (and setuptools), a tenth of a second of every process's
    first call even when the build is there."""
    path = _build_path(name)
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def _build_path(name: str) -> Path:
    """:func:`_build_dir`'s path, not created."""
    root = os.environ.get("RELATTN_CPU_KERNEL_DIR")
    if not root:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(cache, "relattn")
    return Path(root) / name


def _build() -> Any:
    """Compile (or load from the cache) the extension module."""
    ninja = _ninja_dir()
    if ninja and not shutil.which("ninja"):  # torch's build runs "ninja" from the PATH
        os.environ["PATH"] = ninja + os.pathsep + os.environ.get("PATH", "")
    name = _name()
    build_dir = _build_dir(name)
    built = Path(build_dir) / f"{name}.so"
    # A finished build (its name is keyed by source, torch, Python and flags) is imported
    # directly: cpp_extension.load would hash the source and run ninja first, about 0.2 s of a
    # process's first call. No lock file: no other process is building it right now.
    if built.exists() and not (Path(build_dir) / "lock").exists():
        try:
            return _import(name, built)
        except ImportError:
            pass  # e.g. a build cut short: let the builder redo it
    from torch.utils import cpp_extension

    if not built.exists():
        print(
            f"relattn: compiling the CPU attention kernel once ({COMPILE_TIME})…", file=sys.stderr
        )
    return cpp_extension.load(
        name=name,
        sources=[str(SOURCE)],
        extra_cflags=_cflags(),
        extra_ldflags=_extra_flags(),
        build_directory=build_dir,
        verbose=False,
    )


def _import(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ninja_dir() -> str | None:
    """Where the ``ninja`` executable is: on the PATH, or next to this interpreter (pip puts
    the ninja package's there, which is not on the PATH of an interpreter run without its
    virtual environment activated)."""
    found = shutil.which("ninja")
    if found:
        return os.path.dirname(found)
    here = os.path.dirname(sys.executable)
    return here if shutil.which("ninja", path=here) else None


def _find_toolchain() -> bool:
    """Whether a build can be tried here: ninja and a C++ compiler (``$CXX`` or ``c++``)."""
    cxx = os.environ.get("CXX", "c++")
    return _ninja_dir() is not None and shutil.which(cxx) is not None


# Read by priority(), which torch.compile traces: a plain value, found once at import (two
# PATH lookups, no subprocess).
_TOOLCHAIN = _find_toolchain()


def _toolchain() -> bool:
    return _TOOLCHAIN


def load() -> Any:
    """The compiled extension module, building it on first use; raises RuntimeError with the
    reason if it cannot be built (remembered: the build is tried once per process)."""
    global _module, _error
    if _module is not None:
        return _module
    reason = _disabled()
    if reason:
        raise RuntimeError(reason)
    with _lock:
        if _module is None and _error is None:
            try:
                _module = _build()
            except Exception as e:  # no compiler, no ninja, a compile error, ...
                _error = f"the CPU kernel could not be built: {type(e).__name__}: {e}"
                warnings.warn(
                    f"relattn: {_error}; falling back to the chunked backend", stacklevel=2
                )
    if _module is None:
        raise RuntimeError(_error)
    return _module


def build_error() -> str | None:
    """Why the kernel is unavailable (turned off, or a failed build), or None."""
    return _disabled() or _error


def available() -> bool:
    """Whether the kernel is built, or can be built here and no try has failed in this
    process."""
    if build_error() is not None:
        return False
    return _module is not None or _toolchain()


def ready() -> Any:
    """The extension module if it is loaded, or built on disk and loaded now (an import, no
    compile); else None. Decoding's one-row kernel uses it where it exists and never starts a
    build. A build absent at the first ask is not looked for again in this process (each
    decoding step asks), until :func:`load` builds it."""
    global _looked
    if _module is not None:
        return _module
    if _looked:
        return None
    _looked = True
    if build_error() is not None:
        return None  # (no compiler is no reason: a finished build is only imported)
    name = _name()
    path = _build_path(name)
    if not (path / f"{name}.so").exists() or (path / "lock").exists():
        return None
    try:
        return load()
    except RuntimeError:
        return None


_looked = False


DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _dtype_ok(q: Tensor) -> bool:
    return q.dtype in DTYPES


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernel computes ``dtype`` inputs in: float64 for float64, else float32
    (also the dtype of its lse and table gradient)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def compute_path(dtype: torch.dtype, head_dim: int) -> str:
    """What the kernel runs for ``dtype`` inputs of head dim ``head_dim`` on this CPU, e.g.
    ``"tiles (AVX-512)"``, ``"blas"``, ``"bfloat16 tiles (AVX-512-BF16)"`` or
    ``"float16 widened to float32, tiles (AVX2)"``: the tile products' implementation, for
    16-bit inputs bf16 products (bfloat16 on a CPU with AVX-512-BF16, head dims that are a
    multiple of 32) or the widening before float32 ones. Builds the kernel if it is not built.

    Raises:
        ValueError: ``dtype`` is not one of the kernel's.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}; got {dtype}")
    mod = load()
    if dtype == torch.bfloat16 and mod.bf16_products_for(head_dim):
        return "bfloat16 tiles (AVX-512-BF16), float32 softmax and sums"
    # float64 never takes the own loops: its path is that of a head dim they decline (1).
    products = mod.products_for(1 if dtype == torch.float64 else head_dim)
    if dtype in (torch.float32, torch.float64):
        return products
    return f"{str(dtype)[6:]} widened to float32, {products}"


def _prepare(q, k, v, table, slopes):
    """The kernel's dtypes (q, k, v in q's; table and slopes in the compute dtype); the layout
    (contiguous) is :class:`CpuKernelBackend`'s declared one, which the caller's
    :func:`~relattn.backends.base.conform` gives (the kernel raises on anything else)."""
    dt, ct = q.dtype, compute_dtype(q.dtype)
    q, k, v = (x.to(dt) for x in (q, k, v))
    empty = q.new_empty(0, dtype=ct)
    table = table.to(ct).contiguous() if table is not None else empty
    slopes = slopes.to(ct).contiguous() if slopes is not None else empty
    return q, k, v, table, slopes


def _token(q: Tensor, token: TokenTerms | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(band_r, band_w, gate_q, gate_k)`` for the kernel: ``token``'s ``r (B, Hq, Nq, R)``,
    ``weight (Hw, R, W)``, ``fq (B, Hq, Nq)``, ``fk (B, Hq, Nk)`` in the compute dtype,
    contiguous; an empty tensor for each absent one."""
    ct = compute_dtype(q.dtype)
    empty = q.new_empty(0, dtype=ct)
    if token is None:
        return empty, empty, empty, empty
    r, w, fq, fk = (x.to(ct).contiguous() if x is not None else empty for x in token)
    return r, w, fq, fk


def _params(
    mod,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    t: Tensor,
    s: Tensor,
    p: Problem,
    token: TokenTerms | None = None,
):
    """The kernel's ``Params`` (one C++ struct, filled by name: the one place a call is
    flattened for it) from the conformed tensors, the table ``t`` and slopes ``s`` (empty
    tensors for none), the problem and the token terms (None for none)."""
    params = mod.Params()
    params.q, params.k, params.v, params.table, params.slopes = q, k, v, t, s
    params.band_r, params.band_w, params.gate_q, params.gate_k = _token(q, token)
    params.doc_lo, params.doc_hi, params.kpm = _masks(q, p)
    params.lo, params.scale, params.causal = p.lo, p.scale, p.causal
    params.q_offset, params.window = p.q_offset, p.window
    params.block_m, params.block_n = BLOCK_M, BLOCK_N
    return params


def _masks(q: Tensor, problem: Problem) -> tuple[Tensor, Tensor, Tensor]:
    """``(doc_lo, doc_hi, kpm)``: per query row the keys ``[doc_lo, doc_hi)`` of its document
    (int64 ``(B, Nq)``), the key padding mask (bool ``(B, Nk)``); empty tensors for none."""
    none = torch.empty(0, dtype=torch.int64)
    doc_lo = doc_hi = none
    if problem.doc_ids is not None:
        start, end = doc_bounds(problem.doc_ids)
        rows = slice(problem.q_offset, problem.q_offset + q.shape[2])
        doc_lo, doc_hi = start[:, rows].contiguous(), end[:, rows].contiguous()
    kpm = torch.empty(0, dtype=torch.bool)
    if problem.key_padding_mask is not None:
        kpm = problem.key_padding_mask.to(torch.bool).contiguous()
    return doc_lo, doc_hi, kpm


def forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    table: Tensor | None,
    slopes: Tensor | None,
    problem: Problem,
    token: TokenTerms | None = None,
) -> tuple[Tensor, Tensor]:
    """``(out (B, Hq, Nq, D) in q's dtype, lse (B, Hq, Nq))``; lse is float32 (float64 for
    float64 inputs), ``-inf`` for rows that see no key (their out is 0).

    q ``(B, Hq, Nq, D)``; k, v ``(B, Hkv, Nk, D)``; table ``(Hq, T)`` or slopes ``(Hq,)``;
    token: the banded bias and forget gate (:class:`~relattn.backends.base.TokenTerms`), or
    None.
    """
    mod = load()
    q, k, v, t, s = _prepare(q, k, v, table, slopes)
    out, lse = mod.forward(_params(mod, q, k, v, t, s, problem, token))
    return out, lse


# The backward's per-thread buffers may take this share of the machine's memory (at least
# _SLOTS_FLOOR bytes); beyond, fewer threads run it.
SLOT_MEMORY_SHARE = 0.1
_SLOTS_FLOOR = 1 << 30


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def max_slots(q: Tensor, k: Tensor, has_table: bool, token: TokenTerms | None = None) -> int:
    """How many per-thread dk/dv (and table-gradient) buffers the backward may keep: each is
    ``2·size(k)`` plus ``Hq·(Nq + Nk)`` for the table's, ``size(weight)`` for the banded bias's
    and ``B·Hq·Nk`` for the forget gate's key side, in the compute dtype (float32 for 16-bit
    k), and together they stay under ``SLOT_MEMORY_SHARE`` of the machine's memory (at least
    1 GiB). At N = 32768, 8 kv heads, D = 64 a float32 buffer is 128 MiB, so a 16 GiB machine
    runs the backward on up to 12 threads."""
    table_part = q.shape[1] * (q.shape[2] + k.shape[2]) if has_table else 0
    if token is not None:
        if token.weight is not None:
            table_part += token.weight.numel()
        if token.fk is not None:
            table_part += token.fk.numel()
    per_slot = (2 * k.numel() + table_part) * compute_dtype(k.dtype).itemsize
    budget = max(_SLOTS_FLOOR, int(SLOT_MEMORY_SHARE * _physical_memory()))
    return max(1, budget // max(1, per_slot))


def backward(call: Call, grad_out: Tensor, out: Tensor, lse: Tensor) -> tuple:
    """``(dq, dk, dv, dtable)`` shaped like q, k, v and table (None without a table); with
    ``call.token``, followed by ``(dr, dweight, dfq, dfk)`` shaped like its tensors, each in
    the dtype of the tensor it belongs to (None for absent ones)."""
    q, k, v, table, slopes, problem = call[:6]
    token = call.token
    mod = load()
    dt = q.dtype
    q2, k2, v2, t, s = _prepare(q, k, v, table, slopes)
    dout, out = (x.to(dt).contiguous() for x in (grad_out, out))
    lse = lse.to(compute_dtype(dt)).contiguous()
    params = _params(mod, q2, k2, v2, t, s, problem, token)
    slots = max_slots(q2, k2, t.numel() > 0, token)
    dq, dk, dv, dtable, *dtoken = mod.backward(params, dout, out, lse, slots)
    grads = (
        dq,
        dk.to(k.dtype),
        dv.to(v.dtype),
        dtable.to(table.dtype) if table is not None else None,
    )
    if token is None:
        return grads
    return grads + tuple(
        g.to(x.dtype) if x is not None else None for g, x in zip(dtoken, token, strict=True)
    )


class CpuKernelBackend(Backend):
    """The fused C++ CPU kernel: float32/float64/bfloat16/float16 (bf16 products on AVX-512-BF16,
    else 16-bit widened to float32; statistics and sums in float32), every mask."""

    name = "cpu_kernel"
    layout = Layout(q="contiguous", kv="contiguous")  # the C++ kernel indexes dense arrays
    row_term_from_out = True  # D_i = rowsum(grad_out ∘ out), P from the given lse
    context_parallel = True
    devices = ("cpu",)
    dtypes = DTYPES
    top_priority = 20.0
    token_terms = True  # the banded bias and the forget gate inside the tiles

    def unsupported(self, q: Tensor, k: Tensor, problem: Problem) -> str | None:
        if q.device.type != "cpu":
            return f"CPU tensors only; got {q.device.type}"
        if not _dtype_ok(q):
            return f"float32, float64, bfloat16 or float16 only; got {q.dtype}"
        if problem.doc_ids is not None and not (
            0 <= problem.q_offset and problem.q_offset + q.shape[2] <= problem.doc_ids.shape[1]
        ):
            return "doc_ids must cover the query positions q_offset .. q_offset + Nq - 1"
        return build_error()

    def priority(self, q: Tensor, k: Tensor, problem: Problem) -> float | None:
        """20 (above chunked's 10, below decode's 40) on the CPU for its dtypes, where the
        kernel is built or can be built here (ninja and a compiler found, no failed try). So
        decode keeps up to its ``MAX_ROWS`` query rows, and this kernel takes the rest,
        including the few-row calls that decode declines (its live-score budget: 0.24 s against
        chunked's 0.48 s for a training step at Nq = 128, Nk = 16384, 1 thread). The first
        such call in a machine's life blocks for the compile, about 30 s (announced on
        stderr).

        Measured (benchmarks/cpu_kernel_products.py; fp32 training, B=1, H=8, D=64, T5, causal;
        2-core AMD EPYC Zen 4; seconds per step, kernel / chunked / SDPA without bias): N=2048,
        1 thread 0.218 / 0.306 / 0.246; N=4096, 1 thread 0.821 / 1.100 / 0.876; 2 threads 0.421
        / 0.867 / 0.476; 2 threads with one core busy 0.695 / 2.345 / 0.723; and at N = 160,
        256, 512, 1024 with 1 and 2 threads the kernel took 0.43-0.75x chunked's time. No
        crossover was found from N = 160 up, with 1 thread too, so it is preferred wherever it
        runs."""
        if q.device.type != "cpu" or not _dtype_ok(q):
            return None
        if not available():
            return None
        return 20.0

    def forward(self, call: Call) -> tuple[Tensor, Tensor]:
        return forward(*call[:6], call.token)

    def backward(self, call: Call, grad_out: Tensor, out: Tensor, lse: Tensor) -> tuple:
        return backward(call, grad_out, out, lse)


BACKEND = CpuKernelBackend()
