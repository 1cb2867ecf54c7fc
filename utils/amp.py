"""Choosing the training precision for the device at hand: the one place that decides
which low-precision dtype a device gets (the backbones' own `fp16=True` autocast asks
`low_precision_dtype` here; the PartialFC head receives the run's dtype)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Precision:
    name: str  # "fp32" | "bf16" | "fp16"
    autocast_dtype: torch.dtype | None  # None: no autocast
    use_grad_scaler: bool

    @property
    def low_precision(self) -> bool:
        return self.autocast_dtype is not None


def low_precision_dtype(device_type: str) -> torch.dtype:
    """The half-precision dtype of insightface's `fp16=True` on this kind of device: float16
    on CUDA (trained with a GradScaler), bfloat16 elsewhere, where float16 autocast is missing
    or slow and bfloat16 needs no loss scaling."""
    return torch.float16 if device_type == "cuda" else torch.bfloat16


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bfloat16 matrix units make autocast pay off on this device.

    CPUs without AMX / AVX512-BF16 emulate bf16 and run it several times slower than
    fp32 (measured: 5x slower convolutions on an AVX2-only EPYC), so it is only chosen
    where oneDNN reports native support.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve_precision(requested: str, fp16: bool, device: torch.device) -> Precision:
    """requested: auto | fp32 | bf16 | fp16. `fp16=True` (insightface's key) means float16 + GradScaler on CUDA."""
    if requested == "auto":
        if fp16 and low_precision_dtype(device.type) == torch.float16:
            requested = "fp16"
        elif bf16_is_fast(device):
            requested = "bf16"
        else:
            requested = "fp32"
    if requested == "fp16":
        if device.type != "cuda":
            raise ValueError(f"precision 'fp16' needs a CUDA device, this run uses {device}; use 'bf16' or 'fp32'")
        return Precision("fp16", torch.float16, True)
    if requested == "bf16":
        return Precision("bf16", torch.bfloat16, False)
    if requested == "fp32":
        return Precision("fp32", None, False)
    raise ValueError(f"unknown precision {requested!r}")
