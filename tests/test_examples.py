"""Every script in examples/ runs as written, short, and prints what it promises."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# What each script must print (examples others add only need to exit 0).
EXPECT = {
    "custom_encoding.py": "gradient of a:",
    "nanogpt_block.py": "T5 bias of block 0 got gradients: True",
    "train_and_generate.py": "reloaded checkpoint generates the same text",
}
# Scripts that need a launcher are run where the launcher is: cp_train.py under torchrun in
# tests/test_distributed.py (it trains over two processes and compares them with a third run,
# which is why it is a little longer than the others).
ELSEWHERE = {"cp_train.py": 75}
SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py") if p.name not in ELSEWHERE)


def test_the_examples_are_there_and_short():
    assert set(EXPECT) <= set(SCRIPTS)
    for name in [*SCRIPTS, *ELSEWHERE]:
        lines = (EXAMPLES / name).read_text().splitlines()
        assert len(lines) <= ELSEWHERE.get(name, 60), f"{name} has {len(lines)} lines"


@pytest.mark.parametrize("name", SCRIPTS)
def test_example_runs(name, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert EXPECT.get(name, "") in proc.stdout
