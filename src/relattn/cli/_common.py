"""What every command-line tool shares: the user-error type, argument checks, encodings from the
registry, CPU threads, safe output paths and files, a folder lock, and the progress bar.

The library (``pe``, ``backends``, ``functional``, ``nn``, ``cache``, ``models``) never imports
this module; the tools (``cli``, ``demo``, ``bench``) import nothing else of each other's helpers.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from .._io import atomic_write_bytes, atomic_write_text

__all__ = [
    "CLIError",
    "FolderLock",
    "Progress",
    "SEED_MAX",
    "add_encoding_params",
    "atomic_write_bytes",
    "atomic_write_text",
    "available_cores",
    "bounded_int",
    "check_writable_dir",
    "check_writable_file",
    "default_threads",
    "encoding_kwargs",
    "format_seconds",
    "parse_pe",
    "threads_flag",
    "torch_threads",
]

# Seeds reach torch.Generator.manual_seed, which takes at most 64 bits; 2**63 - 1 keeps every
# consumer (int64 tensors, numpy) safe.
SEED_MAX = 2**63 - 1
# Integer encoding parameters from the command line are capped here: a table has one column
# per offset, and a typo like 1e9 must not allocate gigabytes.
PARAM_INT_MAX = 1 << 16


class CLIError(Exception):
    """Bad input from the user: printed as one line on stderr, exit code 2."""


# ----------------------------------------------------------------------------- argument types


def bounded_int(low: int, high: int | None = None, what: str = "an int"):
    """An argparse ``type=`` accepting integers in ``[low, high]``; the message names the range
    (argparse prefixes it with the flag)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            span = f"between {low} and {high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {what} {span}; got {text!r}")
        return value

    parse.__name__ = "int"
    return parse


def bounded_float(low: float, high: float, what: str = "a number"):
    """An argparse ``type=`` accepting finite floats in ``[low, high]``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not low <= value <= high:  # NaN fails too
            raise argparse.ArgumentTypeError(
                f"must be {what} between {low:g} and {high:g}; got {text!r}"
            )
        return value

    parse.__name__ = "float"
    return parse


def seed_flag(parser: argparse.ArgumentParser, default: int = 0, help: str = "random seed") -> None:
    """``--seed S`` with S in ``[0, 2**63 - 1]``."""
    parser.add_argument(
        "--seed",
        type=bounded_int(0, SEED_MAX),
        default=default,
        metavar="S",
        help=f"{help} (default {default})",
    )


# ----------------------------------------------------------------------------- encodings


def parse_pe(text: str, flag: str = "--pe") -> list[str]:
    """One encoding, ``none``, or a composition ``rope+t5`` (names from the registry).

    Returns:
        The registered names in the composition (empty for ``none``).
    """
    from relattn import pe

    choices = ["none", *pe.names()]
    parts = [p.strip().lower() for p in text.split("+")]
    if not all(parts):
        raise CLIError(
            f"{flag} must be an encoding from {','.join(choices)} or a composition "
            f"like rope+t5; got {text!r}"
        )
    unknown = [p for p in parts if p not in choices]
    if unknown:
        raise CLIError(
            f"{flag}: unknown encoding {unknown[0]!r}; choose from "
            f"{','.join(choices)} (or compose them: rope+t5)"
        )
    if len(set(parts)) != len(parts):
        raise CLIError(f"{flag} names an encoding twice: {text!r}")
    if "none" in parts and len(parts) > 1:
        raise CLIError(f"{flag}: 'none' cannot be composed with other encodings; got {text!r}")
    return [p for p in parts if p != "none"]


def _param_flag(encoding: str, param: str) -> str:
    return f"--{encoding}-{param}".replace("_", "-")


def add_encoding_params(parser: argparse.ArgumentParser) -> None:
    """One flag per constructor parameter of every registered encoding: ``--t5-num-buckets``,
    ``--rope-base``, ... (read from :func:`relattn.pe.specs`, so a newly registered encoding's
    parameters appear with no edit here)."""
    from relattn import pe

    group = parser.add_argument_group(
        "encoding parameters", "each applies only when its encoding is in --pe"
    )
    for spec in pe.specs():
        for p in spec.params:
            flag = _param_flag(spec.name, p.name)
            dest = f"pe_{spec.name}_{p.name}"
            default = f" (default {p.default})"
            if p.type is bool:
                group.add_argument(
                    flag,
                    dest=dest,
                    action="store_const",
                    const=True,
                    default=None,
                    help=f"{spec.name}: {p.help}",
                )
            else:
                group.add_argument(
                    flag,
                    dest=dest,
                    default=None,
                    metavar=p.name.upper(),
                    choices=p.choices,
                    help=f"{spec.name}: {p.help}{default}",
                )


def encoding_kwargs(args: argparse.Namespace, names: list[str]) -> dict[str, dict[str, Any]]:
    """The parameters given on the command line for each encoding in ``names``, converted to the
    types the registry declares; a parameter of an encoding not in ``names`` is an error."""
    from relattn import pe

    out: dict[str, dict[str, Any]] = {name: {} for name in names}
    for spec in pe.specs():
        for p in spec.params:
            value = getattr(args, f"pe_{spec.name}_{p.name}", None)
            if value is None:
                continue
            flag = _param_flag(spec.name, p.name)
            if spec.name not in names:
                raise CLIError(f"{flag} applies only when --pe includes {spec.name}")
            out[spec.name][p.name] = _convert(flag, p, value)
    return out


def _convert(flag: str, p: Any, value: Any) -> Any:
    if p.type is bool:
        return bool(value)
    if p.choices is not None or p.type is str:
        return str(value)
    try:
        converted = p.type(value)
    except (TypeError, ValueError):
        raise CLIError(
            f"{flag} must be {'an int' if p.type is int else 'a number'}; got {value!r}"
        ) from None
    if p.type is int and abs(converted) > PARAM_INT_MAX:
        raise CLIError(f"{flag} must be at most {PARAM_INT_MAX} here; got {value}")
    if p.type is float and not abs(converted) < float("inf"):
        raise CLIError(f"{flag} must be a finite number; got {value!r}")
    return converted


def describe_params(names: list[str], kwargs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every parameter of the named encodings with its value (given or default), for reports."""
    from relattn import pe

    used: dict[str, Any] = {}
    for name in names:
        for p in pe.spec(name).params:
            used[f"{name}.{p.name}"] = kwargs.get(name, {}).get(p.name, p.default)
    return used


# ----------------------------------------------------------------------------- threads


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """Torch threads for a small model: every available core on an idle machine, fewer when
    other processes already keep cores busy (oversubscribed intra-op threads spin and wait on
    each other, which costs far more than it gains for matrices this small)."""
    cores = available_cores()
    try:
        busy = int(os.getloadavg()[0] + 0.5)
    except (AttributeError, OSError):
        busy = 0
    return max(1, min(cores, cores - busy))


def threads_flag(parser: argparse.ArgumentParser, default_help: str) -> None:
    """``--threads N`` with N between 1 and this machine's core count (more threads than cores
    only slow torch down, and thousands of them can exhaust a process limit)."""
    cores = os.cpu_count() or 1
    parser.add_argument(
        "--threads",
        type=bounded_int(1, cores, "a thread count"),
        metavar="N",
        help=f"torch CPU threads, 1..{cores} (default: {default_help})",
    )


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` torch threads; in-process callers (tests, notebooks) get theirs back."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ----------------------------------------------------------------------------- output paths


def check_writable_file(flag: str, path: str | os.PathLike) -> Path:
    """``path`` as a file that can be written: not a directory, in an existing writable folder.
    Checked before any work starts, so a long run never fails at its last step."""
    p = Path(path).expanduser()
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise CLIError(f"{flag} {str(path)!r} is a directory; give a file name")
    if not parent.is_dir():
        raise CLIError(f"{flag} {str(path)!r}: folder {str(parent)!r} does not exist")
    if not _can_create_in(parent) or (p.exists() and not os.access(p, os.W_OK)):
        raise CLIError(f"{flag} {str(path)!r} is not writable (permission denied)")
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
        raise CLIError(f"{flag} {str(path)!r} exists and is not a folder")
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir() or not _can_create_in(probe):
        where = "" if probe == p else f" (cannot create it inside {str(probe)!r})"
        raise CLIError(f"{flag} {str(path)!r} is not writable{where}: permission denied")
    return p


class FolderLock:
    """An exclusive lock on a folder (``.lock`` inside it) for the duration of a ``with``.

    A second process asking for the same folder is refused at once with a :class:`CLIError`;
    the lock is released by the operating system if the holder dies. A clean release removes
    ``.lock``: the holder unlinks it while still holding the lock, and a taker checks, once it
    holds the lock, that the file it locked is still the one at ``.lock`` (else it locked a
    removed file, and tries again), so two processes never both hold the folder.
    """

    def __init__(self, folder: Path, what: str) -> None:
        self.path = Path(folder) / ".lock"
        self.what = what
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
                raise CLIError(
                    f"{self.path.parent} is in use by {holder} ({self.what}); wait for it to "
                    "finish or choose another --out"
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


# ----------------------------------------------------------------------------- progress


def format_seconds(seconds: float) -> str:
    """``75.2`` -> ``"1:15"``; ``3725`` -> ``"1:02:05"``."""
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Progress of ``total`` steps, with free-form fields (loss, tokens/s, ...).

    On a TTY the bar is redrawn at most every ``interval`` seconds; on anything else (a log
    file, CI) a full line is written every ``line_interval`` seconds and at the end.

    Args:
        total: number of steps (or seconds, for a time budget; see :meth:`goto`).
        desc: label in front of the bar.
        stream: where to write (default ``sys.stderr``).
        width: bar width in characters.
        unit: ``""`` for steps, ``"s"`` for a time budget (shown as m:ss).
    """

    def __init__(
        self,
        total: float,
        desc: str = "",
        stream: TextIO | None = None,
        width: int = 24,
        interval: float = 0.1,
        line_interval: float = 10.0,
        unit: str = "",
        start: float = 0,
    ) -> None:
        self.total = max(1, total)
        self.desc = desc
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.unit = unit
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if self.tty else line_interval
        self.count = min(self.total, start)
        self.fields: dict[str, str] = {}
        self.start = time.perf_counter()
        self._first = self.count
        self._last = -float("inf")
        self._closed = False

    def update(self, n: float = 1, **fields: object) -> None:
        """Advance by ``n`` steps and set the displayed fields (``loss=1.23``, ...)."""
        self.goto(self.count + n, **fields)

    def goto(self, count: float, **fields: object) -> None:
        """Set the position to ``count`` (elapsed seconds for a time budget)."""
        self.count = min(self.total, count)
        for key, value in fields.items():
            self.fields[key] = f"{value:.3f}" if isinstance(value, float) else str(value)
        now = time.perf_counter()
        if now - self._last >= self.interval or self.count >= self.total:
            self._last = now
            self._draw(final=False)

    def close(self) -> None:
        """Draw the final state and end the line."""
        if self._closed:
            return
        self._closed = True
        self._draw(final=True)

    def _amount(self, x: float) -> str:
        return format_seconds(x) if self.unit == "s" else str(int(x))

    def line(self) -> str:
        """The current state as one line (without carriage return or newline)."""
        elapsed = time.perf_counter() - self.start
        frac = self.count / self.total
        filled = int(frac * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        done = self.count - self._first
        if done > 0 and self.count < self.total:
            eta = f"{format_seconds(elapsed * (self.total - self.count) / done)} left"
        else:
            eta = f"{format_seconds(elapsed)} elapsed"
        extra = " ".join(f"{k} {v}" for k, v in self.fields.items())
        head = f"{self.desc} " if self.desc else ""
        amount = f"{self._amount(self.count)}/{self._amount(self.total)}"
        return f"{head}[{bar}] {amount} {extra} {eta}".replace("  ", " ")

    def _draw(self, final: bool) -> None:
        text = self.line()
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
        elif final or self.count < self.total:
            self.stream.write(text + "\n")
        self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
