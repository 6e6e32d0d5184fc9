"""Test environment only: helpers live in oracle.py (float64 math) and cases.py (inputs)."""

import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when its kernels are defined (at import of the backend), so it
# must be set before any test imports relattn's triton backend.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _patch_triton_language_once_per_launch() -> None:
    """Test speed only, the kernels run as before: Triton's interpreter (3.x) patches
    ``triton.language`` for a launch (``_patch_lang``, undone when the launch ends) and then
    again on every call of a ``@triton.jit`` helper inside it, each time walking the modules'
    members (``inspect.getmembers``), about a third of an interpreted kernel's time. A helper's
    call whose language modules the running launch has already patched gets that launch's
    patches as they are; any other call (a launch, a helper seeing another module) is patched
    as Triton does."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    real_patch = getattr(interpreter, "_patch_lang", None)
    executor = getattr(interpreter, "GridExecutor", None)
    if real_patch is None or executor is None:
        return
    real_launch = executor.__call__
    launches: list[set[int] | None] = []  # per running launch: the modules it has patched

    def langs(fn) -> set[int]:
        return {id(v) for v in fn.__globals__.values() if v is tl or v is tl.core}

    class _Nothing:
        def restore(self) -> None:
            pass

    def patch_lang(fn):
        if not launches:  # outside a launch: as Triton does
            return real_patch(fn)
        mine = langs(fn)
        if launches[-1] is None:  # the launch's own patches, undone when it ends
            launches[-1] = mine
            return real_patch(fn)
        if mine <= launches[-1]:  # a helper inside the launch: already patched
            return _Nothing()
        launches[-1] |= mine  # a helper seeing another module: as Triton does
        return real_patch(fn)

    def launch(self, *args, **kwargs):
        launches.append(None)
        try:
            return real_launch(self, *args, **kwargs)
        finally:
            launches.pop()

    interpreter._patch_lang = patch_lang
    executor.__call__ = launch


_patch_triton_language_once_per_launch()

# pytest-xdist runs one worker per core: a worker using every core's threads fights the others
# (tiny ops become up to 200x slower), so each worker uses one thread.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running; `make test` runs it too")
    config.addinivalue_line("markers", "gpu: needs a CUDA device (run by `make gpu-check`)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; `make gpu-check` runs it on a GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
