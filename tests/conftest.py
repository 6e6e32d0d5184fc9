"""Test environment only: helpers live in oracle.py (float64 math) and cases.py (inputs)."""

import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when its kernels are defined (at import of the backend), so it
# must be set before any test imports relattn's triton backend.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
