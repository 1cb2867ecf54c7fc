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
# The venv is made without pip, and the system's pip (22.3 or newer: --python) installs pip and
# the requirements into it: `venv` with pip runs ensurepip, which compiles pip's own files, and
# upgrading that pip compiles them again (measured on 2 cores: 11.3 s + 5.6 s; without: 0.5 s).
# Where the system has no such pip, the venv brings its own.
# --no-compile: Python compiles only the modules a run imports, on first import (see
# PYTHONPYCACHEPREFIX above), instead of every file of every package at install (measured on 2
# cores: 62 s -> 31 s to install, +4.5 s on the first import of torch, cv2, onnx, onnxruntime,
# matplotlib, tensorboard).
$(STAMP): requirements.txt
	$(PYTHON) -m venv --without-pip $(VENV)
	@if $(PYTHON) -m pip --python $(PY) --version >/dev/null 2>&1; then \
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
test: setup
	$(PY) -m pytest -q -m "not slow" --durations=25 tests

soak: setup
	$(PY) -m pytest -q -m slow tests

# A fresh run each time (the drawn data set in data/synthetic_faces is reused).
demo: setup
	rm -rf work_dirs/demo
	$(PY) train.py configs/demo.py

bench: setup
	$(PY) bench/run_all.py

# The same suite with torch's and oneDNN's kernels held to AVX2 (on an AVX512/AMX machine):
# the code paths of an AVX2-only CPU, written to docs/bench_results/cpu_avx2.json.
bench-avx2: setup
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 $(PY) bench/run_all.py

clean:
	rm -rf work_dirs .pytest_cache
