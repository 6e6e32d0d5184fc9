"""The GPU tools' plumbing, checked without a GPU: `make gpu-check`'s steps and report
(tools/gpu_check.py) and benchmarks/triton_configs.py's refusal without CUDA."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_steps_name_existing_test_files():
    steps = _gpu_check().TEST_STEPS
    files = [a for args in steps.values() for a in args if a.startswith("tests/")]
    assert files, "no test files in the GPU check"
    for f in files:
        assert (ROOT / f).is_file(), f
    # The conformance suite, the Triton suites and the GPU-only cases are all in it.
    for must in ("tests/test_conformance.py", "tests/test_triton.py", "tests/test_triton_gpu.py"):
        assert must in files


def test_gpu_check_counts_and_summary(tmp_path):
    gc = _gpu_check()
    xml = tmp_path / "step.xml"
    xml.write_text(
        '<testsuites><testsuite tests="10" failures="2" errors="1" skipped="3"/></testsuites>'
    )
    assert gc._junit_counts(xml) == {"passed": 4, "failed": 3, "skipped": 3}
    assert gc._junit_counts(tmp_path / "missing.xml") == {}
    res = gc.run_step("a step", [sys.executable, "-c", "print('hi')"], tmp_path, 30, {}, tmp_path)
    assert res["rc"] == 0 and (tmp_path / res["log"]).read_text().endswith("hi\n")
    slow = gc.run_step(
        "slow", [sys.executable, "-c", "import time; time.sleep(5)"], tmp_path, 0.5, {}, tmp_path
    )
    assert slow["rc"] == "timeout"
    text = gc.summary([res, slow], "a GPU", None)
    assert "| a step | pass |" in text and "| slow | FAIL (timeout) |" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the sweep would run")
def test_triton_configs_needs_cuda():
    script = ROOT / "benchmarks" / "triton_configs.py"
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert res.returncode == 2
    assert "needs a CUDA GPU" in res.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the benchmark would run")
def test_gpu_benchmark_script_is_relattn_bench():
    """benchmarks/gpu_attention.py takes relattn bench's flags (one benchmark front end);
    without CUDA it says so in one line."""
    script = ROOT / "benchmarks" / "gpu_attention.py"
    help_text = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True
    ).stdout
    assert "relattn bench" in help_text and "--check" in help_text
    res = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "relattn: error: --device gpu needs CUDA; torch.cuda.is_available() is False here"
    ]


def test_gpu_check_budget_shares():
    """Each benchmark step has its own share of the budget (a slow step cannot eat the
    others'); the shares before the last (which takes what is left) fit in the budget."""
    gc = _gpu_check()
    steps = gc.bench_steps(Path("out"), Path("junit"), Path("out/bench.md"))
    names = [s["name"] for s in steps]
    assert names[0] == "benchmark" and {"TMA vs pointers", "hf models", "tile sweep"} <= set(names)
    assert gc.TEST_SHARE + sum(s["share"] for s in steps[:-1]) <= 1.0
    for step in steps:
        script = next(a for a in step["cmd"] if a.startswith("benchmarks/"))
        assert (ROOT / script).is_file(), script


def test_tma_benchmark_runs_in_the_interpreter(tmp_path):
    """benchmarks/gpu_tma.py end to end on tiny shapes (its --smoke mode): both paths of every
    encoding and the table; on a GPU it times the targets' shape."""
    out = tmp_path / "tma.md"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_tma.py"), "--smoke", "--ns", "32",
           "--repeats", "1", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| 32 |")]
    assert [r.split(" | ")[1] for r in rows] == ["t5", "kerple", "alibi"]
    assert all("–" not in r for r in rows), rows  # every contender ran
