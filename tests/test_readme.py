"""The README's code runs as written (it is the first thing a new user copies), and so do the
documentation's snippets; every ``relattn`` command they show is a valid command line."""

import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import relattn

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SNIPPETS = sorted((ROOT / "docs" / "snippets").glob("*.py"))


def _blocks(text: str, lang: str) -> list[str]:
    # Blocks inside list items are indented; dedent them as Markdown does.
    return [textwrap.dedent(b) for b in re.findall(rf"```{lang}\n(.*?)```", text, re.S)]


def _python_blocks() -> list[str]:
    return _blocks(README.read_text(), "python")


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
    exec(_python_blocks()[1], ns)  # defines Scaled and calls attention with it
    q, k, v = (quick[n].detach().double()[:1, :, :16] for n in ("q", "k", "v"))
    t5 = quick["t5"].double()
    d = q.shape[-1]
    got = quick["relattn"].attention(q, k, v, ns["Scaled"](t5, d**-0.5), backend="reference")
    bias = t5.bias(16, 16).double()
    s = (q @ k.transpose(-1, -2) + bias) / d**0.5
    s = s.masked_fill(torch.ones(16, 16, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(got, s.softmax(-1) @ v)


def test_layers_snippet_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the snippet saves a checkpoint to ckpt/
    ns: dict = {}
    exec(_python_blocks()[2], ns)  # nothing defined beforehand: it runs as written
    assert ns["y"].shape == (2, 64, 256)
    assert ns["out"].shape == (5 + 64,)
    assert capsys.readouterr().out.startswith("Hello")
    assert (tmp_path / "ckpt" / "config.json").is_file()


def _commands() -> list[str]:
    texts = [README.read_text()] + [p.read_text() for p in (ROOT / "docs").rglob("*.md")]
    lines = [
        line.strip() for t in texts for block in _blocks(t, "bash") for line in block.splitlines()
    ]
    return [line.split("#")[0].strip() for line in lines if line.startswith("relattn ")]


def test_every_relattn_command_shown_is_valid():
    from relattn.cli.main import build_parser

    commands = _commands()
    assert any(c.startswith("relattn train") for c in commands)
    parser = build_parser()
    for command in commands:
        parser.parse_args(shlex.split(command)[1:])  # raises on an unknown flag or bad value


@pytest.mark.parametrize("path", SNIPPETS, ids=lambda p: p.name)
def test_docs_snippet_runs(path, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(path)], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_every_mention_of_the_cpu_kernels_first_compile_says_the_same_time():
    """The README, BENCHMARKS.md, the docs and the module say how long the CPU kernel's first
    build blocks as the stderr line does (once "about 30 s" in one README section and "about a
    minute" in another and on stderr)."""
    import inspect

    from relattn.backends import cpu_kernel

    files = [README, ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").rglob("*.md"))]
    files.append(Path(cpu_kernel.__file__))
    mention = re.compile(
        r"(?:compil\w*|first use)[^.]{0,100}?\b(about (?:a|one|[\d.½]+) ?(?:s|seconds?|minutes?))\b"
    )
    found = {}
    for path in files:
        text = " ".join(path.read_text().split())
        for m in mention.finditer(text):
            found[f"{path.relative_to(ROOT)}: …{m.group(0)[-60:]}"] = m.group(1)
    assert len(found) >= 6, found  # README twice, BENCHMARKS, how-to/backends, the module twice
    assert {where: said for where, said in found.items() if said != cpu_kernel.COMPILE_TIME} == {}
    assert "{COMPILE_TIME}" in inspect.getsource(cpu_kernel._build)  # the stderr line


INSTALL = ROOT / "docs" / "snippets" / "install.md"


def _support_rows() -> dict[str, str]:
    rows = {}
    for line in INSTALL.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 2 and cells[0]:
            rows[cells[0]] = cells[1]
    return rows


def test_the_readme_and_the_docs_home_page_say_one_install_text():
    """docs/snippets/install.md is the one text: the docs' home page includes it, the README
    carries a copy of it (the home page's own table once said CPU meant "reference and chunked
    backends", years of backends later)."""
    snippet = INSTALL.read_text()
    readme = README.read_text()
    start = readme.index("edit docs/snippets/install.md and copy it here")
    start = readme.index("-->\n", start) + len("-->\n")
    end = readme.index("<!-- end of docs/snippets/install.md -->")
    assert readme[start:end] == snippet
    index = (ROOT / "docs" / "index.md").read_text()
    assert '--8<-- "docs/snippets/install.md"' in index
    assert "| dtypes" not in index and "| devices" not in index  # no table of its own
    assert "snippets/*.md" in (ROOT / "mkdocs.yml").read_text()  # not a page of its own


def test_the_support_table_names_every_backend_and_its_dtypes_as_the_code_has_them():
    """Every backend is in the devices row; each dtype the table gives a CPU backend runs on
    it, and each it does not give is refused; triton's dtypes and head dims are its own."""
    from relattn import backends
    from relattn.backends import cpu_kernel, triton_backend

    rows = _support_rows()
    builtin = set(backends._BUILTIN)  # not names(): other tests register backends of their own
    named = set(re.findall(r"[a-z_]+", rows["devices"])) & builtin
    assert named == builtin, rows["devices"]
    claims: dict[str, set[torch.dtype]] = {}
    for dtypes, names in re.findall(r"((?:b?float\d+(?:, )?)+) \(([a-z_, ]+)\)", rows["dtypes"]):
        for name in names.split(", "):
            claims.setdefault(name, set()).update(getattr(torch, d) for d in dtypes.split(", "))
    assert set(claims) == builtin, claims
    assert claims["triton"] == set(triton_backend._DTYPES)
    assert f"up to {triton_backend._MAX_HEAD_DIM} (triton" in rows["head dims"]
    floating = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    for name in set(claims) - {"triton"}:
        if name == "cpu_kernel" and not cpu_kernel.available():
            continue  # no compiler here: nothing to check it against
        for dtype in floating:
            q = torch.randn(1, 2, 3, 8, dtype=dtype)
            try:
                relattn.attention(q, q, q, relattn.pe.T5Bias(2), backend=name)
                ran = True
            except RuntimeError as e:
                assert "cannot run this call" in str(e), e
                ran = False
            assert ran == (dtype in claims[name]), (name, dtype)
