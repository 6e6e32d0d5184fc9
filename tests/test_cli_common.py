"""What every command shares: --version, one-line errors, safe files, the folder lock, and the
boundary between the library and the tools."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import relattn
from relattn.cli._common import CLIError, FolderLock, atomic_write_text
from relattn.cli.main import main

SRC = Path(relattn.__file__).resolve().parent
LIBRARY = [
    "pe",
    "backends",
    "nn",
    "models",
    "cache.py",
    "functional.py",
    "_custom_op.py",
    "masks.py",
    "problem.py",
    "_validate.py",
    "_io.py",
    "__init__.py",
]
TOOLS = ("cli", "demo", "bench", "viz")


def _library_files() -> list[Path]:
    files = []
    for entry in LIBRARY:
        path = SRC / entry
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"relattn {relattn.__version__}"


def test_no_command_is_one_line(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "choose a command" in err[0]


def test_an_unwritable_working_directory_is_one_line():
    """The demo's default --out is relative: from a folder where nothing can be created (here
    /proc, which refuses even root), it is refused before any work, in one line."""
    env = {**os.environ, "PYTHONPATH": str(SRC.parent)}
    proc = subprocess.run(
        [sys.executable, "-m", "relattn", "demo", "--quick"],
        cwd="/proc",
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "--out 'relattn-report'" in proc.stderr


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    path.write_text("old")

    def fail(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == [path.name]
    monkeypatch.undo()
    atomic_write_text(path, "new")
    assert path.read_text() == "new"


@pytest.fixture
def umask():
    """Set the process's umask for a test (``umask(0o077)``), restored afterwards."""
    old = os.umask(0o022)

    def set_to(value: int) -> None:
        os.umask(value)

    yield set_to
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_writes_get_the_mode_the_umask_gives(tmp_path, umask, mask):
    """A report, results file or checkpoint is as readable as any file the user writes (the
    temporary file of tempfile.mkstemp once made them all 0600), new or replacing one."""
    import torch

    from relattn._io import atomic_write_bytes
    from relattn.models import TinyLM, TinyLMConfig

    umask(mask)
    expected = 0o666 & ~mask
    new, old = tmp_path / "report.html", tmp_path / "results.json"
    old.write_text("{}")
    os.chmod(old, 0o600)
    atomic_write_text(new, "<html></html>")
    atomic_write_bytes(old, b"{}")
    torch.manual_seed(0)
    model = TinyLM(TinyLMConfig(vocab_size=8, d_model=8, num_heads=2, num_layers=1))
    model.save(tmp_path / "model")
    files = [new, old, *(tmp_path / "model").iterdir()]
    assert len(files) == 4
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {
        f.name: oct(expected) for f in files
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "report.html", "results.json"]


def test_folder_lock_refuses_a_second_holder_and_leaves_no_file(tmp_path):
    with FolderLock(tmp_path, "first"):
        assert (tmp_path / ".lock").read_text() == f"relattn pid {os.getpid()}\n"
        with pytest.raises(CLIError, match="in use by relattn pid"):
            with FolderLock(tmp_path, "second"):
                pass
    assert not (tmp_path / ".lock").exists()  # removed on a clean release
    with FolderLock(tmp_path, "again"):  # released on exit
        with pytest.raises(CLIError, match="in use by relattn pid"):
            with FolderLock(tmp_path, "second"):
                pass
    assert list(tmp_path.iterdir()) == []


def test_folder_lock_is_not_fooled_by_a_removed_lock_file(tmp_path, monkeypatch):
    """The race that removing ``.lock`` opens: B opens ``.lock`` just before its holder A
    removes it and lets go; C then creates a new ``.lock`` and holds it. B's flock succeeds on
    A's removed file, which locks nothing: B must see that and be refused by C's lock."""
    import builtins

    from relattn.cli import _common

    a = FolderLock(tmp_path, "A").__enter__()
    stale = builtins.open(tmp_path / ".lock", "a+")  # B's open, before A lets go
    a.__exit__(None, None, None)
    with FolderLock(tmp_path, "C"):
        handles = [stale]

        def open_for_b(path, mode="r", *args, **kwargs):
            return handles.pop() if handles else builtins.open(path, mode, *args, **kwargs)

        monkeypatch.setattr(_common, "open", open_for_b, raising=False)
        with pytest.raises(CLIError, match="in use by relattn pid"):
            with FolderLock(tmp_path, "B"):
                pass
        assert handles == [] and stale.closed
    assert not (tmp_path / ".lock").exists()


def test_the_library_imports_no_tool():
    offenders = []
    for path in _library_files():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = "." * node.level + (node.module or "")
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            for name in names:
                parts = name.lstrip(".").split(".")
                if any(p in TOOLS for p in parts):
                    offenders.append(f"{path.relative_to(SRC)}: {name}")
    assert offenders == []


def test_library_errors_do_not_mention_command_line_flags():
    flag = re.compile(r"""["'][^"'\n]*\s--[a-z][a-z-]+""")
    offenders = [
        f"{path.relative_to(SRC)}:{n}: {line.strip()}"
        for path in _library_files()
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if flag.search(line)
    ]
    assert offenders == []


def test_the_tools_keep_no_list_of_encodings():
    """Every tool iterates relattn.pe's registry: cli/ and demo/ spell no list of encoding names
    (beyond the demo's default selection) and compare against no name (no if-chains). The one
    exception is TinyLMConfig's own ``rope`` flag, which the model maps to."""
    quoted = "|".join(re.escape(n) for n in relattn.pe.names())
    named = re.compile(rf"""["']({quoted})["']""")
    compared = re.compile(rf"""(==|!=|\bin)\s*[(\[]?\s*["']({quoted})["']""")
    allowed = {"demo/train.py": ['r != "rope"']}
    offenders = []
    for folder in ("cli", "demo"):
        for path in sorted((SRC / folder).rglob("*.py")):
            rel = str(path.relative_to(SRC))
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if "DEFAULT_ENCODINGS =" in line or any(a in line for a in allowed.get(rel, [])):
                    continue
                if len(set(named.findall(line))) > 1 or compared.search(line):
                    offenders.append(f"{rel}:{n}: {line.strip()}")
    assert offenders == []
