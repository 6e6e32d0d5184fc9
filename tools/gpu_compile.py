"""Compile relattn's Triton kernels ahead of time for A100 (sm_80) and H100 (sm_90a), no GPU needed.

Triton lowers a kernel for a named target (``triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32))``) with the ``ptxas`` shipped in its wheel, so every layout,
shared-memory budget and register allocation is checked here without a device. Each job compiles
one kernel for one architecture, dtype, head dim, autotune config and compile-time variant, and
records registers, spills (``ptxas -v``), shared memory and the occupancy those allow.

    python tools/gpu_compile.py                 # the full matrix; prints the resource table
    python tools/gpu_compile.py --ci            # the representative subset CI runs
    python tools/gpu_compile.py --table t.md --json r.json -j 2

It fails (exit 1) on a compile error, on shared memory above the architecture's per-block limit
(or above pruning's estimate) for a config that pruning keeps, and on register spills in bf16,
D = 128 without extra masks in the config used without autotuning, when any spill instruction
lies inside a loop (the SASS says where; a value stored once before the loops and loaded once
after them is reported, not failed). Results are
cached per job, keyed on the kernel source and the triton version, under ``$RELATTN_AOT_CACHE``
(default ``~/.cache/relattn/triton-aot``).

    python tools/gpu_compile.py --sass DIR ...  # also the SASS of every job, one file each
    python tools/gpu_compile.py --gate          # the offline gate on the key loops' SASS

``--sass DIR`` disassembles each compiled job with the triton wheel's ``nvdisasm`` into
``DIR/<kernel>-sm_90a-<table|slopes|none>[-det]-<dtype>-d<D>-<config>[-masks][-bidir].sass``.
``--gate`` compiles the forward, dq and dk/dv kernels for sm_90a (bf16, D = 128, causal, every
config pruning keeps for that shape, the default first) with a table, with closed-form slopes
and with no position term, counts each key loop's instructions (``tools/sass_loops.py``) and
fails when a loop with a position term issues global loads or 4-byte ``cp.async`` per score
(M1: more than a quarter of the scores each thread holds beyond the no-term loop), issues an
atomic (M2), exceeds its no-term loop's instructions by more than 15 % (2 % for the constant-run
stage) (M3; in dq and dk/dv the no-term loop plus one instruction per score: there the row's
-lse·log2 e joins the scale's FFMA only without a term), or, for the forward and dq, has no
wgmma or has it serialized by ptxas (warning C7515) (M4). It also compiles a bias-free forward
in the tutorial's structure (``tools/yardstick_kernel.py``) and prints the forward's loops
against it, and the forward time that the counts predict per encoding. The dk/dv variant that
adds the table gradient by atomics is gated on M1 and on M2 as one atomic per offset of a tile
(per-tile diagonal sums), none per score; its instruction ratio is reported (M3 is not applied
to it: it runs only for tables without a tied tail, such as KERPLE's; T5 and OffsetBias take
the deterministic variant and the band kernel over their untied diagonals). The token terms'
variants (the band, the gate; causal, no table) are gated on M2, M4 and on 4-byte loads beyond
the no-term loop (M1: their tiles read P's span and fk as vectors), and their instruction
counts against the no-term loop are reported (M3 is not applied to them).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib.util
import io
import json
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import ModuleType

KERNEL_FILE = Path(__file__).resolve().parents[1] / "src/relattn/backends/triton_kernels.py"

# Per-block shared memory (opt-in maximum), per-SM shared memory, registers per SM and threads
# per SM, from NVIDIA's tuning guides for the A100 (sm_80) and H100 (sm_90).
ARCHS = {
    80: {"name": "A100 (sm_80)", "smem_block": 163 * 1024, "smem_sm": 164 * 1024},
    90: {"name": "H100 (sm_90a)", "smem_block": 227 * 1024, "smem_sm": 228 * 1024},
}
REGS_PER_SM = 65536
THREADS_PER_SM = 2048
BLOCKS_PER_SM = 32
SMEM_RESERVED_PER_BLOCK = 1024  # the driver reserves 1 KiB of shared memory per block
DTYPES = {"fp16": 2, "bf16": 2, "fp32": 4}

# Pointer arguments: "x" is the input dtype; the rest are fixed.
POINTERS = {
    **dict.fromkeys(["Q", "K", "V", "Out", "dOut", "dQ", "dK", "dV"], "x"),
    **dict.fromkeys(
        ["Lse", "NegLse2", "Delta", "DeltaOut", "Inv", "Table", "DTable", "Slopes"], "fp32"
    ),
    **dict.fromkeys(["Partial", "PartialOut", "PartialLse", "PartialP"], "fp32"),
    **dict.fromkeys(["Rq", "Pw", "Fq", "Fk", "dR", "dFq", "dFk"], "fp32"),
    **dict.fromkeys(["DocStart", "DocEnd", "KvBounds", "TableEnds"], "i32"),
    "Kpm": "u8",
}
FLOATS = {"qk_scale", "scale"}
LAUNCH_OPTIONS = {"num_warps", "num_stages"}
# Integer arguments that are multiples of 16 in a typical call (contiguous (B, H, N, D) tensors
# with D and N multiples of 16, the band's rank 16); Triton's launcher gives them the same
# divisibility hint.
DIVISIBLE = re.compile(r"^(stride_\w+|Nq|Nk|N|rank)$")


@dataclasses.dataclass(frozen=True)
class Job:
    """One kernel compiled for one target."""

    kernel: str
    arch: int
    dtype: str
    head_dim: int
    config: tuple[int, int, int, int] | None  # BLOCK_M, BLOCK_N, num_warps, num_stages
    variant: tuple[tuple[str, object], ...]  # compile-time flags
    gated: bool = False  # spills fail the check

    @property
    def key(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    def label(self) -> str:
        cfg = "-" if self.config is None else "{}x{} w{} s{}".format(*self.config)
        flags = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.variant)
        return f"{self.kernel} sm_{self.arch} {self.dtype} D={self.head_dim} {cfg} [{flags}]"


# ----------------------------------------------------------------------------- the kernels


YARDSTICK_FILE = Path(__file__).resolve().parent / "yardstick_kernel.py"
YARDSTICK = "yardstick_fwd"


def _compiled_module(name: str, path: Path) -> ModuleType:
    """The kernels of ``path`` in compiled mode (never the interpreter's), imported once as
    ``name``, without importing torch."""
    os.environ.pop("TRITON_INTERPRET", None)
    import triton

    triton.knobs.runtime.interpret = False
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def yardstick() -> ModuleType:
    """tools/yardstick_kernel.py, the gate's bias-free reference forward."""
    return _compiled_module("relattn_yardstick_aot", YARDSTICK_FILE)


def load_kernels() -> ModuleType:
    """relattn's kernel module (src/relattn/backends/triton_kernels.py)."""
    return _compiled_module("relattn_triton_kernels_aot", KERNEL_FILE)


TOKEN_KERNELS = ("attn_fwd", "attn_fwd_splitkv", "attn_bwd_dq", "attn_bwd_dkdv")
# The token terms' variants (causal, no table, no other mask): the band, the gate.
TOKEN_VARIANTS = ({"HAS_BAND": True}, {"HAS_GATE": True})


def token_variants(kernel: str) -> list[dict]:
    """The band's and the gate's variants of a kernel that computes them (none otherwise)."""
    if kernel not in TOKEN_KERNELS:
        return []
    base = {"CAUSAL": True, "WINDOW": False, "HAS_DOC": False, "HAS_KPM": False,
            "HAS_TABLE": False, "HAS_SLOPES": False}  # fmt: skip
    if kernel == "attn_bwd_dkdv":
        base["ATOMIC_TABLE"] = False
    return [{**base, **t} for t in TOKEN_VARIANTS]


def _variants(kernel: str) -> list[dict]:
    """Compile-time variants; the first is the one the targets use (a table, causal, no other
    mask), the second the heaviest (a table and every mask)."""
    if kernel in ("bwd_preprocess", "table_ends"):
        return [{}]
    masks = [{"WINDOW": w, "HAS_DOC": w, "HAS_KPM": w} for w in (False, True)]
    if kernel == "attn_bwd_band_dp":  # the band's weight gradient, with and without the gate
        base = {"HAS_TABLE": False, "HAS_SLOPES": False}
        return [{"CAUSAL": c, **m, **base, "HAS_GATE": g} for g in (False, True) for m in masks
                for c in (True, False)]  # fmt: skip
    if kernel == "attn_bwd_table_bands":
        return [{"CAUSAL": c, **m} for m in masks for c in (True, False)]
    out = []
    for has_table, has_slopes in ((True, False), (False, True), (False, False)):
        for m in masks:
            for causal in (True, False):
                v = {"CAUSAL": causal, **m, "HAS_TABLE": has_table, "HAS_SLOPES": has_slopes}
                if kernel == "attn_bwd_dkdv":
                    v["ATOMIC_TABLE"] = has_table
                out.append(v)
    out.insert(1, out.pop(2))  # table, every mask, causal
    if kernel == "attn_bwd_dkdv":  # the deterministic path: a table without atomics
        out.append({**out[0], "ATOMIC_TABLE": False})
    return out + token_variants(kernel)


def jobs(full: bool) -> list[Job]:
    """The full matrix, or the CI subset: every kernel on both architectures at bf16, D = 128,
    with the first config pruning keeps and the targets' variant.

    Full: every kept config (heaviest variant and the targets' variant) for fp16, bf16 and fp32
    at D = 64 and 128 and for bf16 and fp32 at D = 32; every variant at bf16, D = 128 with the
    first kept config. Spills fail only the first kept config (the one used without autotuning)
    of bf16, D = 128 without extra masks; the others' are reported.
    """
    K = load_kernels()
    out: list[Job] = []
    for kernel in K.AOT_KERNELS:
        variants = _variants(kernel)
        for arch in ARCHS:
            for dtype, elt in DTYPES.items():
                for d in (32, 64, 128):
                    main = dtype == "bf16" and d == 128
                    if (not full and not main) or (d == 32 and dtype == "fp16"):
                        continue
                    chosen = variants if (full and main) else variants[: 2 if full else 1]
                    if main and not full:  # CI: the token terms' variants too
                        chosen = chosen + token_variants(kernel)
                    for i, v in enumerate(chosen):
                        has_table = v.get("HAS_TABLE", True)
                        limit = ARCHS[arch]["smem_block"]
                        configs = K.kept_configs(
                            kernel, d, elt, limit, has_table, v.get("HAS_BAND", False)
                        )
                        if not full or i >= 2:
                            configs = configs[:1]
                        masks = v.get("WINDOW") or v.get("HAS_DOC") or v.get("HAS_KPM")
                        # The token terms' variants fail on spills too (none since the band's
                        # dr left the dq kernel).
                        gated = main and not masks
                        flags = tuple(sorted(v.items()))
                        # Spills fail the default (first) config; the others autotuning
                        # keeps are timed before use, so their spills are reported only.
                        out += [
                            Job(kernel, arch, dtype, d, c, flags, gated and j == 0)
                            for j, c in enumerate(configs)
                        ]
    return out


def _signature(fn, job: Job, K: ModuleType) -> tuple[dict, dict, dict]:
    d = job.head_dim
    block_d = max(16, 1 << (d - 1).bit_length())
    constexprs = {
        "HEAD_DIM": d,
        "BLOCK_D": block_d,
        "UPCAST": False,
        "PRECISION": "ieee" if job.dtype == "fp32" else "tf32",
        "HAS_BAND": False,
        "HAS_GATE": False,
        "R_PAD": 16,
        # Tensor descriptors (TMA) where the backend uses them: Hopper and later.
        "TMA": job.arch >= 90,
        **dict(job.variant),
    }
    if job.config is not None:
        constexprs.update(K.config_constexprs(job.kernel, job.config))
    else:
        fixed = K.AOT_KERNELS[job.kernel]["options"](d, DTYPES[job.dtype])
        constexprs.update({n: v for n, v in fixed.items() if n not in LAUNCH_OPTIONS})
    names = fn.arg_names
    constexprs = {n: v for n, v in constexprs.items() if n in names}
    signature, attrs = {}, {}
    for i, name in enumerate(names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in POINTERS:
            kind = POINTERS[name]
            if kind == "x":
                kind = job.dtype
            if name == "Kpm" and not dict(job.variant).get("HAS_KPM", False):
                kind = "i32"  # the placeholder the launcher passes
            signature[name] = "*" + kind
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32" if name in FLOATS else "i32"
            if DIVISIBLE.match(name):
                attrs[(i,)] = [["tt.divisibility", 16]]
    missing = [p.name for p in fn.params if p.is_constexpr and p.name not in constexprs]
    if missing:
        raise ValueError(f"{job.kernel}: no value for constexpr {missing}")
    return signature, constexprs, attrs


def _ptxas_numbers(log: str) -> dict:
    def grab(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else None

    return {
        "regs": grab(r"Used (\d+) registers"),
        "spill_stores": grab(r"(\d+) bytes spill stores"),
        "spill_loads": grab(r"(\d+) bytes spill loads"),
        "stack": grab(r"(\d+) bytes stack frame"),
    }


def occupancy(regs: int, smem: int, warps: int, arch: int) -> float:
    """Resident warps per SM over the maximum (64), limited by registers, shared memory,
    threads and blocks; register allocation rounds each warp up to 256 registers."""
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = REGS_PER_SM // (per_warp * warps) if per_warp else BLOCKS_PER_SM
    by_smem = ARCHS[arch]["smem_sm"] // (smem + SMEM_RESERVED_PER_BLOCK)
    by_threads = THREADS_PER_SM // (32 * warps)
    blocks = min(by_regs, by_smem, by_threads, BLOCKS_PER_SM)
    return blocks * warps / (THREADS_PER_SM // 32)


def sass_name(job: Job) -> str:
    """The file name of a job's SASS: kernel, architecture, position term, dtype, D, config and
    masks / direction where they differ from the targets'."""
    v = dict(job.variant)
    arch = f"sm_{job.arch}{'a' if job.arch == 90 else ''}"
    enc = "table" if v.get("HAS_TABLE", True) else ("slopes" if v.get("HAS_SLOPES") else "none")
    if job.kernel == YARDSTICK:  # no position term, by construction
        enc = "none"
    if v.get("ATOMIC_TABLE") is False and v.get("HAS_TABLE"):
        enc += "-det"
    token = "+".join(t for t in ("band", "gate") if v.get(f"HAS_{t.upper()}"))
    if token:
        enc = token if enc == "none" else f"{enc}+{token}"
    cfg = "default" if job.config is None else "{}x{}-w{}-s{}".format(*job.config)
    extra = ("-masks" if v.get("WINDOW") else "") + ("-bidir" if v.get("CAUSAL") is False else "")
    return f"{job.kernel}-{arch}-{enc}-{job.dtype}-d{job.head_dim}-{cfg}{extra}.sass"


def _disassemble(cubin: bytes, path: Path) -> str:
    """The SASS of a cubin (written next to ``path``), by the triton wheel's nvdisasm."""
    import subprocess

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    binary = path.with_suffix(".cubin")
    binary.write_bytes(cubin)
    try:
        res = subprocess.run(
            [str(tool), "-c", "-g", str(binary)], capture_output=True, text=True, check=True
        )
    finally:
        binary.unlink()
    path.write_text(res.stdout)
    return res.stdout


def compile_job(job: Job) -> dict:
    """Compile one job (in a worker process) and return its resources, or its error; with
    ``$RELATTN_AOT_SASS`` set to a folder, also its SASS there and its key loops' counts."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    K = load_kernels()
    fn = getattr(yardstick() if job.kernel == YARDSTICK else K, job.kernel)
    if job.kernel in K.AUTOTUNED:
        fn = fn.fn  # the Autotuner's JITFunction
    start = time.perf_counter()
    result: dict = {"job": job.key}
    log = io.StringIO()
    try:
        signature, constexprs, attrs = _signature(fn, job, K)
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        options = {}
        if job.config is not None:
            options = {"num_warps": job.config[2], "num_stages": job.config[3]}
        else:
            fixed = K.AOT_KERNELS[job.kernel]["options"](job.head_dim, DTYPES[job.dtype])
            options = {n: v for n, v in fixed.items() if n in LAUNCH_OPTIONS}
        # A private cache directory: Triton must run ptxas (and print its log) every time.
        with tempfile.TemporaryDirectory() as cache, contextlib.redirect_stdout(log):
            os.environ["TRITON_CACHE_DIR"] = cache
            triton.knobs.nvidia.dump_ptxas_log = True
            compiled = triton.compile(src, target=GPUTarget("cuda", job.arch, 32), options=options)
        md = compiled.metadata
        result.update(_ptxas_numbers(log.getvalue()))
        # ptxas C7515: "wgmma.mma_async instructions are serialized" (a pipeline stall per dot)
        result["wgmma_serialized"] = "C7515" in log.getvalue()
        sass_dir = os.environ.get("RELATTN_AOT_SASS")
        sass = None
        if sass_dir:
            sass = _disassemble(compiled.asm["cubin"], Path(sass_dir) / sass_name(job))
            result["loops"] = [dict(c) for c in _sass_loops().loops(sass)]
        if (result.get("spill_stores") or 0) + (result.get("spill_loads") or 0):
            # Where the spills are: inside a loop they cost per iteration, outside once a program.
            if sass is None:
                with tempfile.TemporaryDirectory() as tmp:
                    sass = _disassemble(compiled.asm["cubin"], Path(tmp) / "job.sass")
            result["loop_spills"] = sum(c["spill"] for c in _sass_loops().loops(sass))
        result["shared"] = int(md.shared)
        result["warps"] = int(md.num_warps)
        if result["regs"] is not None:
            result["occupancy"] = occupancy(
                result["regs"], result["shared"], md.num_warps, job.arch
            )
    except Exception as e:  # noqa: BLE001  (the error is the result)
        result["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


# ----------------------------------------------------------------------------- cache and checks


def cache_key() -> str:
    import triton

    h = hashlib.sha256(KERNEL_FILE.read_bytes())
    h.update(Path(__file__).read_bytes())
    h.update(YARDSTICK_FILE.read_bytes())
    h.update(triton.__version__.encode())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "relattn" / "triton-aot"
    return Path(os.environ.get("RELATTN_AOT_CACHE", default)) / cache_key()


def _sass_loops() -> ModuleType:
    """tools/sass_loops.py, the per-loop instruction counter."""
    if "relattn_sass_loops" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "relattn_sass_loops", Path(__file__).resolve().parent / "sass_loops.py"
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["relattn_sass_loops"] = module
        spec.loader.exec_module(module)
    return sys.modules["relattn_sass_loops"]


def run(job_list: list[Job], workers: int, progress=None, sass: Path | None = None) -> list[dict]:
    """Every job's result, from the cache or compiled in ``workers`` processes; with ``sass``
    (a folder) every job is compiled afresh and disassembled there (``loops`` in its result)."""
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    if sass is not None:
        sass.mkdir(parents=True, exist_ok=True)
        os.environ["RELATTN_AOT_SASS"] = str(sass.resolve())  # workers inherit it
    else:
        os.environ.pop("RELATTN_AOT_SASS", None)
    results: dict[str, dict] = {}
    todo = []
    for job in job_list:
        path = folder / (hashlib.sha256(job.key.encode()).hexdigest()[:24] + ".json")
        if path.exists() and sass is None:
            results[job.key] = json.loads(path.read_text())
        else:
            todo.append((job, path))
    if todo:
        os.environ.pop("TRITON_INTERPRET", None)  # workers inherit the environment
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for (job, path), res in zip(
                todo, pool.map(compile_job, [j for j, _ in todo]), strict=True
            ):
                if "error" not in res:
                    path.write_text(json.dumps(res))
                results[job.key] = res
                if progress:
                    progress(f"{res['seconds']:6.1f}s {job.label()}")
    return [{**dataclasses.asdict(j), "label": j.label(), **results[j.key]} for j in job_list]


def problems(results: list[dict], estimate) -> list[str]:
    """What fails the check, one line each; ``estimate`` is the kernels'
    ``shared_memory_estimate`` (pruning's bound, which must hold for every compiled config)."""
    out = []
    for r in results:
        if "error" in r:
            out.append(f"{r['label']}: compile error: {r['error']}")
            continue
        limit = ARCHS[r["arch"]]["smem_block"]
        if r["shared"] > limit:
            out.append(f"{r['label']}: shared memory {r['shared']} B > {limit} B per block")
        if r["config"] is not None:
            block_d = max(16, 1 << (r["head_dim"] - 1).bit_length())
            has_table = dict(r["variant"]).get("HAS_TABLE", True)
            has_band = dict(r["variant"]).get("HAS_BAND", False)
            est = estimate(
                r["kernel"], r["config"], block_d, DTYPES[r["dtype"]], has_table, has_band
            )
            if r["shared"] > est:
                out.append(
                    f"{r['label']}: shared memory {r['shared']} B > pruning's estimate "
                    f"{est} B (update shared_memory_estimate)"
                )
        if r.get("regs") is None:
            out.append(f"{r['label']}: no ptxas -v report")
        spills = (r.get("spill_stores") or 0) + (r.get("spill_loads") or 0)
        # A spill fails where a loop runs it; one outside every loop (a value the epilogue
        # reuses, stored once and loaded once a program) is reported, not failed.
        if r["gated"] and spills and r.get("loop_spills", 1):
            out.append(
                f"{r['label']}: {r['spill_stores']} B spill stores, "
                f"{r['spill_loads']} B spill loads ({r.get('loop_spills', '?')} spill "
                "instructions inside loops)"
            )
    return out


# ----------------------------------------------------------------------------- the SASS gate

GATE_KERNELS = ("attn_fwd", "attn_bwd_dq", "attn_bwd_dkdv")
# What each key loop of a causal kernel is, in program order: masked blocks, the blocks in the
# table's constant tail (one value per tile), the plain unmasked blocks.
_STAGES = {
    ("attn_fwd", "table"): ("masked", "constant", "plain", "masked"),
    # dk/dv walks query blocks downwards: offsets grow, so the constant tail comes last
    ("attn_bwd_dkdv", "table"): ("masked", "plain", "constant", "masked"),
}
_DEFAULT_STAGES = ("masked", "plain", "masked")
M3_LIMIT = 1.15
M3_CONSTANT_LIMIT = 1.02


def _encoding(variant) -> str:
    v = dict(variant)
    enc = "table" if v.get("HAS_TABLE") else ("slopes" if v.get("HAS_SLOPES") else "none")
    if v.get("HAS_TABLE") and v.get("ATOMIC_TABLE"):
        enc += "+atomics"
    token = "+".join(t for t in ("band", "gate") if v.get(f"HAS_{t.upper()}"))
    if token:
        enc = token if enc == "none" else f"{enc}+{token}"
    return enc


# The yardstick's configs: relattn's forward default (like for like) and the tutorial's Hopper
# tile (128 × 64, 8 warps, 3 stages), which relattn's forward also has among its candidates.
YARDSTICK_CONFIGS = ((64, 32, 4, 2), (128, 64, 8, 3))


def gate_jobs() -> list[Job]:
    """sm_90a, bf16, D = 128, causal, no extra mask: each gated kernel in every config pruning
    keeps for that shape (the default first) with a table, with slopes and with no position term
    (dk/dv: the table's gradient by its deterministic path, and by atomics); the token terms'
    variants in the default config; the yardstick (:mod:`yardstick_kernel`) in its configs."""
    K = load_kernels()
    out = []
    for kernel in GATE_KERNELS:
        configs = K.kept_configs(kernel, 128, 2, ARCHS[90]["smem_block"], True)
        for i, config in enumerate(configs):
            for has_table, has_slopes, atomic in (
                (True, False, False),
                (True, False, True),
                (False, True, False),
                (False, False, False),
            ):
                if atomic and kernel != "attn_bwd_dkdv":
                    continue
                v = {"CAUSAL": True, "WINDOW": False, "HAS_DOC": False, "HAS_KPM": False}
                v.update(HAS_TABLE=has_table, HAS_SLOPES=has_slopes)
                if kernel == "attn_bwd_dkdv":
                    v["ATOMIC_TABLE"] = atomic
                out.append(Job(kernel, 90, "bf16", 128, config, tuple(sorted(v.items()))))
            if i == 0:
                for v in token_variants(kernel):
                    out.append(Job(kernel, 90, "bf16", 128, config, tuple(sorted(v.items()))))
    out += [Job(YARDSTICK, 90, "bf16", 128, c, ()) for c in YARDSTICK_CONFIGS]
    return out


def _config_name(config) -> str:
    return "{}×{} w{} s{}".format(*config)


def gate_problems(results: list[dict]) -> tuple[list[str], str]:
    """(what fails M1-M4, one line each; the per-loop table) for :func:`gate_jobs`' results.
    Each loop is compared with the same kernel's loop without a position term in the same
    config, and the forward's with the yardstick's (its unmasked loop, or its diagonal one for
    a masked loop) where the yardstick has that config."""
    key = lambda r: (r["kernel"], tuple(r["config"]), _encoding(r["variant"]))
    by = {key(r): r for r in results}
    bad, rows = (
        [],
        [
            "| kernel | config | term | loop | stage | instructions | per score | ÷ no term (M3) "
            "| ÷ yardstick | cp.async 4 B + ldg (token terms: 4 B ldg) beyond no term "
            "| shared loads | exp2 | atomics | wgmma | spill | registers | gated |",
            "|" + "---|" * 17,
        ],
    )
    for (kernel, config, enc), r in sorted(by.items()):
        if "error" in r or "loops" not in r:
            bad.append(f"{r['label']}: no SASS ({r.get('error', 'not disassembled')})")
            continue
        m, n, warps, _ = r["config"]
        per_thread = m * n // (32 * warps)  # scores each thread holds
        if kernel == YARDSTICK:
            for i, loop in enumerate(r["loops"]):
                stage = ("plain", "masked")[min(i, 1)]
                rows.append(
                    f"| {kernel} | {_config_name(config)} | none | {i} | {stage} | "
                    f"{loop['total']} | {loop['total'] / per_thread:.1f} | – | 1.00 | – | "
                    f"{loop.get('lds', 0)} | {loop.get('ex2', 0)} | "
                    f"{loop.get('atomic', 0)} | {loop.get('wgmma', 0)} | "
                    f"{loop.get('spill', 0)} | {r.get('regs')} | reference |"
                )
            if len(r["loops"]) != 2:
                bad.append(f"{r['label']}: {len(r['loops'])} key loops, expected 2")
            continue
        base = by.get((kernel, config, "none"))
        stages = _STAGES.get((kernel, enc.split("+")[0]), _DEFAULT_STAGES)
        loops = r["loops"]
        if len(loops) != len(stages) or base is None or "loops" not in base:
            bad.append(f"{r['label']}: {len(loops)} key loops, expected {len(stages)}")
            continue
        ys = by.get((YARDSTICK, config, "none")) if kernel == "attn_fwd" else None
        ys_loops = ys.get("loops") if ys else None
        # each loop's counterpart in the no-term kernel: the k-th masked loop the k-th masked
        # one, the constant-run and plain loops its plain loop
        masked = iter(i for i, s in enumerate(_DEFAULT_STAGES) if s == "masked")
        plain = _DEFAULT_STAGES.index("plain")
        base_of = [next(masked) if s == "masked" else plain for s in stages]
        gated = True
        # dk/dv's table gradient by atomics: at most one atomic per offset of a tile (BLOCK_M +
        # BLOCK_N - 1 spread over the threads), none per score (M2); M3 is reported, not gated
        # (the per-tile diagonal sums cost 1.3-1.5x the no-term loop: BENCHMARKS.md).
        atomics = enc == "table+atomics"
        allowed = -(-(m + n - 1) // (32 * warps)) if atomics else 0
        # The token terms read vectors per tile (P's span as aligned 16-byte loads, fk per key
        # block): M1 counts their 4-byte loads only, and M3 is reported, not gated (the band
        # adds a dot and a gather per tile by design).
        token = "band" in enc or "gate" in enc
        loads = ("cp_async_4", "ldg_4") if token else ("cp_async_4", "ldg")
        # The backward kernels' no-term loop merges the row's -lse·log2 e into the scale's
        # FFMA; with a term, that add is its own FADD a score (folding it into the term would
        # round each score differently from the forward and the other backward kernels, whose
        # p must agree bit for bit), so M3 holds their loops to the no-term loop plus one
        # instruction per score a thread holds.
        allowance = per_thread if kernel in ("attn_bwd_dq", "attn_bwd_dkdv") else 0
        for i, (loop, stage) in enumerate(zip(loops, stages, strict=True)):
            ref = base["loops"][base_of[i]]
            ratio = loop["total"] / ref["total"]
            judged = loop["total"] / (ref["total"] + allowance)
            extra = sum(loop.get(k, 0) - ref.get(k, 0) for k in loads)
            label = f"{kernel} {_config_name(config)} {enc} loop {i} ({stage})"
            if gated and enc != "none":
                if extra > per_thread // 4:  # M1
                    bad.append(
                        f"M1 {label}: {extra} 4-byte cp.async / global loads beyond the "
                        f"no-term loop, {per_thread} scores per thread"
                    )
                limit = M3_CONSTANT_LIMIT if stage == "constant" else M3_LIMIT
                if judged > limit and not token and not atomics:  # M3
                    bad.append(
                        f"M3 {label}: {judged:.3f}× the no-term loop's instructions"
                        + (f" + {allowance}" if allowance else "")
                        + f" (limit {limit})"
                    )
            if gated and loop.get("atomic", 0) > allowed:  # M2
                bad.append(f"M2 {label}: {loop['atomic']} atomics (at most {allowed})")
            if kernel != "attn_bwd_dkdv" and not loop.get("wgmma", 0):  # M4
                bad.append(f"M4 {label}: no wgmma")
            if kernel != "attn_bwd_dkdv" and r.get("wgmma_serialized"):  # M4
                bad.append(f"M4 {label}: ptxas serializes its wgmma (C7515)")
            vs = "–"
            if ys_loops and len(ys_loops) == 2:
                vs = f"{loop['total'] / ys_loops[1 if stage == 'masked' else 0]['total']:.2f}"
            rows.append(
                f"| {kernel} | {_config_name(config)} | {enc} | {i} | {stage} | {loop['total']} | "
                f"{loop['total'] / per_thread:.1f} | {ratio:.2f}"
                + (f" ({judged:.2f})" if allowance and enc != "none" else "")
                + f" | {vs} | {extra} | {loop.get('lds', 0)} | {loop.get('ex2', 0)} | "
                f"{loop.get('atomic', 0)} | {loop.get('wgmma', 0)} | {loop.get('spill', 0)} | "
                f"{r.get('regs')} | "
                f"{'M1, M2, M4' if token else ('M1, M2' if atomics else 'yes')} |"
            )
    return bad, "\n".join(rows)


def _tile_shares(n: int, bm: int, bn: int, tail: int | None) -> dict[str, float]:
    """Shares of a causal N × N forward's tiles (BM × BN) that run each key loop: "masked" (cut
    by the diagonal), "constant" (every offset >= ``tail``, the table's constant run) and
    "plain" (the rest)."""
    counts = {"masked": 0, "constant": 0, "plain": 0}
    for i in range(n // bm):
        r0, r1 = i * bm, i * bm + bm - 1
        for j in range(min(n // bn, r1 // bn + 1)):
            c0, c1 = j * bn, j * bn + bn - 1
            if c1 > r0:
                counts["masked"] += c0 <= r1
            elif tail is not None and r0 - c1 >= tail:
                counts["constant"] += 1
            else:
                counts["plain"] += 1
    total = sum(counts.values())
    return {k: v / total for k, v in counts.items()}


def predictions(results: list[dict], tails: dict[str, int | None], ns=(1024, 8192, 16384)) -> str:
    """Predicted forward time ÷ the yardstick's, from the per-loop instruction counts weighted
    by the share of tiles each loop runs (causal, N × N), in the tutorial's tile (128 × 64,
    8 warps, 3 stages); ``tails``: encoding name -> the offset where its table's constant run
    starts (None: no constant run), per gated term (table, slopes, none). A proxy for time
    that holds where a loop's issue rate, not memory, bounds it."""
    cfg = YARDSTICK_CONFIGS[1]
    loops = {(r["kernel"], _encoding(r["variant"])): r.get("loops") for r in results
             if tuple(r["config"]) == cfg and "error" not in r}  # fmt: skip
    ys = loops.get((YARDSTICK, "none"))
    if not ys or len(ys) != 2:
        return ""
    rows = ["| encoding | " + " | ".join(f"N = {n}: ÷ yardstick (tiles const/plain/masked)"
                                          for n in ns) + " |",
            "|---|" + "---|" * len(ns)]  # fmt: skip
    for name, (enc, tail) in tails.items():
        fl = loops.get(("attn_fwd", enc))
        if not fl:
            continue
        stages = _STAGES.get(("attn_fwd", enc), _DEFAULT_STAGES)
        cost = {}
        for stage, loop in zip(stages, fl, strict=True):
            cost.setdefault(stage, loop["total"])  # the first masked loop for "masked"
        cells = []
        for n in ns:
            share = _tile_shares(n, cfg[0], cfg[1], tail if "constant" in cost else None)
            mine = sum(share[k] * cost.get(k, cost["plain"]) for k in share)
            ref = (share["constant"] + share["plain"]) * ys[0]["total"] + share["masked"] * ys[1][
                "total"
            ]
            cells.append(
                f"{mine / ref:.2f} ({share['constant']:.0%}/{share['plain']:.0%}/"
                f"{share['masked']:.0%})"
            )
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _encoding_tails() -> dict[str, tuple[str, int | None]]:
    """The encodings the predictions weigh: T5Bias(16)'s constant run (from relattn, when it
    imports here), a table that varies everywhere (KERPLE), closed-form slopes, no term."""
    out: dict[str, tuple[str, int | None]] = {}
    try:
        sys.path.insert(0, str(KERNEL_FILE.parents[2]))
        from relattn.pe import T5Bias

        table = T5Bias(16).table(0, 4095)[0]  # offsets 0..4095, head 0
        last = table[-1]
        start = len(table)
        while start > 0 and bool(table[start - 1] == last):
            start -= 1
        out["T5Bias(16), learnable table"] = ("table", start)
    except Exception:  # noqa: BLE001  (no torch here: the other rows still stand)
        pass
    out["KERPLE (a table that varies at every offset)"] = ("table", None)
    out["closed-form ALiBi"] = ("slopes", None)
    out["no position term"] = ("none", None)
    return out


def variant_name(variant) -> str:
    """``table causal``, ``slopes+masks bidir``, ``table causal det`` (no atomics), ..."""
    v = dict(variant)
    if "CAUSAL" not in v:
        return "-"
    enc = "table" if v.get("HAS_TABLE", True) else ("slopes" if v.get("HAS_SLOPES") else "none")
    token = "+".join(t for t in ("band", "gate") if v.get(f"HAS_{t.upper()}"))
    if token:
        enc = token if enc == "none" else f"{enc}+{token}"
    masks = "+masks" if v.get("WINDOW") else ""
    det = " det" if v.get("ATOMIC_TABLE") is False and v.get("HAS_TABLE") else ""
    return f"{enc}{masks} {'causal' if v['CAUSAL'] else 'bidir'}{det}"


def table(results: list[dict]) -> str:
    """The resource table: kernel × arch × dtype × D × config × variant."""
    head = (
        "| kernel | arch | dtype | D | BLOCK_M×BLOCK_N, warps, stages | variant | registers "
        "| spills (B) | shared (KiB) | occupancy |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in results:
        if "error" in r:
            continue
        cfg = "-" if r["config"] is None else "{}×{}, {}, {}".format(*r["config"])
        spills = (r.get("spill_stores") or 0) + (r.get("spill_loads") or 0)
        lines.append(
            f"| {r['kernel']} | sm_{r['arch']} | {r['dtype']} | {r['head_dim']} | {cfg} | "
            f"{variant_name(r['variant'])} | {r.get('regs')} | {spills} | "
            f"{r['shared'] / 1024:.0f} | {r.get('occupancy', 0):.0%} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ci", action="store_true", help="the representative subset")
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--only", help="regular expression on the job label")
    parser.add_argument("--table", help="write the Markdown resource table here")
    parser.add_argument("--json", help="write every job's result here")
    parser.add_argument("--sass", type=Path, help="also write each job's SASS into this folder")
    parser.add_argument("--gate", action="store_true", help="the offline gate on the key loops")
    args = parser.parse_args(argv)
    say = lambda line: print(line, file=sys.stderr, flush=True)
    if args.gate:
        with tempfile.TemporaryDirectory() as tmp:
            results = run(gate_jobs(), args.jobs, progress=say, sass=args.sass or Path(tmp))
        bad, text = gate_problems(results)
        print(text)
        predicted = predictions(results, _encoding_tails())
        if predicted:
            print("\nPredicted forward time ÷ the yardstick's (instructions per tile class):\n")
            print(predicted)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
        for line in bad:
            say("FAIL " + line)
        return 1 if bad else 0
    job_list = jobs(full=not args.ci)
    if args.only:
        job_list = [j for j in job_list if re.search(args.only, j.label())]
    start = time.perf_counter()
    results = run(job_list, args.jobs, progress=say, sass=args.sass)
    import triton

    say(f"{len(results)} jobs in {time.perf_counter() - start:.1f}s (triton {triton.__version__})")
    text = table(results)
    if args.table:
        Path(args.table).write_text(text + "\n")
    else:
        print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    bad = problems(results, load_kernels().shared_memory_estimate)
    for line in bad:
        say("FAIL " + line)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
