"""Splitting row-wise work on a large [rows x D] matrix into pieces.

On a CPU, a sequence of element-wise operations over a [k x D] matrix streams it
through memory once per operation, and each fresh [k x D] temporary is mapped page
by page. Done piece by piece, a piece stays in the last-level cache between
operations and its temporaries are reused from the heap. The pieces are not made
smaller than a few MiB: every operation is a parallel region whose threads must all
arrive, which costs most when other processes share the cores. On an accelerator
the pieces are large, so that the number of kernel launches stays small.
"""
from __future__ import annotations

import torch

CPU_CHUNK_BYTES = 4 * 1024 * 1024
ACCELERATOR_CHUNK_BYTES = 256 * 1024 * 1024


def row_slices(num_rows: int, row_bytes: int, device: torch.device) -> list[slice]:
    """Consecutive slices covering range(num_rows), each about one chunk's worth of bytes."""
    budget = CPU_CHUNK_BYTES if device.type == "cpu" else ACCELERATOR_CHUNK_BYTES
    step = max(1, budget // max(1, row_bytes))
    return [slice(i, min(i + step, num_rows)) for i in range(0, num_rows, step)]
