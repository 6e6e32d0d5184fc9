"""Output paths, checked before any work starts, so a long run never fails at its last step."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .._errors import UserError

__all__ = ["check_writable_dir", "check_writable_file"]


def check_writable_file(flag: str, path: str | os.PathLike) -> Path:
    """``path`` as a file that can be written: not a directory, in an existing writable folder.
    Checked before any work starts, so a long run never fails at its last step."""
    p = Path(path).expanduser()
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise UserError(f"{flag} {str(path)!r} is a directory; give a file name")
    if not parent.is_dir():
        raise UserError(f"{flag} {str(path)!r}: folder {str(parent)!r} does not exist")
    if not _can_create_in(parent) or (p.exists() and not os.access(p, os.W_OK)):
        raise UserError(f"{flag} {str(path)!r} is not writable (permission denied)")
    return p


def _can_create_in(folder: Path) -> bool:
    """Whether a file can be created in ``folder`` (tried, since permission bits do not tell
    for root or for special file systems)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def check_writable_dir(flag: str, path: str | os.PathLike) -> Path:
    """``path`` as a folder that exists and is writable, or can be created."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {str(path)!r} exists and is not a folder")
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir() or not _can_create_in(probe):
        where = "" if probe == p else f" (cannot create it inside {str(probe)!r})"
        raise UserError(f"{flag} {str(path)!r} is not writable{where}: permission denied")
    return p
