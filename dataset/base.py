"""What every face data set here shares: the output contract, deterministic flips,
label checks, skipping of undecodable images, and whole-batch loading.

Contract of `dataset[i]`: (3 x H x W float32 tensor, RGB, (x / 255 - 0.5) / 0.5,
mirrored in training by `flip_decision(seed, epoch, i)`; int64 label tensor).
`load_batch(indices, epoch)` is the loader's path: uint8 planar images, normalised later
on the training device (see dataset.transforms).
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from dataset.errors import BadImageError, DataError, LabelError
from dataset.transforms import bgr_to_planar_rgb, decode_bgr, flip_decision, to_float


class FaceDataset(Dataset):
    """Base class. Subclasses implement `__len__` and `read_encoded(index)`."""

    def __init__(
        self,
        *,
        train: bool = True,
        seed: int = 2048,
        num_classes: int | None = None,
        skip_bad_images: bool = False,
        image_size: tuple[int, int] = (112, 112),
    ):
        self.train = train
        self.seed = int(seed)
        self.num_classes = num_classes
        self.skip_bad_images = skip_bad_images
        self.image_size = tuple(image_size)
        self.epoch = 0
        self.num_skipped = 0  # per process: each DataLoader worker counts its own
        self._warned_skip = False

    # -- to implement

    def __len__(self) -> int:
        raise NotImplementedError

    def read_encoded(self, index: int) -> tuple[bytes | memoryview | np.ndarray, float]:
        """(encoded image, label) of sample `index`."""
        raise NotImplementedError

    def where(self, index: int) -> str:
        """Where sample `index` is stored (file, record key, offset), for error messages."""
        raise NotImplementedError

    # -- shared behaviour

    def set_epoch(self, epoch: int) -> None:
        """Selects the flips of `epoch` for `dataset[i]` (the loader passes the epoch itself)."""
        self.epoch = int(epoch)

    def flips(self, index: int, epoch: int) -> bool:
        return self.train and flip_decision(self.seed, epoch, index)

    def check_label(self, label: float, index: int) -> int:
        value = int(label)
        if value != label or value < 0:
            raise LabelError(f"{self.where(index)}: label {label} is not a non-negative integer class")
        if self.num_classes is not None and value >= self.num_classes:
            raise LabelError(f"{self.where(index)}: label {value} >= num_classes={self.num_classes}")
        return value

    def load_planar(self, index: int, epoch: int, out: np.ndarray) -> int:
        """Decode sample `index` into `out` (3 x H x W uint8 RGB, flipped for `epoch`); returns its label.

        With skip_bad_images an undecodable image is replaced by the next decodable
        sample (with that sample's label); the flip still follows `index`.
        """
        n = len(self)
        for attempt in range(n if self.skip_bad_images else 1):
            source = (index + attempt) % n
            encoded, label = self.read_encoded(source)
            label = self.check_label(label, source)
            try:
                bgr = decode_bgr(encoded, self.image_size, lambda: self.where(source))
            except BadImageError as e:
                if not self.skip_bad_images:
                    raise
                self._note_skip(e)
                continue
            bgr_to_planar_rgb(bgr, self.flips(index, epoch), out)
            return label
        raise DataError(f"skip_bad_images: none of the {n} images of the data set can be decoded")

    def _note_skip(self, error: BadImageError) -> None:
        self.num_skipped += 1
        if not self._warned_skip:
            self._warned_skip = True
            warnings.warn(
                f"skipping undecodable image ({error}); substituting the next good one. Further skips are "
                f"counted silently (dataset.num_skipped)",
                RuntimeWarning,
                stacklevel=3,
            )

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = self.image_size
        planar = np.empty((3, h, w), dtype=np.uint8)
        label = self.load_planar(int(index), self.epoch, planar)
        return torch.from_numpy(to_float(planar)), torch.from_numpy(np.array(label, dtype=np.int64))

    def load_batch(self, indices, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(N x 3 x H x W uint8 RGB, N int64 labels) of `indices` with the flips of `epoch`."""
        h, w = self.image_size
        images = torch.empty((len(indices), 3, h, w), dtype=torch.uint8)
        if get_worker_info() is not None:
            # Created in shared memory, the batch crosses to the main process without a copy.
            images.share_memory_()
        pixels = images.numpy()
        labels = np.empty(len(indices), dtype=np.int64)
        for j, index in enumerate(indices):
            labels[j] = self.load_planar(int(index), epoch, pixels[j])
        return images, torch.from_numpy(labels)
