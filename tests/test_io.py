"""Safe files and one writer per folder (relattn._io): what the checkpoints, the demo and the
command line share."""

from __future__ import annotations

import os

import pytest

from relattn._errors import UserError
from relattn._io import FolderLock, atomic_write_bytes, atomic_write_text


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
        with pytest.raises(UserError, match="in use by relattn pid"):
            with FolderLock(tmp_path, "second"):
                pass
    assert not (tmp_path / ".lock").exists()  # removed on a clean release
    with FolderLock(tmp_path, "again"):  # released on exit
        with pytest.raises(UserError, match="in use by relattn pid"):
            with FolderLock(tmp_path, "second"):
                pass
    assert list(tmp_path.iterdir()) == []


def test_folder_lock_is_not_fooled_by_a_removed_lock_file(tmp_path, monkeypatch):
    """The race that removing ``.lock`` opens: B opens ``.lock`` just before its holder A
    removes it and lets go; C then creates a new ``.lock`` and holds it. B's flock succeeds on
    A's removed file, which locks nothing: B must see that and be refused by C's lock."""
    import builtins

    from relattn import _io

    a = FolderLock(tmp_path, "A").__enter__()
    stale = builtins.open(tmp_path / ".lock", "a+")  # B's open, before A lets go
    a.__exit__(None, None, None)
    with FolderLock(tmp_path, "C"):
        handles = [stale]

        def open_for_b(path, mode="r", *args, **kwargs):
            return handles.pop() if handles else builtins.open(path, mode, *args, **kwargs)

        monkeypatch.setattr(_io, "open", open_for_b, raising=False)
        with pytest.raises(UserError, match="in use by relattn pid"):
            with FolderLock(tmp_path, "B"):
                pass
        assert handles == [] and stale.closed
    assert not (tmp_path / ".lock").exists()


def test_folder_lock_names_where_else_to_go(tmp_path):
    """The refusal says what holds the folder and what to do: the caller's words for another
    folder (the command line's is ``another --out``)."""
    with FolderLock(tmp_path, "first"):
        with pytest.raises(UserError, match=r"\(a test\); wait for it to finish or choose --x$"):
            with FolderLock(tmp_path, "a test", elsewhere="--x"):
                pass
        with pytest.raises(UserError, match=r"or choose another folder$"):
            with FolderLock(tmp_path, "a test"):
                pass
