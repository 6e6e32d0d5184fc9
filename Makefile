# Two entry points, each self-sufficient on a brand-new machine: a local virtual environment with
# exactly what pyproject.toml declares (torch pinned to the CPU wheel this machine kind carries;
# an unpinned torch would pull several GB of CUDA wheels).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-sanitize explain docs gpu-compile gpu-check

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/relattn demo

explain: $(STAMP)
	$(BIN)/relattn explain "The quick brown fox" --query 2

# The documentation site, with every warning an error (a broken link, reference or example fails).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d site

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -q -d site
	$(BIN)/python -m pytest -n 2 -q
	$(MAKE) test-sanitize

# The C++ CPU kernel built with AddressSanitizer + UBSan, the tests that reach it run against
# that build, after proving that a deliberate off-by-one is reported (tools/sanitize.py).
test-sanitize: $(STAMP)
	$(BIN)/python tools/sanitize.py

# Every Triton kernel compiled for A100 (sm_80) and H100 (sm_90a) without a GPU: the resource table.
gpu-compile: $(STAMP)
	$(BIN)/python tools/gpu_compile.py --table gpu-compile.md --json gpu-compile.json

# The whole GPU check on a CUDA machine, offline, with that machine's own python3 (nothing is
# installed): tests with CUDA tensors, then the GPU benchmark; results in $$OUT or ./gpu-check/.
gpu-check:
	PYTHONPATH=src $(PYTHON) tools/gpu_check.py
