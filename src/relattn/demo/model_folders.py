"""Model folders for the tools: loading one for a command, saving a training run so that
``--resume`` continues it, and saving a model so that no crash or Ctrl-C leaves a folder that
disagrees with itself.

A model folder is what :meth:`relattn.models.TinyLM.save` writes. ``relattn train`` adds
``training.json`` (settings, corpus, curve, results; for people) and ``training_state.pt``
(optimizer, batch order, step; for ``--resume``). The state file is written last and records a
hash of the weights it belongs with, so a resume never pairs an optimizer with other weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .._errors import UserError
from .._io import atomic_write_bytes, atomic_write_text
from ..models import TinyLM

__all__ = [
    "INFO_FILE",
    "STATE_FILE",
    "load_model",
    "read_training",
    "save_model_dir",
    "save_training",
]

INFO_FILE = "training.json"
STATE_FILE = "training_state.pt"


def load_model(path: str | os.PathLike, flag: str) -> TinyLM:
    """:meth:`TinyLM.load`, with every way it can fail as one :class:`UserError` line."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{flag} {str(path)!r} does not exist")
    if not p.is_dir():
        raise UserError(f"{flag} {str(path)!r} is not a folder (give a checkpoint folder)")
    try:
        model = TinyLM.load(p)
    except (FileNotFoundError, ValueError, TypeError, ImportError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{flag} {str(path)!r} is not a usable checkpoint: {first}") from None
    return model.eval()


def _weights_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name in (INFO_FILE, STATE_FILE) or name.startswith("."):
            continue
        with open(folder / name, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(name.encode() + block)
    return digest.hexdigest()


def _save_model_files(model: TinyLM, folder: Path) -> None:
    """The model's files into ``folder``, each replaced atomically (written beside, renamed)."""
    with tempfile.TemporaryDirectory(prefix=".saving-", dir=folder) as tmp:
        model.save(tmp)
        for name in sorted(os.listdir(tmp)):
            os.replace(Path(tmp) / name, folder / name)


def save_training(folder: Path, model: TinyLM, state: dict[str, Any], info: dict[str, Any]) -> None:
    """Save a training run: the model (loadable by ``TinyLM.load``), ``training.json`` and the
    resumable state, in that order, each file atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    _save_model_files(model, folder)
    atomic_write_text(folder / INFO_FILE, json.dumps(info, indent=2) + "\n")
    buffer = io.BytesIO()
    torch.save({**state, "weights_sha256": _weights_digest(folder)}, buffer)
    atomic_write_bytes(folder / STATE_FILE, buffer.getvalue())


def read_training(folder: Path) -> tuple[TinyLM, dict[str, Any], dict[str, Any]]:
    """The model, ``training.json`` and the resumable state of a run saved by
    :func:`save_training`.

    Raises:
        UserError: a missing, unreadable or mismatched file, in one line.
    """
    where = f"--resume: {folder}"
    for name in (INFO_FILE, STATE_FILE):
        if not (folder / name).is_file():
            raise UserError(f"{where} has no {name}: nothing to resume (run without --resume)")
    model = load_model(folder, "--resume")
    try:
        info = json.loads((folder / INFO_FILE).read_text())
        if not isinstance(info, dict):
            raise ValueError(f"expected an object, got {type(info).__name__}")
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"expected a dict, got {type(state).__name__}")
    except Exception as e:  # noqa: BLE001  (json, pickle and zip errors alike)
        raise UserError(
            f"{where}: a training file is unreadable ({e}); run without --resume to start over"
        ) from None
    if state.get("weights_sha256") != _weights_digest(folder):
        raise UserError(
            f"{where}: {STATE_FILE} belongs to other weights (an interrupted save?); run "
            "without --resume to start over"
        )
    return model, info, state


def save_model_dir(model: TinyLM, folder: Path) -> None:
    """``model.save(folder)`` through a sibling temporary folder and renames, so ``folder`` is
    always the old checkpoint or the new one, never a mixture (a crash between the two renames
    leaves no ``folder`` at all, which a resume treats as not trained)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.new-", dir=folder.parent))
    try:
        model.save(tmp)
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        raise
