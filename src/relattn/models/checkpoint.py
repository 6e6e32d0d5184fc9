"""Checkpoint folders: ``config.json`` + ``model.safetensors``, replaced atomically.

A save never edits a checkpoint in place. It writes both files into a fresh folder beside the
target (``.<name>.relattn-save-<pid>-<token>``), fsyncs them, and swaps that folder with the target
in one ``renameat2(RENAME_EXCHANGE)`` (Linux), so a reader, a crash or a kill at any instant finds
either the previous checkpoint or the new one, complete. Where the exchange is unavailable the swap
is two renames (target aside, new folder in); a kill between them leaves the previous checkpoint
aside (``.<name>.relattn-old-<pid>-<token>``), which the next save renames back before it starts.

What a save may delete is only its own: the two checkpoint files, by name, inside folders that
carry its naming pattern, and only after their writer process has died; folders are removed with
``rmdir``, which fails, leaving them, if anything else was put inside. A target folder that holds
anything besides the two checkpoint files is refused rather than replaced.

The weights file also records the config it was saved with (safetensors metadata), so a
``config.json`` and a ``model.safetensors`` from different saves never load as one model.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import secrets
import sys
from dataclasses import asdict, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from torch import Tensor

from .._io import write_new
from .._validate import shape_str
from .config import TinyLMConfig

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "check_state", "read_checkpoint", "write_checkpoint"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_FILES = (CONFIG_FILE, WEIGHTS_FILE)
_CONFIG_KEY = "relattn.config"  # safetensors metadata entry: the config the weights belong to
# The fields that make weights a different function; dropout, max_seq_len and backend may be
# edited in config.json between save and load.
_ARCHITECTURE = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "pe", "rope",
                 "mlp_ratio")  # fmt: skip
_NEW, _OLD = "relattn-save", "relattn-old"


# ----------------------------------------------------------------------------- writing


def write_checkpoint(path: Any, config: TinyLMConfig, state: dict[str, Tensor]) -> Path:
    """Replace the checkpoint folder ``path`` with ``config`` and ``state``, atomically.

    Args:
        path: the checkpoint folder (str or os.PathLike): absent (created with its parents),
            empty, or a previous checkpoint holding only ``config.json`` and
            ``model.safetensors``.
        config: written to ``config.json`` and recorded in the weights' metadata.
        state: name -> tensor (any device; written from CPU copies).

    Returns:
        The folder written (symlinks resolved).

    Raises:
        TypeError: ``path`` is not a str or os.PathLike.
        ValueError: ``path`` is a file, or a folder holding anything else.
        OSError: the write failed (disk full, file-size limit, permissions); the previous
            checkpoint, if any, is unchanged and the partial files are removed.
    """
    to_bytes = _safetensors().save  # fail on a missing package before touching the disk
    target = _target(path)
    _check_replaceable(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"path {str(target)!r} lies inside a file, not a folder") from None
    _recover_and_clean(target)
    text = json.dumps(asdict(config), indent=2) + "\n"
    metadata = {"format": "pt", _CONFIG_KEY: json.dumps(asdict(config), sort_keys=True)}
    tensors = {k: t.detach().to("cpu").contiguous() for k, t in state.items()}
    staging = _make_sibling(target, _NEW)
    try:
        _write_text(staging / CONFIG_FILE, text)
        _write_weights(staging / WEIGHTS_FILE, tensors, metadata, to_bytes)
        _fsync_path(staging)
        _swap_in(staging, target)  # from here ``staging`` holds the previous checkpoint, if any
        _fsync_path(target.parent)
    finally:
        _remove_ours(staging)
    return target


def _write_text(file: Path, text: str) -> None:
    _write_bytes(file, text.encode("utf-8"))


def _write_weights(file: Path, tensors: dict[str, Tensor], metadata: dict, to_bytes) -> None:
    # Serialized in memory and written here rather than by safetensors' save_file, which writes
    # a hidden temporary file of its own that a kill would leave behind.
    _write_bytes(file, to_bytes(tensors, metadata=metadata))


def _write_bytes(file: Path, data: bytes) -> None:
    write_new(file, data)  # created new (never over a file), with the umask's mode, fsynced


def _fsync_path(path: Path) -> None:
    if os.name != "posix":  # folders cannot be opened for fsync on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _target(path: Any) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike; got {type(path).__name__}")
    if isinstance(path, str) and not path:
        raise ValueError("path must name a checkpoint folder; got ''")
    return Path(path).resolve()  # a symlinked folder is replaced where it points


def _check_replaceable(target: Path) -> None:
    if not os.path.lexists(target):
        return
    if not target.is_dir():
        raise ValueError(f"path {str(target)!r} exists and is not a folder")
    foreign = sorted(e.name for e in os.scandir(target) if not _is_ours(e))
    if foreign:
        raise ValueError(
            f"path {str(target)!r} holds {foreign[:5]}, which are not part of a TinyLM checkpoint; "
            f"save replaces the whole folder, so give a new or empty folder (or one holding only "
            f"{CONFIG_FILE} and {WEIGHTS_FILE})"
        )


def _is_ours(entry: os.DirEntry) -> bool:
    return entry.name in _FILES and entry.is_file(follow_symlinks=False)


def _sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _make_sibling(target: Path, kind: str) -> Path:
    while True:
        folder = _sibling(target, kind)
        _ACTIVE.add(folder.name)  # before it exists: another thread's cleanup must spare it
        try:
            folder.mkdir()  # not mkdtemp: the folder becomes the checkpoint, so honour the umask
        except FileExistsError:
            continue
        except BaseException:
            _ACTIVE.discard(folder.name)
            raise
        return folder


# ----------------------------------------------------------------------------- the swap


def _swap_in(staging: Path, target: Path) -> None:
    """Make ``staging`` the folder at ``target``; the previous one, if any, ends at ``staging``."""
    if not os.path.lexists(target):
        try:
            os.rename(staging, target)
            return
        except OSError as e:  # another writer created ``target`` meanwhile: exchange instead
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    if _exchange(staging, target):
        return
    aside = _sibling(target, _OLD)
    _ACTIVE.add(aside.name)
    try:
        os.rename(target, aside)  # a kill from here to the next rename: see _recover_and_clean
        try:
            os.rename(staging, target)
        except BaseException:
            os.rename(aside, target)
            raise
        os.rename(aside, staging)
    finally:
        _ACTIVE.discard(aside.name)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders atomically; False where the system cannot (then nothing changed)."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # file system or kernel lacks it
        return False
    raise OSError(err, os.strerror(err), str(b))


def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library without it (glibc < 2.28)
        return None


# ----------------------------------------------------------------------------- leftovers

# Folders this process is writing right now (another thread may be saving beside us).
_ACTIVE: set[str] = set()
_LEFTOVER = re.compile(rf"\.(?P<name>.+)\.(?P<kind>{_NEW}|{_OLD})-(?P<pid>\d+)-[0-9a-f]{{8}}")


def _recover_and_clean(target: Path) -> None:
    """Undo what killed saves of ``target`` left: restore a checkpoint set aside, drop temps."""
    leftovers = [(p, kind) for p, kind, pid in _leftovers(target) if not _alive(p, pid)]
    if not os.path.lexists(target):
        for p, kind in leftovers:
            if kind == _OLD and _complete(p):
                os.rename(p, target)
                break
    for p, _ in leftovers:
        _remove_ours(p)  # a no-op for the folder just restored


def _interrupted_save(target: Path) -> Path | None:
    """The previous checkpoint a save killed mid-swap set aside beside ``target``, if any."""
    for p, kind, _ in _leftovers(target):
        if kind == _OLD and _complete(p):
            return p
    return None


def _leftovers(target: Path) -> list[tuple[Path, str, int]]:
    """Folders beside ``target`` named by a save of ``target``: (path, kind, writer pid)."""
    try:
        entries = list(os.scandir(target.parent))
    except FileNotFoundError:
        return []
    found = []
    for e in entries:
        m = _LEFTOVER.fullmatch(e.name)
        if m and m["name"] == target.name and e.is_dir(follow_symlinks=False):
            found.append((Path(e.path), m["kind"], int(m["pid"])))
    return sorted(found)


def _alive(folder: Path, pid: int) -> bool:
    """Whether the save that made ``folder`` may still be running."""
    if pid == os.getpid():
        return folder.name in _ACTIVE
    if os.name != "posix":  # no safe liveness probe (os.kill would terminate it): keep it
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _FILES)


def _remove_ours(folder: Path) -> None:
    """Delete the checkpoint files in ``folder`` and the folder if that empties it; nothing else."""
    _ACTIVE.discard(folder.name)
    for name in _FILES:
        file = folder / name
        try:
            if file.is_file() and not file.is_symlink():
                file.unlink()
        except OSError:
            pass
    try:
        folder.rmdir()
    except OSError:
        pass


# ----------------------------------------------------------------------------- reading


def read_checkpoint(path: Any) -> tuple[TinyLMConfig, dict[str, Tensor]]:
    """The config and tensors of a checkpoint folder written by :func:`write_checkpoint`.

    Raises:
        TypeError: ``path`` is not a str or os.PathLike.
        FileNotFoundError: a file is missing (and where a killed save set the previous
            checkpoint aside, its location).
        ValueError: ``config.json`` is not a complete, valid TinyLMConfig (a missing key is an
            error, like an unknown one); ``model.safetensors`` is truncated or corrupt, or was
            saved with a different config.
    """
    load = _safetensors().load
    folder = _target(path)
    if os.path.lexists(folder) and not folder.is_dir():
        raise ValueError(f"path {str(folder)!r} is a file; expected a checkpoint folder")
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    config_bytes, weights_bytes = _read_files(folder)
    data = _parse_config_json(config_bytes, config_path)
    config = _config_from_dict(data, config_path)
    try:
        tensors = load(weights_bytes)
        metadata = _safetensors_metadata(weights_bytes)
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(
            f"{weights_path} is not a readable safetensors file (truncated or corrupt?): {e}"
        ) from e
    _check_same_save(data, metadata.get(_CONFIG_KEY), config_path, weights_path)
    return config, tensors


def _check_same_save(data: dict, saved_with: str | None, config_path: Path, weights_path: Path):
    if saved_with is None:  # written before the config was recorded with the weights
        return
    try:
        saved = json.loads(saved_with)
    except json.JSONDecodeError:
        saved = None
    if not isinstance(saved, dict):
        raise ValueError(f"{weights_path} has a corrupt {_CONFIG_KEY!r} metadata entry")
    differ = [
        f"{k}={data.get(k)!r} (weights: {saved.get(k)!r})"
        for k in _ARCHITECTURE
        if data.get(k) != saved.get(k)
    ]
    if differ:
        raise ValueError(
            f"{config_path} and {weights_path} come from different saves: the config says "
            + ", ".join(differ)
        )


def check_state(
    tensors: dict[str, Tensor], expected: dict[str, Tensor], weights_path: Path
) -> None:
    """Raise a ValueError listing what in ``tensors`` does not match the model's state dict."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [
        f"{k}: {shape_str(tensors[k])} {tensors[k].dtype}, expected {shape_str(expected[k])}"
        for k in sorted(set(tensors) & set(expected))
        if tensors[k].shape != expected[k].shape
        or tensors[k].dtype.is_floating_point != expected[k].dtype.is_floating_point
    ]
    problems = [
        f"missing {missing[:5]}" if missing else "",
        f"unexpected {unexpected[:5]}" if unexpected else "",
        f"wrong shape or dtype {wrong[:5]}" if wrong else "",
    ]
    if any(problems):
        raise ValueError(
            f"{weights_path} does not match its config: " + "; ".join(p for p in problems if p)
        )


def _read_files(folder: Path) -> tuple[bytes, bytes]:
    """Both files' bytes, from one folder even while saves swap in new checkpoints.

    Both are read through one handle on the folder, so a swap cannot hand us the config of one
    checkpoint and the weights of another; if a file vanishes because the folder we hold was
    swapped out (and is being removed), we read again from the folder now at ``folder``.
    """
    if not (os.open in os.supports_dir_fd and hasattr(os, "O_DIRECTORY")):
        return _read_one(folder, CONFIG_FILE, None), _read_one(folder, WEIGHTS_FILE, None)
    for _ in range(100):
        try:
            dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        except (FileNotFoundError, NotADirectoryError):
            return _read_one(folder, CONFIG_FILE, None), _read_one(folder, WEIGHTS_FILE, None)
        try:
            held = os.fstat(dir_fd)
            return _read_one(folder, CONFIG_FILE, dir_fd), _read_one(folder, WEIGHTS_FILE, dir_fd)
        except FileNotFoundError:
            try:
                now = os.stat(folder)
            except FileNotFoundError:
                continue  # mid-swap without an exchange: the next try reports it
            if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                raise  # really missing, not swapped out
        finally:
            os.close(dir_fd)
    raise OSError(f"{str(folder)!r} kept being replaced while it was read; try again")


def _read_one(folder: Path, name: str, dir_fd: int | None) -> bytes:
    try:
        if dir_fd is None:
            return (folder / name).read_bytes()
        fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
        with open(fd, "rb") as f:
            return f.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        pass
    aside = _interrupted_save(folder) if not folder.exists() else None
    hint = (
        f"; a save killed mid-swap left the previous checkpoint at {str(aside)!r} (the next "
        "save to this path restores it, or rename it back)"
        if aside
        else ""
    )
    raise FileNotFoundError(
        f"no TinyLM at {str(folder)!r}: {name} is missing (expected a folder written by "
        f"TinyLM.save with {CONFIG_FILE} and {WEIGHTS_FILE}){hint}"
    )


def _safetensors_metadata(data: bytes) -> dict:
    # The format: an 8-byte little-endian header length, then the JSON header.
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def _parse_config_json(text: bytes, config_path: Path) -> dict:
    try:
        data = json.loads(text.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{config_path} must hold a JSON object; got {type(data).__name__}")
    return data


def _config_from_dict(data: dict, config_path: Path) -> TinyLMConfig:
    known = [f.name for f in fields(TinyLMConfig)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{config_path} has unknown TinyLMConfig fields {unknown}")
    # No defaults: a config that lost "rope" must not load as a model without RoPE.
    missing = [name for name in known if name not in data]
    if missing:
        raise ValueError(f"{config_path} is missing TinyLMConfig fields {missing}")
    try:
        return TinyLMConfig(**data)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config_path} is not a valid TinyLMConfig: {e}") from e


def _safetensors():
    try:
        from safetensors.torch import load, save
    except ImportError as e:
        raise ImportError(
            "TinyLM.save/load need the safetensors package: pip install 'relattn[models]'"
        ) from e
    return SimpleNamespace(load=load, save=save)
