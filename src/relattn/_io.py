"""Writing files safely: the one implementation the checkpoints and the tools share.

:func:`write_new` creates a file that must not exist yet and makes its bytes durable;
:func:`atomic_write_bytes` replaces a file through such a new file beside it and a rename, so a
reader or a crash sees the old file or the new one, never half of one.

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

__all__ = ["atomic_write_bytes", "atomic_write_text", "write_new"]

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
