"""Run as `python bench/X.py`, a benchmark has `bench/` on sys.path, not the repository
root that holds `bench`, `utils`, `backbones`, ...; importing this module first adds the
root. The one place for the benchmarks (tools/_cli.py does the same for the tools; the
tests get it from pytest's `pythonpath` in pyproject.toml). Imported by name only when
a file runs as a script: as `bench.X` the root is already on the path.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
