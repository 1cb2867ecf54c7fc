"""Activation checkpointing per block that keeps BatchNorm's running statistics right.

Checkpointing re-runs a block's forward during backward. A BatchNorm in training mode
would then fold the same batch into running_mean / running_var a second time and bump
num_batches_tracked twice. The recomputation therefore runs inside a context that
snapshots those buffers and puts them back afterwards; the recomputed activations are
unaffected, because in training mode BatchNorm normalises with the batch statistics.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@contextlib.contextmanager
def _running_stats_restored(module: nn.Module) -> Iterator[None]:
    buffers = [b for m in _batchnorms(module) for b in (m.running_mean, m.running_var, m.num_batches_tracked)
               if b is not None]
    with torch.no_grad():
        snapshot = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, snapshot):
                buffer.copy_(value)


def _has_batchnorm(module: nn.Module) -> bool:
    return bool(_batchnorms(module))


def checkpointed(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """block(x), keeping only x for backward and recomputing the rest there."""
    if torch.compiler.is_compiling() or not _has_batchnorm(block):
        # Compiled graphs recompute inside the graph, where the buffer updates were
        # functionalised into the forward and are not repeated; no context is needed.
        return checkpoint(block, x, use_reentrant=False)
    return checkpoint(
        block, x, use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), _running_stats_restored(block)),
    )
