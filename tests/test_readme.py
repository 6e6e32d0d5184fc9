"""The README's code runs as written (it is the first thing a new user copies)."""

import re
import textwrap
from pathlib import Path

import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks() -> list[str]:
    # Blocks inside list items are indented; dedent them as Markdown does.
    return [
        textwrap.dedent(b) for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    ]


def test_readme_has_the_snippets():
    assert len(_python_blocks()) == 3


def test_quickstart_runs():
    ns: dict = {}
    exec(_python_blocks()[0], ns)
    assert ns["out"].shape == (2, 8, 1024, 64)
    assert ns["alpha"].shape == (2, 8, 8, 8)
    assert ns["t5"].weight.grad is not None and ns["q"].grad is not None


def test_textbook_convention_snippet_matches_its_formula():
    quick: dict = {}
    exec(_python_blocks()[0], quick)
    ns = dict(quick)
    block = _python_blocks()[1]
    exec(block, ns)  # defines Scaled and calls attention with it
    q, k, v, t5 = (quick[n].detach().double()[:1, :, :16] if n != "t5" else quick[n].double()
                   for n in ("q", "k", "v", "t5"))
    d = q.shape[-1]
    got = quick["relattn"].attention(q, k, v, ns["Scaled"](t5, d**-0.5), backend="reference")
    bias = t5.bias(16, 16).double()
    s = (q @ k.transpose(-1, -2) + bias) / d**0.5
    s = s.masked_fill(torch.ones(16, 16, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(got, s.softmax(-1) @ v)


def test_layers_snippet_runs(tmp_path, monkeypatch):
    ns: dict = {
        "x": torch.randn(2, 16, 256),
        "ids": torch.tensor([[0] * 8 + [1] * 8] * 2),
        "prompt": torch.tensor([72, 105]),
    }
    monkeypatch.chdir(tmp_path)  # the snippet saves a checkpoint to ckpt/
    exec(_python_blocks()[2], ns)
    assert ns["y"].shape == (2, 16, 256)
    assert ns["ids"].shape == (2 + 64,)
