"""The whole GPU check in one command, for a machine with a CUDA GPU (`make gpu-check`).

Offline and with the machine's own Python (torch with CUDA, triton, pytest, hypothesis): nothing is
installed, ``src/`` goes on ``PYTHONPATH``. It runs, with CUDA tensors, the conformance suite and
the Triton suites (including the GPU-only cases of ``tests/test_triton_gpu.py``: N up to 16k,
D = 128, every kept autotune config, torch.compile, deterministic mode, chunked on CUDA), the
layer, cache and model tests, and then ``benchmarks/gpu_attention.py --check`` and the band's
``benchmarks/gpu_token.py``. Test steps run in
parallel processes (each compiles its own kernels); the benchmark runs alone afterwards.

Logs, the benchmark's tables and ``summary.md`` go to ``$OUT`` when it is set, else to
``./gpu-check/`` (JUnit XML to a temporary folder). Exit status 0 only when every step passed.

    python3 tools/gpu_check.py [--out DIR] [--skip-bench] [--budget SECONDS]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Seconds of the budget left to benchmarks/gpu_token.py (one shape: FlexAttention's compile with
# r and P captured takes most of it).
TOKEN_BENCH_SECONDS = 120

# name: pytest arguments. Autotuning is off in the test steps (each distinct variant would
# otherwise compile every candidate config); test_every_kept_config covers the configs. The
# conformance suite runs its CUDA cases only (CI runs the CPU ones); the steps run at once, each
# with its own pytest-xdist workers (the GPU machines have 16 cores), sharing Triton's disk cache.
TEST_STEPS = {
    "gpu-only cases": ["-n", "2", "tests/test_triton_gpu.py", "-m", "gpu"],
    "conformance on cuda": ["-n", "6", "-k", "cuda", "tests/test_conformance.py"],
    "triton suites": [
        "-n",
        "4",
        "tests/test_triton.py",
        "tests/test_triton_precision.py",
        "tests/test_triton_decode.py",
        "tests/test_triton_token.py",
        "tests/test_validation.py",
    ],
    "layers, cache, models": [
        "-n",
        "2",
        "tests/test_nn.py",
        "tests/test_cache.py",
        "tests/test_models.py",
    ],
}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(ROOT / "src"), env.get("PYTHONPATH")] if p)
    env.pop("TRITON_INTERPRET", None)
    env["RELATTN_TRITON_AUTOTUNE"] = "0"
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


def _junit_counts(path: Path) -> dict[str, int]:
    if not path.exists():
        return {}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    total = lambda key: sum(int(s.get(key, 0)) for s in suites)
    tests, failures, errors, skipped = (
        total(k) for k in ("tests", "failures", "errors", "skipped")
    )
    return {
        "passed": tests - failures - errors - skipped,
        "failed": failures + errors,
        "skipped": skipped,
    }


def run_step(name: str, cmd: list[str], out: Path, timeout: float, env: dict, junit: Path) -> dict:
    slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")
    log = out / f"{slug}.log"
    start = time.perf_counter()
    with log.open("w") as f:
        f.write("$ " + " ".join(cmd) + "\n\n")
        f.flush()
        try:
            rc = subprocess.run(
                cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\n[gpu-check] step timed out after {timeout:.0f}s\n")
            rc = "timeout"
    result = {"step": name, "rc": rc, "seconds": time.perf_counter() - start, "log": log.name}
    result.update(_junit_counts(junit / f"{slug}.xml"))
    return result


def machine(env: dict) -> str:
    code = (
        "import torch, triton, platform; p = torch.cuda.get_device_properties(0); "
        "print(f'{p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, "
        "{p.multi_processor_count} SMs; torch {torch.__version__} (CUDA {torch.version.cuda}), "
        "triton {triton.__version__}, Python {platform.python_version()}')"
    )
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    return res.stdout.strip() or f"(could not query the GPU: {res.stderr.strip()[-300:]})"


def summary(results: list[dict], info: str, bench: Path | None) -> str:
    lines = [
        "# relattn GPU check",
        "",
        f"Machine: {info}",
        "",
        "| step | result | passed | failed | skipped | seconds | log |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ok = "pass" if r["rc"] == 0 else f"FAIL ({r['rc']})"
        lines.append(
            f"| {r['step']} | {ok} | {r.get('passed', '')} | {r.get('failed', '')} | "
            f"{r.get('skipped', '')} | {r['seconds']:.0f} | {r['log']} |"
        )
    if bench is not None and bench.exists():
        lines += ["", "## Benchmark", "", bench.read_text()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu-check")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--budget", type=float, default=570, help="seconds for everything")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = _env()
    # JUnit files stay out of $OUT: the device tool brings back at most 8 files (the step logs,
    # the benchmark's log, table and JSON, and summary.md).
    junit = Path(tempfile.mkdtemp(prefix="relattn-gpu-check-"))
    begin = time.perf_counter()
    info = machine(env)
    print(f"[gpu-check] {info}\n[gpu-check] results in {out}", flush=True)

    # Tests get 55% of the budget, in parallel; the benchmark gets what is left.
    test_timeout = 0.55 * args.budget
    jobs = []
    for name, files in TEST_STEPS.items():
        slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-v",  # one line per test: a step cut off by its timeout still names its failures
            "-ra",
            "-p",
            "no:cacheprovider",
            f"--junitxml={junit / (slug + '.xml')}",
            *files,
        ]
        jobs.append((name, cmd))
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(run_step, n, c, out, test_timeout, env, junit) for n, c in jobs]
        results = [f.result() for f in futures]
    for r in results:
        print(f"[gpu-check] {r['step']}: rc={r['rc']} in {r['seconds']:.0f}s", flush=True)

    bench_md = None
    if not args.skip_bench:
        left = args.budget - (time.perf_counter() - begin)
        bench_md = out / "gpu-benchmark.md"
        cmd = [
            sys.executable,
            "benchmarks/gpu_attention.py",
            "--check",
            "--out",
            str(bench_md),
            "--json",
            str(out / "gpu-benchmark.json"),
        ]
        bench_env = {k: v for k, v in env.items() if k != "RELATTN_TRITON_AUTOTUNE"}
        # The band benchmark (issue 24) keeps TOKEN_BENCH_SECONDS of the budget for itself.
        r = run_step("benchmark", cmd, out, max(left - TOKEN_BENCH_SECONDS, 60), bench_env, junit)
        print(f"[gpu-check] benchmark: rc={r['rc']} in {r['seconds']:.0f}s", flush=True)
        results.append(r)
        # Its log stays beside the JUnit files and its table joins gpu-benchmark.md: $OUT keeps
        # to the 8 files the device tool brings back.
        token_md = junit / "gpu-token.md"
        cmd = [sys.executable, "benchmarks/gpu_token.py", "--out", str(token_md)]
        left = args.budget - (time.perf_counter() - begin)
        r = run_step("band benchmark", cmd, junit, max(left, 60), bench_env, junit)
        print(f"[gpu-check] band benchmark: rc={r['rc']} in {r['seconds']:.0f}s", flush=True)
        if token_md.exists():
            text = token_md.read_text()
        else:  # its log's tail says why
            text = "(no table)\n\n```\n" + (junit / r["log"]).read_text()[-3000:] + "\n```\n"
        with bench_md.open("a") as f:
            f.write("\n## Band (query-conditioned bias, benchmarks/gpu_token.py)\n\n" + text)
        results.append(r)

    text = summary(results, info, bench_md)
    (out / "summary.md").write_text(text)
    print(text)
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
