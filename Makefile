# Quick start: `make demo` (train on synthetic faces on CPU) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# Byte code: the packages are installed without it (--no-compile, below), and a module is
# compiled on its first import into .venv/pycache for every later run, also where the
# environment sets PYTHONDONTWRITEBYTECODE (these machines' does). Without this every process
# compiled its imports again: `import torch` 2.5 s -> 4-7 s, and `make test` starts hundreds of
# processes (CI: 957 s -> 1779 s). The prefix keeps the byte code out of the source folders.
export PYTHONPYCACHEPREFIX := $(CURDIR)/$(VENV)/pycache
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup test soak demo bench bench-avx2 clean

setup: $(STAMP)

# Re-install only when the pinned requirements change.
# uv (pinned in requirements-setup.txt) installs the requirements: it unpacks the wheels in parallel
# and links them from its cache (measured on 2 cores, cold caches: 54 s with pip -> 17 s, the uv
# wheel's own install included), and like pip's --no-compile it writes no byte code (see
# PYTHONPYCACHEPREFIX above). uv does not read pip's configuration, so the find-links pip is
# configured with (where these machines keep torch's local CPU build) are handed on to it; without
# any, torch==2.13.0 comes from PyPI, as with pip. pip is installed into the venv too, for users.
# The venv is made without pip, and the system's pip (22.3 or newer: --python) installs uv into it:
# `venv` with pip runs ensurepip, which compiles pip's own files (11 s on 2 cores).
# Where the system has no such pip, or uv cannot be had or fails, pip installs everything.
$(STAMP): requirements.txt requirements-setup.txt
	$(PYTHON) -m venv --without-pip $(VENV)
	@links=""; for link in $$($(PYTHON) -m pip config get global.find-links 2>/dev/null); do \
		links="$$links --find-links $$link"; done; \
	if $(PYTHON) -m pip --python $(PY) install --quiet --no-compile -r requirements-setup.txt >/dev/null 2>&1 && \
		echo "$(VENV)/bin/uv pip install --python $(PY)$$links pip -r requirements.txt" && \
		$(VENV)/bin/uv pip install --quiet --python $(PY)$$links pip -r requirements.txt; then :; \
	elif $(PYTHON) -m pip --python $(PY) --version >/dev/null 2>&1; then \
		echo "$(PYTHON) -m pip --python $(PY) install --no-compile pip -r requirements.txt"; \
		$(PYTHON) -m pip --python $(PY) install --quiet --no-compile pip -r requirements.txt; \
	else \
		echo "$(PY) -m ensurepip; $(PY) -m pip install --no-compile --upgrade pip -r requirements.txt"; \
		$(PY) -m ensurepip --upgrade --default-pip >/dev/null && \
		$(PY) -m pip install --quiet --no-compile --upgrade pip -r requirements.txt; \
	fi
	touch $(STAMP)

# The suite without the long soak and requeue tests (@pytest.mark.slow); `make soak` runs those.
# The 25 slowest tests are listed at the end, to keep the suite's time in view.
# Two pytest-xdist workers, one test file each at a time (a file's module fixtures are built once):
# much of the suite is processes starting and importing torch on one core, so a second worker fills
# the other. 2-core Sapphire Rapids, 2026-12-02: 754 s against 1026 s in one process, the same
# 748 tests passed (another such host, 2026-12-02 15:45 UTC: 753 tests in 328 s). TEST_WORKERS=0 runs
# it in the pytest process itself; more workers for more cores.
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile --durations=25 tests

soak: setup
	$(PY) -m pytest -q -m slow tests

# A fresh run each time (the drawn data set in data/synthetic_faces is reused).
demo: setup
	rm -rf work_dirs/demo
	$(PY) train.py configs/demo.py

bench: setup
	$(PY) bench/run_all.py

# The same suite with torch's, oneDNN's and MKL's kernels held to AVX2 (on an AVX512/AMX machine):
# the code paths of an AVX2-only CPU, written to docs/bench_results/cpu_avx2.json.
AVX2_ONLY := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
bench-avx2: setup
	$(AVX2_ONLY) $(PY) bench/run_all.py

clean:
	rm -rf work_dirs .pytest_cache
