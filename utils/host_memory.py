"""Host-memory settings that make CPU training faster.

PyTorch's CPU allocator returns every large tensor to the operating system when it is
freed, so the next step maps the same amount again, one 4 KiB page fault at a time.
A training step frees and re-creates many [batch x channels x 112 x 112] activations
and, in PartialFC, [sampled classes x 512] matrices; on a 2-core machine those faults
cost more than the arithmetic (gathering 100k class centres: 146 ms with 4 KiB pages,
28 ms with 2 MiB pages). With THP_MEM_ALLOC_ENABLE=1 the allocator asks the kernel for
transparent huge pages for tensors of 2 MiB and more (a PyTorch setting, read at the
process's first large allocation; it is a no-op where the kernel has THP disabled).
"""
from __future__ import annotations

import os

THP_VARIABLE = "THP_MEM_ALLOC_ENABLE"


def enable_huge_pages() -> None:
    """Ask PyTorch's CPU allocator for huge pages, unless the user set the variable.

    Call it before the process allocates its first large tensor; DataLoader workers
    inherit it.
    """
    os.environ.setdefault(THP_VARIABLE, "1")
