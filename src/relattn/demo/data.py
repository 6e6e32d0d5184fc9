"""The demo's corpus: byte-level text split by file into train and held-out streams.

The default corpus is the Python standard library's own ``.py`` files, which every machine with
Python already has. Files are listed in sorted order, shuffled with a fixed seed, and assigned
whole to either split (every ``holdout_every``-th file is held out), so held-out text comes from
files the model never saw. Reading stops once both splits hold their byte caps, so startup stays
fast however large the corpus is.
"""

from __future__ import annotations

import os
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

# Files larger than this contribute only their first bytes, so no single file dominates a split.
MAX_FILE_BYTES = 64 * 1024
# A lone input file is cut into pseudo-files of this size so it can still be split by "file".
CHUNK_BYTES = 16 * 1024
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "node_modules"}


class CorpusError(ValueError):
    """The corpus cannot be used (missing, empty, binary, or too small for what was asked)."""


@dataclass
class Corpus:
    """Train and held-out byte streams (uint8 tensors) and where they came from.

    ``unit`` is ``"file"``, or ``"chunk"`` when a single file was cut into pieces so that it
    could still be split; ``train_files`` and ``heldout_files`` count units.
    """

    train: Tensor
    heldout: Tensor
    source: str
    train_files: int
    heldout_files: int
    unit: str = "file"

    def describe(self) -> dict:
        """A JSON-ready summary of the corpus."""
        return {
            "source": self.source,
            "unit": self.unit,
            "train_files": self.train_files,
            "heldout_files": self.heldout_files,
            "train_bytes": int(self.train.numel()),
            "heldout_bytes": int(self.heldout.numel()),
        }

    def sentence(self) -> str:
        """``"130 training files (2000000 bytes), 18 held-out files (33000 bytes)"``, or for one
        file ``"1 file cut into 18 training chunks (…) and 2 held-out chunks (…)"``."""
        train = f"{self.train.numel()} bytes"
        held = f"{self.heldout.numel()} bytes"
        if self.unit == "chunk":
            return (
                f"1 file cut into {_count(self.train_files, 'training chunk')} ({train}) and "
                f"{_count(self.heldout_files, 'held-out chunk')} ({held})"
            )
        return (
            f"{_count(self.train_files, 'training file')} ({train}), "
            f"{_count(self.heldout_files, 'held-out file')} ({held})"
        )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def stdlib_dir() -> Path:
    """The directory of the Python standard library (the default corpus)."""
    return Path(sysconfig.get_paths()["stdlib"])


def list_files(root: Path, suffix: str | None) -> list[Path]:
    """Regular files under ``root`` (or ``[root]`` if it is a file), in sorted order.

    Hidden directories and installed-package directories are skipped, so the stdlib corpus is
    the same on every machine with the same Python whatever packages are installed.
    """
    if root.is_file():
        return [root]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or (suffix is not None and not name.endswith(suffix)):
                continue
            path = Path(dirpath) / name
            if path.is_file():
                found.append(path)
    return sorted(found)


def is_text(data: bytes) -> bool:
    """Bytes that look like text: no NUL byte in the first KiB (the usual binary test)."""
    return b"\0" not in data[:1024]


def _read(path: Path, limit: int | None) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read() if limit is None else f.read(limit)
    except OSError:
        return b""
    return data if is_text(data) else b""  # skip binary files


def _documents(files: list[Path], seed: int, max_file_bytes: int | None, single_limit: int):
    """Yield the corpus's documents (bytes) in a seeded, deterministic order."""
    if len(files) == 1:
        data = _read(files[0], single_limit)
        size = max(1024, min(CHUNK_BYTES, len(data) // 20))
        chunks = [data[i : i + size] for i in range(0, len(data), size)]
        random.Random(seed).shuffle(chunks)
        yield from chunks
        return
    order = list(files)
    random.Random(seed).shuffle(order)
    for path in order:
        yield _read(path, max_file_bytes)


def _check_single_file(path: Path, name: str) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(1024)
    except OSError as e:
        raise CorpusError(f"{name} {str(path)!r} cannot be read: {e.strerror or e}") from None
    if not head:
        raise CorpusError(f"{name} {str(path)!r} is empty")
    if not is_text(head):
        raise CorpusError(f"{name} {str(path)!r} is not text (it contains NUL bytes)")


def load_corpus(
    data: str | None,
    *,
    seed: int,
    train_bytes: int,
    heldout_bytes: int,
    holdout_every: int = 10,
    max_file_bytes: int | None = MAX_FILE_BYTES,
    name: str = "--data",
) -> Corpus:
    """Read the corpus and split it by file.

    Args:
        data: a text file or a directory of text files; None for the stdlib's ``.py`` files.
        seed: shuffles the file order (and so the split).
        train_bytes, heldout_bytes: stop reading once each split holds this many bytes.
        holdout_every: every ``holdout_every``-th file in shuffled order is held out; held-out
            files contribute at most ``heldout_bytes / 16`` bytes each, so evaluation spans
            at least 16 files.
        max_file_bytes: each file of a directory contributes at most this many bytes (None:
            all of it). A single file is always read whole and cut into chunks.
        name: ``data``'s argument as the command line spells it, for the errors (``--data``
            for the demo, ``FILE_OR_FOLDER`` for ``relattn train``'s positional argument).

    Returns:
        A :class:`Corpus` whose streams are the files concatenated with a newline between them.

    Raises:
        CorpusError: the path is missing, a single file is empty or binary, a directory holds
            no text, or there is too little text to split.
    """
    if data is None:
        root, suffix, source = stdlib_dir(), ".py", f"Python standard library ({stdlib_dir()})"
    else:
        root, suffix, source = Path(data).expanduser(), None, str(Path(data).expanduser())
        if not root.exists():
            raise CorpusError(f"{name} {data!r} does not exist")
        if root.is_file():
            _check_single_file(root, name)
    files = list_files(root, suffix)
    if not files:
        raise CorpusError(f"{name} {source!r} holds no files")
    train: list[bytes] = []
    heldout: list[bytes] = []
    sizes = [0, 0]
    counts = [0, 0]
    single_limit = 2 * (train_bytes + holdout_every * heldout_bytes)
    for i, doc in enumerate(_documents(files, seed, max_file_bytes, single_limit)):
        if not doc.strip():
            continue
        held = i % holdout_every == 0
        split, cap = (heldout, heldout_bytes) if held else (train, train_bytes)
        if sizes[held] >= cap:
            if sizes[0] >= train_bytes and sizes[1] >= heldout_bytes:
                break
            continue
        if held and len(files) > 1:  # many short held-out excerpts, not one or two long files
            doc = doc[: max(1024, heldout_bytes // 16)]
        split.append(doc + b"\n")
        sizes[held] += len(doc) + 1
        counts[held] += 1
    unit = "chunk" if len(files) == 1 else "file"
    if not train and not heldout:
        raise CorpusError(
            f"{name} {source!r} holds no text ({_count(len(files), 'file')}, all empty or binary)"
        )
    if not train or not heldout:
        raise CorpusError(
            f"{source} is too small to split into training and held-out text "
            f"(training {unit}s: {counts[0]}, held-out {unit}s: {counts[1]}); give more text"
        )

    def stream(parts: list[bytes], cap: int) -> Tensor:
        blob = b"".join(parts)[:cap]
        return torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone()

    return Corpus(
        stream(train, train_bytes),
        stream(heldout, heldout_bytes),
        source,
        counts[0],
        counts[1],
        unit,
    )


class Batches:
    """Endless random training windows from ``stream``, resumable: :attr:`generator`'s state is
    all there is to save.

    Yields:
        ``(x, y)``, both ``(batch_size, context)`` int64: ``y`` is ``x`` shifted by one byte.
    """

    def __init__(self, stream: Tensor, context: int, batch_size: int, seed: int) -> None:
        if stream.numel() < context + 2:
            raise CorpusError(
                f"the training text has {stream.numel()} bytes; --context {context} needs at "
                f"least {context + 2}"
            )
        self.stream, self.context, self.batch_size = stream, context, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self._arange = torch.arange(context + 1)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        high = self.stream.numel() - self.context - 1
        starts = torch.randint(0, high, (self.batch_size, 1), generator=self.generator)
        window = self.stream[starts + self._arange].long()
        return window[:, :-1], window[:, 1:]


def eval_windows(stream: Tensor, length: int, total: int) -> tuple[Tensor, Tensor]:
    """The first ``total`` held-out bytes (+1 for the last target) as non-overlapping windows.

    Every model and every length sees exactly the same bytes: ``total`` is a multiple of every
    evaluated length, and windows are cut from the start of the held-out stream.

    Returns:
        ``(x, y)``, each ``(total // length, length)`` int64.
    """
    if total % length:
        raise ValueError(f"total={total} must be a multiple of length={length}")
    if stream.numel() < total + 1:
        raise CorpusError(
            f"the held-out text has {stream.numel()} bytes; evaluation needs {total + 1}"
        )
    x = stream[:total].long().view(-1, length)
    y = stream[1 : total + 1].long().view(-1, length)
    return x, y
