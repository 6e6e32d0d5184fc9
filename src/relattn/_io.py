"""Writing files safely, and one writer per folder: the one implementation the checkpoints and
the tools share.

:func:`write_new` creates a file that must not exist yet and makes its bytes durable;
:func:`atomic_write_bytes` replaces a file through such a new file beside it and a rename, so a
reader or a crash sees the old file or the new one, never half of one. :class:`FolderLock`
keeps a second process out of a folder that one is writing.

Permissions: a new file is created with mode ``0o666`` and the kernel takes the process's umask
(or the folder's default ACL) off it, exactly as for ``open(path, "w")``, so a report or a
checkpoint is as readable as any other file the user writes. ``tempfile.mkstemp`` is not used:
it creates ``0o600`` whatever the umask, and the rename would carry that mode onto the result.
Reading the umask is not needed (``os.umask`` can only be read by setting it, which races with
other threads). A replaced file's own mode is not carried over either: files that earlier
versions wrote ``0o600`` get the umask's mode on their next write.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Any

from ._errors import UserError

__all__ = ["FolderLock", "atomic_write_bytes", "atomic_write_text", "write_new"]

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)


def write_new(path: str | os.PathLike, data: bytes) -> None:
    """Create ``path`` (which must not exist: FileExistsError otherwise) with the permissions
    the umask gives, write ``data`` and fsync it. A failed write removes the partial file."""
    fd = os.open(path, _FLAGS, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a new file in the same folder and a rename: a reader
    (or a crash) sees the old file or the new one, never half of one. The file gets the mode
    the umask gives."""
    path = Path(path)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            write_new(tmp, data)
            break
        except FileExistsError:  # another writer's temporary file: draw another name
            continue
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


class FolderLock:
    """An exclusive lock on a folder (``.lock`` inside it) for the duration of a ``with``.

    A second process asking for the same folder is refused at once with a
    :class:`~relattn._errors.UserError` that names the holder, ``what`` it is doing, and
    suggests waiting or choosing ``elsewhere`` (how the caller's user names another folder); the
    lock is released by the operating system if the holder dies. A clean release removes
    ``.lock``: the holder unlinks it while still holding the lock, and a taker checks, once it
    holds the lock, that the file it locked is still the one at ``.lock`` (else it locked a
    removed file, and tries again), so two processes never both hold the folder.
    """

    def __init__(
        self, folder: str | os.PathLike, what: str, elsewhere: str = "another folder"
    ) -> None:
        self.path = Path(folder) / ".lock"
        self.what = what
        self.elsewhere = elsewhere
        self._fh: Any = None
        self._locked = False

    def __enter__(self) -> FolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # no fcntl (Windows): no lock, as before
            fcntl = None  # type: ignore[assignment]
        while True:
            fh = open(self.path, "a+")  # noqa: SIM115  (held open while locked)
            if fcntl is None:
                break
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.seek(0)
                holder = fh.read().strip() or "another process"
                fh.close()
                raise UserError(
                    f"{self.path.parent} is in use by {holder} ({self.what}); wait for it to "
                    f"finish or choose {self.elsewhere}"
                ) from None
            if self._still_there(fh):
                self._locked = True
                break
            fh.close()  # its holder removed it as we opened it: lock the new one
        fh.seek(0)
        fh.truncate()
        fh.write(f"relattn pid {os.getpid()}\n")
        fh.flush()
        self._fh = fh
        return self

    def _still_there(self, fh: Any) -> bool:
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fh.fileno())
        return (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)

    def __exit__(self, *exc: object) -> None:
        if self._fh is None:
            return
        try:
            if self._locked:  # removed while held: a taker that opened it sees it gone
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
        finally:
            self._fh.close()  # closing releases the flock
            self._fh = None
            if not self._locked:  # no fcntl: nothing to race with
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
