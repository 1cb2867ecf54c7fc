"""Autocast regions shared by the backbones.

The trunk of a backbone may run in low precision (the caller's autocast, or its own with
`fp16=True` in the dtype `utils.amp.low_precision_dtype` chooses); the embedding head and
the attention softmax always run in float32, because their sums over thousands of terms
lose the identity information in half precision.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

from utils.amp import low_precision_dtype  # the one rule for which half precision a device gets


def _autocast_available(device_type: str) -> bool:
    # CPU and CUDA answered without the C call: torch.compile in torch < 2.13 cannot trace
    # it, and a graph break in every block makes the compiled model slower than eager.
    return device_type in ("cpu", "cuda") or torch.amp.is_autocast_available(device_type)


def trunk_autocast(device_type: str, enabled: bool) -> ContextManager:
    """Autocast for a backbone built with fp16=True; otherwise leave the caller's setting."""
    if not enabled or not _autocast_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=low_precision_dtype(device_type))


def float32_region(device_type: str) -> ContextManager:
    """Autocast switched off, even inside a caller's autocast; use with inputs cast by `.float()`."""
    if not _autocast_available(device_type):  # e.g. the meta device
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)
