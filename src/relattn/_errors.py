"""The error type of bad input from a tool's user.

The command line (:mod:`relattn.cli`) prints a :class:`UserError` as one line on stderr and
exits with code 2; the pieces below it that read a user's files and folders (the folder lock in
:mod:`relattn._io`, the checkpoint folders of :mod:`relattn.demo`) raise it, so that they need
not import the command line.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """Bad input from the user: printed as one line on stderr, exit code 2."""
