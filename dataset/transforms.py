"""Decoding and the training transform: RGB, (x / 255 - 0.5) / 0.5, random horizontal flip.

Images travel as planar uint8 RGB (3 x H x W) from decoding to the batch; conversion to
float happens last (`to_float` in NumPy for single samples, `normalize_batch` in torch on
the training device for batches), so workers and pinned memory move a quarter of the
bytes. Both conversions give exactly the float32 nearest to (x / 255 - 0.5) / 0.5.

The flip decision is a hash of (seed, epoch, sample index): the same data stream for any
number of workers and after a resume in the middle of an epoch.
"""
from __future__ import annotations

from typing import Callable

import cv2
import numpy as np
import torch

from dataset.errors import BadImageError

# x -> (x / 255 - 0.5) / 0.5 rounded once to float32; equal to (x - 127.5) / 127.5 in float32.
_NORMALIZE_LUT = ((np.arange(256, dtype=np.float64) / 255.0 - 0.5) / 0.5).astype(np.float32)

_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64 finaliser: a well-mixed 64-bit hash of a 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def flip_decision(seed: int, epoch: int, index: int) -> bool:
    """Whether sample `index` is mirrored in `epoch`: a fair coin that depends on nothing else."""
    # Odd multipliers keep (seed, epoch, index) -> key one-to-one for realistic ranges; the mix spreads it.
    key = (seed * 0xD1B54A32D192ED03 + epoch * 0xAEF17502108EF2D9 + index) & _MASK64
    return bool(_mix64(key) >> 63)


def decode_bgr(
    encoded: bytes | memoryview | np.ndarray, image_size: tuple[int, int], where: Callable[[], str]
) -> np.ndarray:
    """cv2.imdecode to H x W x 3 BGR uint8; BadImageError naming where() if it fails or has the wrong size."""
    buf = encoded if isinstance(encoded, np.ndarray) else np.frombuffer(encoded, dtype=np.uint8)
    image = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    if image is None:
        raise BadImageError(f"{where()}: cannot decode the image ({buf.size} bytes)")
    if image.shape[0] != image_size[0] or image.shape[1] != image_size[1]:
        raise BadImageError(
            f"{where()}: image is {image.shape[1]}x{image.shape[0]} (width x height), expected "
            f"{image_size[1]}x{image_size[0]}; align/resize the faces first (tools/pack_rec.py --resize)"
        )
    return image


def bgr_to_planar_rgb(bgr: np.ndarray, flip: bool, out: np.ndarray | None = None) -> np.ndarray:
    """H x W x 3 BGR -> 3 x H x W RGB uint8, mirrored left-right when `flip`.

    cv2.split de-interleaves in one SIMD pass (a strided NumPy transpose is 2-3x slower);
    the mirror is then an in-place flip of the rows of the single-channel planes.
    """
    h, w = bgr.shape[:2]
    if out is None:
        out = np.empty((3, h, w), dtype=np.uint8)
    cv2.split(bgr, [out[2], out[1], out[0]])
    if flip:
        rows = out.reshape(3 * h, w)
        cv2.flip(rows, 1, dst=rows)
    return out


def to_float(planar: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 -> normalised float32 in one table-lookup pass (exact, see _NORMALIZE_LUT)."""
    c, h, w = planar.shape
    if out is None:
        out = np.empty((c, h, w), dtype=np.float32)
    cv2.LUT(planar.reshape(c * h, w), _NORMALIZE_LUT, dst=out.reshape(c * h, w))
    return out


def normalize_batch(images: torch.Tensor) -> torch.Tensor:
    """uint8 N x 3 x H x W (any device) -> float32 (x - 127.5) / 127.5, bit-equal to `to_float`.

    The one input normalisation of training, evaluation, inference and the benchmarks.
    Always a new tensor (copy=True): a float input is never normalised in place.
    """
    return images.to(torch.float32, copy=True).sub_(127.5).div_(127.5)
