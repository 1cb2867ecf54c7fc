"""torch.compile as our runs call it: with inductor's on-disk cache kept apart per CPU capability.

torch 2.13's inductor keys its FX-graph cache without the vector ISA that
`ATEN_CPU_CAPABILITY` selects, yet the C++ it generates is written for that ISA. A graph
compiled in one process and served from the cache in a process with another capability is
wrong. Measured on a 2-core AMD EPYC (Zen 5, AVX512), the PReLU gradient compiled with the
capability unset, then loaded with `ATEN_CPU_CAPABILITY=avx2`: every result wrong (errors
of 5 in the input's gradient, 1e16 in the slope's), no warning; loaded with `=default` (no
vectorisation): a C++ compile error; compiled under `avx2`, loaded with it unset: the
process died with "double free or corruption". The variable is how this project holds
torch to AVX2 to measure what an AVX2-only CPU runs (`make bench-avx2`, README), so one
machine does run under both. Each capability gets its own cache directory below.
"""
from __future__ import annotations

import os
import re

import torch

CAPABILITY_VARIABLE = "ATEN_CPU_CAPABILITY"
CACHE_DIR_VARIABLE = "TORCHINDUCTOR_CACHE_DIR"


def inductor_cache_dir_for_capability() -> str | None:
    """Point inductor's cache at a directory of the process's `ATEN_CPU_CAPABILITY` (a
    subdirectory of the cache it would use otherwise) and return it; None, and nothing
    changed, where the variable is unset (torch picks the CPU's own ISA: the default cache)."""
    capability = os.environ.get(CAPABILITY_VARIABLE, "").strip().lower()
    if not capability:
        return None
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    # cache_dir() is the directory inductor would use now: the user's TORCHINDUCTOR_CACHE_DIR,
    # or its default (which it then writes into that variable itself).
    base = cache_dir()
    suffix = "aten_cpu_capability_" + re.sub(r"[^a-z0-9_]", "_", capability)
    if os.path.basename(base) != suffix:
        base = os.path.join(base, suffix)
    os.environ[CACHE_DIR_VARIABLE] = base
    return base


def compile_module(module: torch.nn.Module, **options) -> torch.nn.Module:
    """`torch.compile(module, **options)` with the cache of this CPU capability."""
    inductor_cache_dir_for_capability()
    return torch.compile(module, **options)
