"""Random-tensor data for throughput tests (`rec = "synthetic"`), as in insightface:
one fixed random image, so that the measured speed is the model's, not the decoder's."""
from __future__ import annotations

import numpy as np

from dataset.base import FaceDataset

DEFAULT_LENGTH = 1_000_000  # insightface's synthetic loader is as long as this


class SyntheticDataset(FaceDataset):
    """`num_images` copies of one random image; label of sample i = i % num_classes (0 without num_classes)."""

    def __init__(
        self,
        num_images: int = DEFAULT_LENGTH,
        *,
        num_classes: int | None = None,
        seed: int = 2048,
        image_size: tuple[int, int] = (112, 112),
    ):
        super().__init__(train=False, seed=seed, num_classes=num_classes, image_size=image_size)
        self.num_images = int(num_images)
        h, w = image_size
        self.image = np.random.default_rng(seed).integers(0, 256, size=(3, h, w), dtype=np.uint8)

    def __len__(self) -> int:
        return self.num_images

    def load_planar(self, index: int, epoch: int, out: np.ndarray) -> int:
        out[...] = self.image
        return index % self.num_classes if self.num_classes else 0

    def read_encoded(self, index: int):  # pragma: no cover - nothing is encoded here
        raise NotImplementedError("synthetic samples are not encoded images")
