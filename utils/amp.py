"""Choosing the training precision for the device at hand: the one place that decides
which low-precision dtype a device gets (the backbones' own `fp16=True` autocast asks
`low_precision_dtype` here; the PartialFC head receives the run's dtype)."""
from __future__ import annotations

import os
import platform
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


# oneDNN's x86 ISA names (ONEDNN_MAX_CPU_ISA) at or above the first one with bf16 dot products.
_BF16_ISA_WORDS = ("BF16", "FP16", "AMX", "AVX10")


def onednn_isa_allows(*words: str) -> bool:
    """Whether ONEDNN_MAX_CPU_ISA, if set, names an instruction set with one of these words in it
    (e.g. "AMX"): the one reading of that limit for precision=auto and the benchmarks' CPU kinds."""
    limit = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    return not limit or limit == "ALL" or any(word in limit for word in words)


def _cpu_has_bf16_units() -> bool:
    """AVX512-BF16 or AMX tiles, as the CPU reports them, and oneDNN not held below them.

    oneDNN's own `_is_mkldnn_bf16_supported` is no test of speed: it says yes from AVX512F on
    (Skylake-X, Cascade Lake, Ice Lake), where bf16 is emulated -- measured on such a 2-core
    Xeon: mbf_small's step 1.5x and r50's 2.9x slower under bf16 autocast than in fp32.
    """
    if platform.machine().lower() in ("x86_64", "amd64", "i686", "x86"):
        probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        if not any(probe is not None and probe() for probe in probes):
            return False
        if not onednn_isa_allows(*_BF16_ISA_WORDS):
            return False  # held below its bf16 instructions (`make bench-avx2`, ONEDNN_MAX_CPU_ISA=AVX512_CORE)
    # Elsewhere (aarch64: oneDNN through Arm Compute Library) oneDNN's answer stands; only x86's was
    # seen to be wrong.
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False  # torch built without oneDNN: no fast bf16 convolutions either


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bfloat16 matrix units make autocast pay off on this device.

    CPUs without AMX / AVX512-BF16 emulate bf16 and run it several times slower than
    fp32 (measured: 5x slower convolutions on an AVX2-only EPYC, 1.5-2.9x slower steps on
    an AVX512 Xeon without bf16 units), so it is only chosen where the CPU has those units.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return _cpu_has_bf16_units()
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
