# Quick start: `make demo` (train on synthetic faces on CPU) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test demo bench clean

setup: $(STAMP)

# Re-install only when the pinned requirements change.
$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q tests

# A fresh run each time (the drawn data set in data/synthetic_faces is reused).
demo: setup
	rm -rf work_dirs/demo
	$(PY) train.py configs/demo.py

bench: setup
	$(PY) bench/run_all.py

clean:
	rm -rf work_dirs .pytest_cache
