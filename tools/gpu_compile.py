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
D = 128 without extra masks (every kernel and every config that autotuning may pick). Results are
cached per job, keyed on the kernel source and the triton version, under ``$RELATTN_AOT_CACHE``
(default ``~/.cache/relattn/triton-aot``).
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
    **dict.fromkeys(["Lse", "Delta", "DeltaOut", "Inv", "Table", "DTable", "Slopes"], "fp32"),
    **dict.fromkeys(["Partial", "PartialOut", "PartialLse"], "fp32"),
    **dict.fromkeys(["DocStart", "DocEnd", "KvBounds", "TableEnds"], "i32"),
    "Kpm": "u8",
}
FLOATS = {"qk_scale", "scale"}
LAUNCH_OPTIONS = {"num_warps", "num_stages"}
# Integer arguments that are multiples of 16 in a typical call (contiguous (B, H, N, D) tensors
# with D and N multiples of 16); Triton's launcher gives them the same divisibility hint.
DIVISIBLE = re.compile(r"^(stride_\w+|Nq|Nk)$")


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


def load_kernels() -> ModuleType:
    """The kernel module in compiled mode (never the interpreter's), without importing torch."""
    os.environ.pop("TRITON_INTERPRET", None)
    import triton

    triton.knobs.runtime.interpret = False
    name = "relattn_triton_kernels_aot"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, KERNEL_FILE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _variants(kernel: str) -> list[dict]:
    """Compile-time variants; the first is the one the targets use (a table, causal, no other
    mask), the second the heaviest (a table and every mask)."""
    if kernel in ("bwd_preprocess", "table_ends"):
        return [{}]
    masks = [{"WINDOW": w, "HAS_DOC": w, "HAS_KPM": w} for w in (False, True)]
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
    return out


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
                    for i, v in enumerate(chosen):
                        has_table = v.get("HAS_TABLE", True)
                        limit = ARCHS[arch]["smem_block"]
                        configs = K.kept_configs(kernel, d, elt, limit, has_table)
                        if not full or i >= 2:
                            configs = configs[:1]
                        masks = v.get("WINDOW") or v.get("HAS_DOC") or v.get("HAS_KPM")
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


def compile_job(job: Job) -> dict:
    """Compile one job (in a worker process) and return its resources, or its error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    K = load_kernels()
    fn = getattr(K, job.kernel)
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
    h.update(triton.__version__.encode())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "relattn" / "triton-aot"
    return Path(os.environ.get("RELATTN_AOT_CACHE", default)) / cache_key()


def run(job_list: list[Job], workers: int, progress=None) -> list[dict]:
    """Every job's result, from the cache or compiled in ``workers`` processes."""
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    todo = []
    for job in job_list:
        path = folder / (hashlib.sha256(job.key.encode()).hexdigest()[:24] + ".json")
        if path.exists():
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
            est = estimate(r["kernel"], r["config"], block_d, DTYPES[r["dtype"]], has_table)
            if r["shared"] > est:
                out.append(
                    f"{r['label']}: shared memory {r['shared']} B > pruning's estimate "
                    f"{est} B (update shared_memory_estimate)"
                )
        if r.get("regs") is None:
            out.append(f"{r['label']}: no ptxas -v report")
        spills = (r.get("spill_stores") or 0) + (r.get("spill_loads") or 0)
        if r["gated"] and spills:
            out.append(
                f"{r['label']}: {r['spill_stores']} B spill stores, "
                f"{r['spill_loads']} B spill loads"
            )
    return out


def variant_name(variant) -> str:
    """``table causal``, ``slopes+masks bidir``, ``table causal det`` (no atomics), ..."""
    v = dict(variant)
    if "CAUSAL" not in v:
        return "-"
    enc = "table" if v.get("HAS_TABLE", True) else ("slopes" if v.get("HAS_SLOPES") else "none")
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
    args = parser.parse_args(argv)
    job_list = jobs(full=not args.ci)
    if args.only:
        job_list = [j for j in job_list if re.search(args.only, j.label())]
    start = time.perf_counter()
    say = lambda line: print(line, file=sys.stderr, flush=True)
    results = run(job_list, args.jobs, progress=say)
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
