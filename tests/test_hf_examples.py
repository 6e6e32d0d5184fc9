"""The Hugging Face example scripts run as written, offline."""

import os
import runpy
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_hf_t5_example_runs(capsys):
    script = EXAMPLES / "hf_t5.py"
    assert len(script.read_text().splitlines()) < 60
    tokens = runpy.run_path(str(script))["main"]()
    assert len(tokens) == 2 and all(len(row) == 11 for row in tokens)  # start + 10 new
    out = capsys.readouterr().out
    assert "one training step: loss" in out and "generated:" in out
