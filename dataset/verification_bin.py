"""Verification sets (`lfw.bin`, `cfp_fp.bin`, `agedb_30.bin`, ...): the `.bin` file format.

A `.bin` is a pickle of `(bins, issame_list)`: 2N encoded images (pair i is
bins[2i], bins[2i+1]) and N bools. The public files were written by Python 2, so
they are read with `encoding='bytes'`. A pickle can run code while it loads, so
the unpickler here refuses every global and persistent id: a `.bin` only needs
lists, bytes and bools.

The format lives with the data sets (the synthetic-faces generator writes one);
scoring and embedding are in `eval.verification`.
"""
from __future__ import annotations

import io
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import cv2
import numpy as np
import torch

from dataset.errors import DataError
from utils.atomic_file import atomic_write

_DECODE_CHUNK = 256  # images per decoding task

# Python 3 writes `bytes` under pickle protocol <= 2 as a call of this pure function;
# it is the only callable such a file needs, and it cannot reach anything else.
_SAFE_GLOBALS = {("_codecs", "encode")}


class VerificationSetError(DataError):
    """A `.bin` file that is unreadable, malformed or unsafe. The message names the file."""


class _DataOnlyUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, path: str):
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise VerificationSetError(
            f"{self._path}: refusing to load: the pickle references {module}.{name}; a verification "
            f".bin holds only lists of bytes and bools, so this file is not one (or was tampered with)"
        )

    def persistent_load(self, pid):
        raise VerificationSetError(f"{self._path}: refusing to load: the pickle uses persistent ids")


def _read_pairs_pickle(path: str) -> tuple[list[bytes], list[bool]]:
    try:
        with open(path, "rb") as f:
            obj = _DataOnlyUnpickler(f, path).load()
    except VerificationSetError:
        raise
    except FileNotFoundError:
        raise VerificationSetError(f"{path}: verification set not found") from None
    except Exception as e:  # truncated or not a pickle at all
        raise VerificationSetError(f"{path}: not a readable verification .bin ({type(e).__name__}: {e})") from None

    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise VerificationSetError(f"{path}: expected a pickled (images, issame_list) pair, got {type(obj).__name__}")
    bins, issame = obj
    if not isinstance(bins, (list, tuple)) or not isinstance(issame, (list, tuple)):
        raise VerificationSetError(
            f"{path}: expected two lists, got {type(bins).__name__} and {type(issame).__name__}"
        )
    if len(issame) == 0:
        raise VerificationSetError(f"{path}: the set holds no pairs")
    if len(bins) != 2 * len(issame):
        raise VerificationSetError(
            f"{path}: {len(bins)} images for {len(issame)} pairs; a verification set has exactly 2 images per pair"
        )
    for i, b in enumerate(bins):
        if not isinstance(b, (bytes, bytearray)):
            raise VerificationSetError(f"{path}: image {i} is a {type(b).__name__}, expected encoded image bytes")
    flags = []
    for i, s in enumerate(issame):
        if isinstance(s, (bool, np.bool_)) or (isinstance(s, int) and s in (0, 1)):
            flags.append(bool(s))
        else:
            raise VerificationSetError(f"{path}: issame[{i}] is {s!r}, expected a bool")
    return list(bins), flags


def load_bin(path: str, image_size: tuple[int, int] = (112, 112)) -> tuple[list[torch.Tensor], list[bool]]:
    """Read a verification `.bin`.

    Returns `([images, flipped_images], issame_list)` with the images as uint8 RGB
    tensors [2N, 3, H, W] (H, W = image_size; other sizes are resized) and the
    flips mirrored left-right.
    """
    path = os.fspath(path)
    bins, issame = _read_pairs_pickle(path)
    height, width = image_size
    # Filled with NumPy: per-image assignment into a torch tensor costs ~100x more here.
    images = np.empty((len(bins), 3, height, width), dtype=np.uint8)

    def decode(start: int) -> None:
        for i in range(start, min(start + _DECODE_CHUNK, len(bins))):
            img = cv2.imdecode(np.frombuffer(bins[i], dtype=np.uint8), cv2.IMREAD_COLOR)
            if img is None:
                raise VerificationSetError(f"{path}: image {i} ({len(bins[i])} bytes) cannot be decoded")
            if img.shape[:2] != (height, width):
                img = cv2.resize(img, (width, height), interpolation=cv2.INTER_LINEAR)
            images[i] = img[:, :, ::-1].transpose(2, 0, 1)  # BGR HWC -> RGB CHW

    # OpenCV releases the GIL while decoding, so threads decode in parallel.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for _ in pool.map(decode, range(0, len(bins), _DECODE_CHUNK)):
            pass  # re-raises the first decoding error
    flipped = np.ascontiguousarray(images[:, :, :, ::-1])
    return [torch.from_numpy(images), torch.from_numpy(flipped)], issame


def write_bin(path: str, encoded_images: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Write a `.bin` readable by `load_bin` and by insightface (pickle of (list of bytes, list of bool))."""
    path = os.fspath(path)
    bins = [bytes(b) for b in encoded_images]
    flags = [bool(s) for s in issame]
    if len(bins) != 2 * len(flags):
        raise ValueError(f"{path}: {len(bins)} images for {len(flags)} pairs; need exactly 2 images per pair")
    with atomic_write(path) as f:
        pickle.dump((bins, flags), f, protocol=4)
