# Two entry points, each self-sufficient on a brand-new machine: a local virtual environment with
# what pyproject.toml declares, at the versions requirements/lock.txt pins (torch pinned to the
# CPU wheel this machine kind carries; an unpinned torch would pull several GB of CUDA wheels).
PYTHON ?= python3
TORCH ?= torch==2.13.0
LOCK := requirements/lock.txt
VENV := .venv
BIN := $(VENV)/bin
# `make demo` installs what the demo needs (torch, matplotlib, safetensors: about 1 GB on disk);
# `make test` adds the development tools on top (triton, transformers, mypy, mkdocs, ...).
DEMO_STAMP := $(VENV)/.demo-stamp
STAMP := $(VENV)/.installed-stamp
LATEST := .venv-latest
PIP_INSTALL = python -m pip install --disable-pip-version-check

.PHONY: demo test test-hf-floor test-sanitize test-latest lock explain docs gpu-compile gpu-check

$(DEMO_STAMP): pyproject.toml $(LOCK)
	@echo "relattn: creating $(VENV)/ with $(TORCH) (CPU wheel, about 200 MB to download) and the demo's packages (matplotlib, safetensors)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/$(PIP_INSTALL) --progress-bar on -c $(LOCK) $(TORCH)
	$(BIN)/$(PIP_INSTALL) --progress-bar on -c $(LOCK) -e ".[plot,models]"
	touch $@

$(STAMP): $(DEMO_STAMP)
	@echo "relattn: adding the development tools to $(VENV)/ (triton, transformers, pytest, mypy, ruff, mkdocs; about 1.5 GB)"
	$(BIN)/$(PIP_INSTALL) -q -c $(LOCK) -e ".[dev]"
	touch $@

demo: $(DEMO_STAMP)
	$(BIN)/relattn demo

explain: $(DEMO_STAMP)
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
	$(MAKE) --no-print-directory test-hf-floor
	$(MAKE) --no-print-directory test-sanitize

# The transformers integration on the oldest release the package accepts (the lock pins the
# newest checked one): that release alone, in a folder put ahead of the environment's.
HF_FLOOR := $(VENV)/hf-floor
test-hf-floor: $(STAMP)
	@test -f $(HF_FLOOR)/.stamp || { rm -rf $(HF_FLOOR) && \
	  $(BIN)/$(PIP_INSTALL) -q --no-deps --target $(HF_FLOOR) -r requirements/hf-floor.txt && \
	  touch $(HF_FLOOR)/.stamp; }
	PYTHONPATH=$(HF_FLOOR) $(BIN)/python -m pytest -n 2 -q -p no:cacheprovider \
	  tests/test_hf_models.py tests/test_hf_errors.py tests/test_hf_examples.py

# The newest releases pyproject.toml allows (torch stays $(TORCH): pass TORCH=torch==X to try
# another), in a fresh $(LATEST)/: drift shows here before users meet it. Not run by CI.
$(LATEST)/.stamp: pyproject.toml
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/$(PIP_INSTALL) -q $(TORCH)
	$(LATEST)/bin/$(PIP_INSTALL) -q --upgrade -e ".[dev]"
	touch $@

test-latest:
	rm -f $(LATEST)/.stamp
	$(MAKE) --no-print-directory $(LATEST)/.stamp
	$(LATEST)/bin/python -m pip list --format=freeze | grep -iE '^(torch|triton|transformers|hypothesis|numpy)=='
	$(LATEST)/bin/ruff check .
	$(LATEST)/bin/mypy
	NO_MKDOCS_2_WARNING=1 $(LATEST)/bin/mkdocs build --strict -q -d site
	$(LATEST)/bin/python -m pytest -n 2 -q

# Rewrite requirements/lock.txt from the newest releases (see CONTRIBUTING.md: run
# `make test-latest` first, and commit the lock only with a green `make test`).
lock:
	rm -f $(LATEST)/.stamp
	$(MAKE) --no-print-directory $(LATEST)/.stamp
	tools/lock.sh $(LATEST)/bin/python > $(LOCK)
	@echo "relattn: wrote $(LOCK); now rm -rf $(VENV) && make test"

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
