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
    """The corpus cannot be used (missing, empty, or too small for the requested evaluation)."""


@dataclass
class Corpus:
    """Train and held-out byte streams (uint8 tensors) and where they came from."""

    train: Tensor
    heldout: Tensor
    source: str
    train_files: int
    heldout_files: int

    def describe(self) -> dict:
        """A JSON-ready summary of the corpus."""
        return {
            "source": self.source,
            "train_files": self.train_files,
            "heldout_files": self.heldout_files,
            "train_bytes": int(self.train.numel()),
            "heldout_bytes": int(self.heldout.numel()),
        }


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


def _read(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES)
    except OSError:
        return b""
    return b"" if b"\0" in data[:1024] else data  # skip binary files


def _documents(files: list[Path], seed: int):
    """Yield the corpus's documents (bytes) in a seeded, deterministic order."""
    if len(files) == 1:
        data = _read(files[0])
        if len(data) == MAX_FILE_BYTES:  # a single file: read it all and chunk it
            with open(files[0], "rb") as f:
                data = f.read()
        size = max(1024, min(CHUNK_BYTES, len(data) // 20))
        chunks = [data[i : i + size] for i in range(0, len(data), size)]
        random.Random(seed).shuffle(chunks)
        yield from chunks
        return
    order = list(files)
    random.Random(seed).shuffle(order)
    for path in order:
        yield _read(path)


def load_corpus(
    data: str | None,
    *,
    seed: int,
    train_bytes: int,
    heldout_bytes: int,
    holdout_every: int = 10,
) -> Corpus:
    """Read the corpus and split it by file.

    Args:
        data: a text file or a directory of text files; None for the stdlib's ``.py`` files.
        seed: shuffles the file order (and so the split).
        train_bytes, heldout_bytes: stop reading once each split holds this many bytes.
        holdout_every: every ``holdout_every``-th file in shuffled order is held out; held-out
            files contribute at most ``heldout_bytes / 16`` bytes each, so evaluation spans
            at least 16 files.

    Returns:
        A :class:`Corpus` whose streams are the files concatenated with a newline between them.
    """
    if data is None:
        root, suffix, source = stdlib_dir(), ".py", f"Python standard library ({stdlib_dir()})"
    else:
        root, suffix, source = Path(data).expanduser(), None, str(Path(data).expanduser())
        if not root.exists():
            raise CorpusError(f"--data {data!r} does not exist")
    files = list_files(root, suffix)
    if not files:
        raise CorpusError(f"no files found under {source}")
    train, heldout = [], []
    sizes = [0, 0]
    counts = [0, 0]
    for i, doc in enumerate(_documents(files, seed)):
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
    if not train or not heldout:
        raise CorpusError(
            f"corpus {source} is empty or too small to split by file "
            f"(train files: {counts[0]}, held-out files: {counts[1]})"
        )

    def stream(parts: list[bytes], cap: int) -> Tensor:
        blob = b"".join(parts)[:cap]
        return torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone()

    return Corpus(
        stream(train, train_bytes), stream(heldout, heldout_bytes), source, counts[0], counts[1]
    )


def train_batches(stream: Tensor, context: int, batch_size: int, seed: int):
    """Endless random training windows from ``stream``.

    Yields:
        ``(x, y)``, both ``(batch_size, context)`` int64: ``y`` is ``x`` shifted by one byte.
    """
    if stream.numel() < context + 2:
        raise CorpusError(
            f"the training split has {stream.numel()} bytes; --context {context} needs more"
        )
    gen = torch.Generator().manual_seed(seed)
    arange = torch.arange(context + 1)
    while True:
        starts = torch.randint(0, stream.numel() - context - 1, (batch_size, 1), generator=gen)
        window = stream[starts + arange].long()
        yield window[:, :-1], window[:, 1:]


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
            f"the held-out split has {stream.numel()} bytes; evaluation needs {total + 1}"
        )
    x = stream[:total].long().view(-1, length)
    y = stream[1 : total + 1].long().view(-1, length)
    return x, y
