"""The machine-aware CPU schedule: cache sizes read at import (sysfs, an override, defaults), the
block and buffer sizes derived from them, and the op count that decides how often a call wakes
torch's thread pool."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from relattn import _machine
from relattn.backends import Call, chunked
from relattn.pe import T5Bias
from relattn.problem import Problem


@pytest.mark.parametrize(
    "text, size",
    [("32K", 32 << 10), ("1024K", 1 << 20), ("32M", 32 << 20), ("512", 512), ("2 MiB", 2 << 20)],
)
def test_parse_size(text, size):
    assert _machine.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "K", "-1K", "0", "12Q", "1.5M"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="cache size"):
        _machine.parse_size(text)


def _fake_sysfs(root, caches):
    for i, (level, kind, size) in enumerate(caches):
        d = root / f"index{i}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    return root


def test_detect_reads_sysfs(tmp_path):
    root = _fake_sysfs(
        tmp_path,
        [(1, "Data", "48K"), (1, "Instruction", "32K"), (2, "Unified", "512K"),
         (3, "Unified", "16384K")],
    )  # fmt: skip
    cpu = _machine.detect(env={}, sysfs=root)
    assert (cpu.l1d, cpu.l2, cpu.l3, cpu.source) == (48 << 10, 512 << 10, 16 << 20, "sysfs")


def test_detect_defaults_and_partial(tmp_path):
    cpu = _machine.detect(env={}, sysfs=tmp_path / "missing")
    assert cpu.source == "default"
    assert (cpu.l1d, cpu.l2, cpu.l3) == tuple(_machine.DEFAULTS.values())
    root = _fake_sysfs(tmp_path, [(2, "Unified", "garbage"), (3, "Unified", "8M")])
    cpu = _machine.detect(env={}, sysfs=root)
    assert (cpu.l2, cpu.l3) == (_machine.DEFAULTS["l2"], 8 << 20)  # unreadable -> default


def test_environment_override(tmp_path):
    root = _fake_sysfs(tmp_path, [(2, "Unified", "2048K")])
    cpu = _machine.detect(env={_machine.ENV: "l2=512K, l3=32M"}, sysfs=root)
    assert (cpu.l2, cpu.l3, cpu.source) == (512 << 10, 32 << 20, "env")


@pytest.mark.parametrize("value", ["l2", "l4=1M", "l2=lots", "l2=512K;l3=1M"])
def test_bad_environment_override_names_the_variable(value):
    with pytest.raises(ValueError, match=_machine.ENV):
        _machine.detect(env={_machine.ENV: value})


def test_schedule_follows_the_l2_within_bounds():
    def sched(l2):
        cpu = _machine.CpuInfo("x", 32 << 10, l2, 32 << 20, frozenset(), "AVX2", "env")
        return _machine.schedule(cpu)

    assert sched(1 << 20).scores_per_step == 1 << 20  # 4 MiB of fp32
    assert sched(1 << 20).scores_per_step_l2 == 1 << 18  # 1 MiB
    assert sched(512 << 10).scores_per_step == 1 << 19
    assert sched(64 << 10).scores_per_step == 1 << 18  # at least 1 MiB
    assert sched(1 << 30).scores_per_step == 1 << 23  # at most 32 MiB
    assert sched(512 << 10).block_m == sched(2 << 20).block_m == 128


def test_this_machine_is_described_and_used():
    cpu = _machine.CPU
    assert cpu.l1d > 0 and cpu.l2 > 0 and cpu.l3 > 0
    assert cpu.model in cpu.describe() and cpu.isa in cpu.describe()
    assert chunked.BLOCK_M == _machine.SCHEDULE.block_m
    assert chunked._SCORES_PER_STEP == _machine.SCHEDULE.scores_per_step
    assert chunked._SCORES_PER_STEP_L2 == _machine.SCHEDULE.scores_per_step_l2


def test_override_reaches_the_backend_in_a_fresh_process():
    env = dict(os.environ, RELATTN_CPU_CACHES="l2=512K", OMP_NUM_THREADS="1")
    code = "from relattn.backends import chunked; print(chunked._SCORES_PER_STEP)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == 512 << 10  # 4 × 512 KiB = 2 MiB of fp32


# ----------------------------------------------------------------------------- thread wake-ups


class _OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _ops(b: int, backward: bool) -> int:
    q, k, v = (torch.randn(b, 4, 128, 16) for _ in range(3))
    table = T5Bias(4).table(0, 127).detach()
    p = Problem(0, 0.25, True, 0, 0, None, None)
    out, lse = chunked.forward(q, k, v, table, None, p)
    with _OpCount() as seen:
        if backward:
            call = Call(q, k, v, table, None, p, chunked.BACKEND)
            chunked.backward(call, torch.randn_like(q), out, lse)
        else:
            chunked.forward(q, k, v, table, None, p)
    return seen.count


@pytest.mark.parametrize("backward", [False, True])
def test_a_batch_costs_the_ops_of_a_few_sequences(backward):
    """Every op of the chunked backend can wake torch's thread pool, which on busy cores waits
    for a descheduled thread: a batch of 16 short sequences is folded into the heads and scored
    in L2-sized steps, not with 16 times the ops of one sequence."""
    one, batch = _ops(1, backward), _ops(16, backward)
    assert batch < 4 * one, (one, batch)  # unfolded: 9x
