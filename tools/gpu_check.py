"""The whole GPU check in one command, for a machine with a CUDA GPU (`make gpu-check`).

Offline and with the machine's own Python (torch with CUDA, triton, pytest, hypothesis): nothing is
installed, ``src/`` goes on ``PYTHONPATH``. It runs, with CUDA tensors, the conformance suite and
the Triton suites (including the GPU-only cases of ``tests/test_triton_gpu.py``: N up to 16k,
D = 128, every kept autotune config, torch.compile, deterministic mode, chunked on CUDA), the
layer, cache and model tests, and then, one at a time, the benchmark steps of
:func:`bench_steps`: ``benchmarks/gpu_attention.py --check`` (the targets), ``gpu_tma.py``
(tensor descriptors against pointers), the band's ``gpu_token.py``, ``hf_models.py --device
cuda`` (BLOOM-560m) and ``triton_configs.py`` (the tile sweep), each with its own share of the
budget. Test steps run in parallel processes (each compiles its own kernels).

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
# Shares of the budget: the test steps together (in parallel), then each benchmark step in
# order (bench_steps); a step gets its share or what is left, and none starts with less than
# MIN_STEP_SECONDS.
TEST_SHARE = 0.45
MIN_STEP_SECONDS = 30


def bench_steps(out: Path, junit: Path, bench_md: Path) -> list[dict]:
    """The benchmark steps in order of importance: name, command, share of the budget, and the
    Markdown table (with its title) each appends to ``bench_md`` (the first writes it)."""
    py = sys.executable
    return [
        {  # the targets: relattn, FlexAttention and SDPA in one run
            "name": "benchmark",
            "cmd": [py, "benchmarks/gpu_attention.py", "--check", "--out", str(bench_md),
                    "--json", str(out / "gpu-benchmark.json")],
            "share": 0.2,
        },
        {  # what issue 21's tensor descriptors buy: the same kernels with and without them
            "name": "TMA vs pointers",
            "cmd": [py, "benchmarks/gpu_tma.py", "--out", str(junit / "gpu-tma.md")],
            "share": 0.12,
            "table": junit / "gpu-tma.md",
            "title": "Tensor descriptors against pointers (benchmarks/gpu_tma.py)",
        },
        {  # the query-conditioned band (FlexAttention's compile with r and P takes most)
            "name": "band benchmark",
            "cmd": [py, "benchmarks/gpu_token.py", "--out", str(junit / "gpu-token.md")],
            "share": 0.12,
            "table": junit / "gpu-token.md",
            "title": "Band (query-conditioned bias, benchmarks/gpu_token.py)",
        },
        {  # issue 13's remaining target: BLOOM-560m's training step against eager, >= 2x
            "name": "hf models",
            "cmd": [py, "benchmarks/hf_models.py", "--device", "cuda", "--models", "bloom",
                    "--ns", "2048", "--out", str(junit / "gpu-hf.md")],
            "share": 0.08,
            "table": junit / "gpu-hf.md",
            "title": "Hugging Face BLOOM-560m training step (benchmarks/hf_models.py)",
        },
        {  # every tile config of the three kernels at the targets' shape
            "name": "tile sweep",
            "cmd": [py, "benchmarks/triton_configs.py", "--out", str(junit / "gpu-tiles.md")],
            "share": 1.0,  # what is left
            "table": junit / "gpu-tiles.md",
            "title": "Tile configs (benchmarks/triton_configs.py)",
        },
    ]  # fmt: skip


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
        "tests/test_triton_tma.py",
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

    # Tests get TEST_SHARE of the budget, in parallel; each benchmark step then gets its own
    # share (BENCH_STEPS), capped by what is left, so a slow step cannot eat the others'.
    test_timeout = TEST_SHARE * args.budget
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
        bench_md = out / "gpu-benchmark.md"
        bench_env = {k: v for k, v in env.items() if k != "RELATTN_TRITON_AUTOTUNE"}
        for step in bench_steps(out, junit, bench_md):
            left = args.budget - (time.perf_counter() - begin)
            budget = min(step["share"] * args.budget, left)
            if budget < MIN_STEP_SECONDS:
                r = {"step": step["name"], "rc": "no time left", "seconds": 0.0, "log": "-"}
            else:
                # Logs of the appended steps stay beside the JUnit files: $OUT keeps to the
                # 8 files the device tool brings back.
                where = out if step["name"] == "benchmark" else junit
                r = run_step(step["name"], step["cmd"], where, budget, bench_env, junit)
            print(f"[gpu-check] {r['step']}: rc={r['rc']} in {r['seconds']:.0f}s", flush=True)
            results.append(r)
            table = step.get("table")
            if table is None:
                continue
            if table.exists():
                text = table.read_text()
            elif r["log"] != "-":  # its log's tail says why
                text = "(no table)\n\n```\n" + (junit / r["log"]).read_text()[-3000:] + "\n```\n"
            else:
                text = "(not run: no time left in the budget)\n"
            with bench_md.open("a") as f:
                f.write(f"\n## {step['title']}\n\n" + text)

    text = summary(results, info, bench_md)
    (out / "summary.md").write_text(text)
    print(text)
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
