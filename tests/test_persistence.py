"""TinyLM checkpoints are replaced atomically: a failed, killed or size-limited save leaves the
previous checkpoint loadable and bit-identical; leftovers are cleaned, and only our own files."""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import relattn
from relattn.models import TinyLM, TinyLMConfig, checkpoint

CONFIG = {"d_model": 32, "num_heads": 2, "num_layers": 2, "vocab_size": 64}


def build(seed: int, **kw) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(TinyLMConfig(**{**CONFIG, **kw})).eval()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def same_model(a: TinyLM, b: TinyLM) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return (
        a.config == b.config
        and sa.keys() == sb.keys()
        and all(torch.equal(sa[k], sb[k]) for k in sa)
    )


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name != folder.name)


@pytest.fixture
def old(tmp_path):
    """A saved checkpoint at tmp_path/"ckpt"/"m": (model, folder, its files' bytes)."""
    model = build(0)
    folder = tmp_path / "ckpt" / "m"
    model.save(folder)
    return model, folder, snapshot(folder)


def assert_intact(old_model: TinyLM, folder: Path, files: dict[str, bytes]) -> None:
    assert snapshot(folder) == files
    assert same_model(TinyLM.load(folder), old_model)


def test_save_over_a_checkpoint_replaces_it_and_leaves_nothing_beside_it(old):
    _, folder, files = old
    new = build(1, rope=True)
    new.save(folder)
    assert same_model(TinyLM.load(folder), new)
    assert snapshot(folder).keys() == files.keys()
    assert leftovers(folder) == []


def _raise_enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device (injected)")


def _half_then_enospc(file, tensors, metadata, to_bytes):
    data = to_bytes(tensors, metadata=metadata)
    file.write_bytes(data[: len(data) // 2])
    _raise_enospc()


def _fsync_fails_on_the_staging_folder(path):
    if ".relattn-save-" in Path(path).name:
        _raise_enospc()


FAULTS = {
    "config write": ("_write_text", _raise_enospc),
    "weights write, after the config": ("_write_weights", _raise_enospc),
    "weights write, midway": ("_write_weights", _half_then_enospc),
    "fsync": ("_fsync_path", _fsync_fails_on_the_staging_folder),
    "exchange": ("_exchange", _raise_enospc),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_a_failing_write_leaves_the_previous_checkpoint(old, monkeypatch, fault):
    old_model, folder, files = old
    name, replacement = FAULTS[fault]
    monkeypatch.setattr(checkpoint, name, replacement)
    with pytest.raises(OSError, match="injected"):
        build(1, pe="alibi").save(folder)
    assert_intact(old_model, folder, files)
    assert leftovers(folder) == []  # the partial files are removed


def test_a_failing_second_rename_without_exchange_restores_the_previous_checkpoint(
    old, monkeypatch
):
    old_model, folder, files = old
    monkeypatch.setattr(checkpoint, "_exchange", lambda a, b: False)
    real = os.rename

    def rename(a, b):
        if ".relattn-save-" in Path(a).name and Path(b) == folder:
            _raise_enospc()
        real(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="injected"):
        build(1).save(folder)
    monkeypatch.setattr(os, "rename", real)
    assert_intact(old_model, folder, files)
    assert leftovers(folder) == []
    new = build(2)
    new.save(folder)  # the two-rename path on its own works too
    assert same_model(TinyLM.load(folder), new) and leftovers(folder) == []


def test_a_failing_first_save_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "_write_weights", _raise_enospc)
    with pytest.raises(OSError, match="injected"):
        build(0).save(tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- other processes

CHILD = r"""
import json, os, resource, signal, sys, time
import torch
from relattn.models import TinyLM, TinyLMConfig, checkpoint

mode, path, config = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])

def block():
    print("ready", flush=True)
    time.sleep(600)

if mode == "weights":  # killed with half of the weights file on disk
    def write_half(file, tensors, metadata, to_bytes):
        data = to_bytes(tensors, metadata=metadata)
        with open(file, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
        block()
    checkpoint._write_weights = write_half
elif mode == "swapped":  # killed after the swap, before the previous checkpoint is removed
    swap = checkpoint._swap_in
    checkpoint._swap_in = lambda a, b: (swap(a, b), block())
elif mode == "aside":  # no exchange: killed between its two renames
    checkpoint._exchange = lambda a, b: False
    rename = os.rename
    def rename_then_block(a, b):
        rename(a, b)
        if ".relattn-old-" in str(b):
            block()
    os.rename = rename_then_block
elif mode.startswith("fsize"):  # a file-size limit far below the weights' size
    # Python ignores SIGXFSZ (a write past the limit fails with EFBIG); by default the signal
    # kills the process mid-write.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN if mode == "fsize-error" else signal.SIG_DFL)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

torch.manual_seed(1)
model = TinyLM(TinyLMConfig(**config))
try:
    model.save(path)
except Exception as e:
    print("error", type(e).__name__, e, flush=True)
    sys.exit(3)
print("saved", flush=True)
"""


def start_child(mode: str, folder: Path, **config) -> subprocess.Popen:
    env = dict(os.environ)
    src = str(Path(relattn.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    args = [sys.executable, "-c", CHILD, mode, str(folder), json.dumps({**CONFIG, **config})]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def kill_when_ready(proc: subprocess.Popen) -> None:
    """Wait until the child blocks inside save, then SIGKILL it: the same instant every run."""
    ready, _, _ = select.select([proc.stdout], [], [], 300)
    line = proc.stdout.readline() if ready else b""
    if line != b"ready\n":
        proc.kill()
        pytest.fail(f"child never blocked: {line!r} {proc.communicate()[1].decode()[-2000:]}")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(60) == -signal.SIGKILL
    proc.stdout.close()
    proc.stderr.close()


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL and RLIMIT_FSIZE are POSIX")
def test_killed_while_writing_the_weights(old):
    old_model, folder, files = old
    kill_when_ready(start_child("weights", folder, pe="alibi"))
    assert_intact(old_model, folder, files)
    (stale,) = leftovers(folder)  # the dead save's folder, with its half-written weights
    assert ".relattn-save-" in stale
    new = build(2)
    new.save(folder)  # removes the dead save's folder
    assert same_model(TinyLM.load(folder), new) and leftovers(folder) == []


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL is POSIX")
def test_killed_after_the_swap_the_new_checkpoint_is_complete(old):
    _, folder, _ = old
    kill_when_ready(start_child("swapped", folder, rope=True))
    assert same_model(TinyLM.load(folder), build(1, rope=True))
    assert len(leftovers(folder)) == 1  # the previous checkpoint, no longer needed
    build(2).save(folder)
    assert leftovers(folder) == []


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL is POSIX")
def test_killed_between_the_two_renames_the_next_save_restores_the_previous_one(old, monkeypatch):
    old_model, folder, files = old
    kill_when_ready(start_child("aside", folder, num_kv_heads=1))
    with pytest.raises(FileNotFoundError, match="previous checkpoint at .*relattn-old-"):
        TinyLM.load(folder)
    aside = next(folder.parent.glob(".m.relattn-old-*"))
    assert snapshot(aside) == files
    # The next save first renames the previous checkpoint back; if that save then fails,
    # the previous checkpoint is where it was.
    monkeypatch.setattr(checkpoint, "_write_weights", _raise_enospc)
    with pytest.raises(OSError, match="injected"):
        build(3).save(folder)
    assert_intact(old_model, folder, files)
    assert leftovers(folder) == []  # the dead save's new folder is gone too


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE")
@pytest.mark.parametrize("mode", ["fsize-error", "fsize-signal"])
def test_a_file_size_limit_leaves_the_previous_checkpoint(old, mode):
    old_model, folder, files = old
    proc = start_child(mode, folder)
    out, err = proc.communicate(timeout=300)
    if mode == "fsize-error":  # EFBIG: save raises, removes its partial files
        assert proc.returncode == 3, err.decode()[-2000:]
        assert b"File too large" in out, out
        assert leftovers(folder) == []
    else:  # the default action of SIGXFSZ kills the process mid-write
        assert proc.returncode == -signal.SIGXFSZ, err.decode()[-2000:]
    assert_intact(old_model, folder, files)
    build(2).save(folder)
    assert leftovers(folder) == []


# ----------------------------------------------------------------------------- only our own


def test_a_folder_holding_other_files_is_refused_untouched(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"path .*notes\.txt"):
        build(0).save(folder)
    assert snapshot(folder) == {"notes.txt": b"mine"} and leftovers(folder) == []
    with pytest.raises(ValueError, match="not a folder"):
        build(0).save(folder / "notes.txt")


def test_leftovers_of_a_live_writer_or_with_other_files_are_kept(old):
    _, folder, _ = old
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        live = folder.parent / f".m.relattn-save-{sleeper.pid}-0123abcd"
        live.mkdir()
        (live / "model.safetensors").write_bytes(b"being written")
        build(1).save(folder)
        assert live.is_dir() and (live / "model.safetensors").read_bytes() == b"being written"
    finally:
        sleeper.kill()
        sleeper.wait()
    dead = folder.parent / f".m.relattn-save-{sleeper.pid}-4567cdef"
    dead.mkdir()
    (dead / "config.json").write_text("{}")
    (dead / "notes.txt").write_text("not a checkpoint file")
    unrelated = folder.parent / ".m.backup"
    unrelated.mkdir()
    (unrelated / "config.json").write_text("{}")
    build(2).save(folder)
    assert not live.exists()  # its writer is gone now: removed
    assert snapshot(dead) == {"notes.txt": b"not a checkpoint file"}  # only our file removed
    assert snapshot(unrelated) == {"config.json": b"{}"}  # not named by a save: untouched


def test_a_symlinked_checkpoint_is_replaced_where_it_points(old, tmp_path):
    _, folder, _ = old
    link = tmp_path / "link"
    link.symlink_to(folder, target_is_directory=True)
    new = build(1)
    new.save(link)
    assert link.is_symlink() and same_model(TinyLM.load(folder), new)


# ----------------------------------------------------------------------------- concurrency


def test_loads_during_saves_see_one_whole_checkpoint(old):
    """A reader never gets the config of one save with the weights of another."""
    _, folder, _ = old
    a, b = build(1, rope=True), build(2, rope=False)  # same shapes, different models
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer():
        try:
            for i in range(30):
                (a if i % 2 else b).save(folder)
        except BaseException as e:  # reported by the main thread
            errors.append(e)
        finally:
            stop.set()

    thread = threading.Thread(target=writer)
    thread.start()
    loads = 0
    while not stop.is_set() or loads == 0:
        loaded = TinyLM.load(folder)
        assert loaded.config in (a.config, b.config, build(0).config)
        assert any(same_model(loaded, m) for m in (a, b, build(0)))
        loads += 1
    thread.join()
    assert not errors, errors
    assert leftovers(folder) == []


def test_concurrent_saves_leave_one_complete_checkpoint(old):
    _, folder, _ = old
    models = [build(1, pe="kerple"), build(2, rope=True)]
    errors: list[BaseException] = []

    def saver(model):
        try:
            for _ in range(10):
                model.save(folder)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=saver, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert any(same_model(TinyLM.load(folder), m) for m in models)
    assert leftovers(folder) == []


# ----------------------------------------------------------------------------- load


def test_a_config_missing_a_key_is_an_error_not_a_default(old):
    """The report's case: a RoPE model whose config lost "rope" must not load without RoPE."""
    folder = old[1]
    build(1, rope=True).save(folder)
    config = json.loads((folder / "config.json").read_text())
    del config["rope"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"missing TinyLMConfig fields \['rope'\]"):
        TinyLM.load(folder)


def test_config_and_weights_from_different_saves_are_refused(old, tmp_path):
    _, folder, _ = old
    build(1, rope=True).save(tmp_path / "rope")
    (folder / "model.safetensors").write_bytes(
        (tmp_path / "rope" / "model.safetensors").read_bytes()
    )
    with pytest.raises(ValueError, match=r"different saves.*rope=False \(weights: True\)"):
        TinyLM.load(folder)


def test_runtime_fields_may_be_edited_between_save_and_load(old):
    _, folder, _ = old
    config = json.loads((folder / "config.json").read_text())
    config.update(dropout=0.1, max_seq_len=64, backend="reference")
    (folder / "config.json").write_text(json.dumps(config))
    loaded = TinyLM.load(folder)
    assert (loaded.config.dropout, loaded.config.max_seq_len) == (0.1, 64)


def _write_weights_without_config(folder: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda t: t.pop("norm.weight"), r"missing \['norm.weight'\]"),
        (lambda t: t.update(extra=torch.zeros(2)), r"unexpected \['extra'\]"),
        (lambda t: t.update({"norm.bias": torch.zeros(31)}), r"norm.bias: \(31\)"),
        (lambda t: t.update({"norm.bias": torch.zeros(32, dtype=torch.long)}), "norm.bias"),
    ],
    ids=["missing", "unexpected", "shape", "dtype"],
)
def test_weights_that_do_not_match_the_config(old, edit, match):
    """Also for files from before the config was recorded with the weights."""
    model, folder, _ = old
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    edit(tensors)
    _write_weights_without_config(folder, tensors)
    with pytest.raises(ValueError, match=f"model.safetensors does not match its config: .*{match}"):
        TinyLM.load(folder)


def test_weights_without_recorded_config_still_load(old):
    model, folder, _ = old
    _write_weights_without_config(folder, dict(model.state_dict()))
    assert same_model(TinyLM.load(folder), model)


@pytest.mark.parametrize("keep", [0, 7, 8, 100, 0.5, -1])
def test_a_truncated_weights_file_is_a_clear_error_naming_it(old, keep):
    _, folder, files = old
    data = files["model.safetensors"]
    cut = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    (folder / "model.safetensors").write_bytes(data[:cut])
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors"):
        TinyLM.load(folder)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_round_trip_keeps_the_dtype(tmp_path, dtype):
    model = build(0, pe="kerple", rope=True).to(dtype)
    model.save(tmp_path / "m")
    loaded = TinyLM.load(tmp_path / "m")
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    assert same_model(loaded, model)
    assert all(p.requires_grad for p in loaded.parameters())
