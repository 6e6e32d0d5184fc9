"""The Triton kernels compile for A100 (sm_80) and H100 (sm_90a) without a GPU.

``tools/gpu_compile.py --ci`` compiles every kernel (forward, the dq preprocessing, dq, dk/dv, the
deterministic table-gradient bands) for both architectures at bf16, D = 128 with the config that
pruning keeps first, using the ``ptxas`` in the triton wheel, and fails on a compile error, on
shared memory above the architecture's limit or above pruning's estimate, and on register spills.
`make gpu-compile` runs the full matrix (every kept config, dtype, head dim and compile-time
variant). Compiled results are cached per job, keyed on the kernel source and triton's version.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from relattn.backends import triton_kernels as K  # noqa: E402  (pure config functions)

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "gpu_compile.py"


def _tool():
    """tools/gpu_compile.py as a module (its pure functions; compiling runs in a subprocess)."""
    if "gpu_compile" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_compile", TOOL)
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_compile"] = module
        spec.loader.exec_module(module)
    return sys.modules["gpu_compile"]


def test_every_kernel_compiles_for_a100_and_h100(tmp_path):
    """The CI subset; a separate process because this one may have decorated the kernels for
    Triton's interpreter."""
    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    cmd = [sys.executable, str(TOOL), "--ci", "-j", "2", "--json", str(out)]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    failures = [line for line in res.stderr.splitlines() if line.startswith("FAIL")]
    assert res.returncode == 0, "\n".join(failures) or res.stderr[-3000:]
    results = json.loads(out.read_text())
    tool = _tool()
    kernels = set(K.AOT_KERNELS)
    compiled = {(r["kernel"], r["arch"]) for r in results if "error" not in r}
    assert compiled == {(k, a) for k in kernels for a in tool.ARCHS}
    assert all(r["regs"] and r["regs"] <= 255 for r in results)
    # the token terms' variants: the band and the gate of every kernel that computes them
    token = {
        (r["kernel"], r["arch"], term)
        for r in results
        for term in ("HAS_BAND", "HAS_GATE")
        if dict(r["variant"]).get(term) and "error" not in r
    }
    assert token == {
        (k, a, t) for k in tool.TOKEN_KERNELS for a in tool.ARCHS for t in ("HAS_BAND", "HAS_GATE")
    }


def test_problems_are_reported():
    """The check fails on each kind of problem (it can fail)."""
    tool = _tool()
    problems = lambda results: tool.problems(results, K.shared_memory_estimate)
    base = {
        "label": "k",
        "kernel": "attn_fwd",
        "arch": 80,
        "dtype": "bf16",
        "head_dim": 128,
        "config": [64, 32, 4, 3],
        "variant": [["HAS_TABLE", True]],
        "gated": True,
        "regs": 200,
        "spill_stores": 0,
        "spill_loads": 0,
        "shared": 1024,
    }
    assert problems([base]) == []
    assert "compile error" in problems([{**base, "error": "x"}])[0]
    assert "per block" in " ".join(problems([{**base, "shared": 200 * 1024}]))
    assert "estimate" in " ".join(problems([{**base, "shared": 150 * 1024}]))
    assert "spill" in problems([{**base, "spill_stores": 4}])[0]
    assert "spill" in problems([{**base, "spill_stores": 4, "loop_spills": 2}])[0]
    assert problems([{**base, "spill_stores": 4, "gated": False}]) == []
    # a spill outside every loop (stored once, loaded once a program) is reported only
    assert problems([{**base, "spill_stores": 4, "spill_loads": 4, "loop_spills": 0}]) == []


def test_sass_gate_on_the_key_loops(tmp_path):
    """The offline gate (issue 21's M1-M4) on the sm_90a SASS of the forward, dq and dk/dv key
    loops: no per-score table loads, no atomics, at most 15 % more instructions than the loop
    without a position term, wgmma in the forward and dq; one SASS file per job, named."""
    out, sass = tmp_path / "gate.json", tmp_path / "sass"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    cmd = [sys.executable, str(TOOL), "--gate", "-j", "2", "--json", str(out), "--sass", str(sass)]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    failures = [line for line in res.stderr.splitlines() if line.startswith("FAIL")]
    assert res.returncode == 0, "\n".join(failures) or res.stderr[-3000:]
    assert "| attn_fwd | 64×32 w4 s2 | table | 2 | plain |" in res.stdout
    results = json.loads(out.read_text())
    assert {r["kernel"] for r in results} == {*_tool().GATE_KERNELS, _tool().YARDSTICK}
    assert all(r["loops"] for r in results)
    names = {p.name for p in sass.iterdir()}
    assert "attn_fwd-sm_90a-table-bf16-d128-64x32-w4-s2.sass" in names
    assert "attn_bwd_dkdv-sm_90a-table-det-bf16-d128-32x32-w4-s2.sass" in names
    assert "yardstick_fwd-sm_90a-none-bf16-d128-128x64-w8-s3.sass" in names
    assert {n.split("-sm_90a-")[1].split("-")[0] for n in names} == {
        "table", "slopes", "none", "band", "gate",
    }  # fmt: skip
    # the token terms' key loops: no 4-byte per-score loads, no atomics (gated), counts reported
    for enc in ("band", "gate"):
        for kernel in _tool().GATE_KERNELS:
            assert f" | {enc} | 1 | plain |" in res.stdout, (kernel, enc)
    # every autotune candidate of the targets' shape is gated, the yardstick is compiled and the
    # forward's loops are compared with it
    for kernel in _tool().GATE_KERNELS:
        kept = K.kept_configs(kernel, 128, 2, _tool().ARCHS[90]["smem_block"], True)
        got = {tuple(r["config"]) for r in results if r["kernel"] == kernel}
        assert got == set(kept), kernel
    ys = [r for r in results if r["kernel"] == _tool().YARDSTICK]
    assert {tuple(r["config"]) for r in ys} == set(_tool().YARDSTICK_CONFIGS)
    assert all(len(r["loops"]) == 2 and r["loops"][0]["wgmma"] for r in ys)
    assert "| yardstick_fwd | 128×64 w8 s3 | none | 0 | plain |" in res.stdout
    # the predicted forward time against the yardstick's, per encoding
    assert "| T5Bias(16), learnable table | " in res.stdout


def test_gate_catches_each_rule():
    """gate_problems fails each of M1-M4 (it can fail), from per-loop counts."""
    tool = _tool()

    def result(kernel, variant, loops, config=(64, 32, 4, 2)):
        v = {"CAUSAL": True, **variant}
        return {"label": f"{kernel} {v}", "kernel": kernel, "config": list(config),
                "variant": sorted(v.items()), "loops": loops}  # fmt: skip

    none = [{"total": 100, "wgmma": 10}, {"total": 80, "wgmma": 10}, {"total": 100, "wgmma": 10}]
    # masked, constant run, plain, masked
    table = [dict(none[0]), {"total": 80, "wgmma": 10}, dict(none[1]), dict(none[2])]
    ok = [result("attn_fwd", {"HAS_TABLE": False}, none),
          result("attn_fwd", {"HAS_TABLE": True}, table)]  # fmt: skip
    assert tool.gate_problems(ok)[0] == []

    def fails(change):
        loops = [dict(x) for x in table]
        loops[2].update(change)
        bad, _ = tool.gate_problems([ok[0], result("attn_fwd", {"HAS_TABLE": True}, loops)])
        return " ".join(bad)

    assert fails({"cp_async_4": 16}).startswith("M1")  # a load per score (16 per thread)
    assert fails({"atomic": 8}).startswith("M2")
    assert fails({"total": 93}).startswith("M3")  # 1.16x the plain loop
    assert fails({"wgmma": 0}).startswith("M4")
    serialized = {**result("attn_fwd", {"HAS_TABLE": True}, table), "wgmma_serialized": True}
    assert tool.gate_problems([ok[0], serialized])[0][0].startswith("M4")
    constant = [dict(x) for x in table]
    constant[1]["total"] = 82  # the constant-run loop: 2.5 % more
    assert (
        "M3" in tool.gate_problems([ok[0], result("attn_fwd", {"HAS_TABLE": True}, constant)])[0][0]
    )
    assert "expected 4" in " ".join(
        tool.gate_problems([ok[0], result("attn_fwd", {"HAS_TABLE": True}, none)])[0]
    )
    # the forward's loops against the yardstick's in the same config (plain: its unmasked
    # loop, masked: its diagonal one), reported
    ys = {"label": "ys", "kernel": tool.YARDSTICK, "config": [64, 32, 4, 2], "variant": [],
          "loops": [{"total": 40, "wgmma": 10}, {"total": 50, "wgmma": 10}]}  # fmt: skip
    bad, text = tool.gate_problems([*ok, ys])
    assert bad == []
    assert "| attn_fwd | 64×32 w4 s2 | table | 2 | plain | 80 | 5.0 | 1.00 | 2.00 |" in text
    assert "| attn_fwd | 64×32 w4 s2 | table | 0 | masked | 100 | 6.2 | 1.00 | 2.00 |" in text
    # dk/dv's table gradient by atomics: one atomic per offset of a 32×32 tile (63 offsets over
    # 128 threads: 1 a thread) passes, one per score (8) fails M2; M3 is reported only
    plain = [{**x, "wgmma": 0} for x in none]
    loops4 = [plain[0], plain[1], dict(plain[1]), plain[2]]  # masked, plain, constant, masked

    def dkdv(atomic):
        tiles = [{**x, "atomic": atomic, "total": 2 * x["total"]} for x in loops4]
        return tool.gate_problems([
            result("attn_bwd_dkdv", {"HAS_TABLE": False, "ATOMIC_TABLE": False}, plain,
                   (32, 32, 4, 2)),
            result("attn_bwd_dkdv", {"HAS_TABLE": True, "ATOMIC_TABLE": True}, tiles,
                   (32, 32, 4, 2)),
        ])  # fmt: skip

    bad, text = dkdv(1)
    assert bad == [] and "M1, M2 |" in text
    assert dkdv(8)[0][0].startswith("M2")
    # the token terms: M3 is reported only; 4-byte loads (not 16-byte ones) count for M1
    band = [{**x, "total": 3 * x["total"], "ldg": 4} for x in none]
    bad, text = tool.gate_problems([ok[0], result("attn_fwd", {"HAS_BAND": True}, band)])
    assert bad == [] and "M1, M2, M4" in text
    band[1].update(ldg=20, ldg_4=16)
    bad, _ = tool.gate_problems([ok[0], result("attn_fwd", {"HAS_BAND": True}, band)])
    assert " ".join(bad).startswith("M1")
    band[1].update(ldg_4=0, atomic=2)
    bad, _ = tool.gate_problems([ok[0], result("attn_fwd", {"HAS_BAND": True}, band)])
    assert " ".join(bad).startswith("M2")


def test_occupancy_estimate():
    tool = _tool()
    # 255 registers × 128 threads: 4 warps × 256 registers per lane group → 2 blocks of 4 warps
    assert tool.occupancy(255, 0, 4, 80) == pytest.approx(8 / 64)
    # shared memory binds first: 100 KiB blocks, two would need 202 KiB > 164 KiB
    assert tool.occupancy(32, 100 * 1024, 4, 80) == pytest.approx(4 / 64)
    assert tool.occupancy(32, 0, 4, 90) == pytest.approx(1.0)  # 16 blocks: 2048 threads
    assert tool.occupancy(32, 0, 1, 90) == pytest.approx(32 / 64)  # the 32-block limit


def test_pruning_keeps_a_config_within_the_limit():
    for kernel in K.AUTOTUNED:
        for d in (16, 32, 64, 128):
            for elt in (2, 4):
                for limit in (48 * 1024, 99 * 1024, 163 * 1024, 227 * 1024):
                    kept = K.kept_configs(kernel, d, elt, limit)
                    assert kept, (kernel, d, elt, limit)
                    block_d = max(16, 1 << (d - 1).bit_length())
                    fits = [
                        K.shared_memory_estimate(kernel, c, block_d, elt, True) <= limit
                        for c in kept
                    ]
                    assert all(fits) or len(kept) == 1, (kernel, d, elt, limit)
