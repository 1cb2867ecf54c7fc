"""A folder with one sub-folder of images per identity, used for training directly.

Labels are the positions of the sub-folder names in sorted order (the same rule as
tools/pack_rec.py, so a folder and the .rec packed from it have the same labels).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dataset.base import FaceDataset
from dataset.errors import DataError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})


@dataclass(frozen=True)
class FolderListing:
    class_names: list[str]
    files: list[list[str]]  # files[k]: sorted image paths of identity k

    @property
    def num_images(self) -> int:
        return sum(len(f) for f in self.files)


def _visible(entry: os.DirEntry) -> bool:
    return not entry.name.startswith(".")


def is_image_file(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_image_folder(root: str | os.PathLike) -> FolderListing:
    """Identities (sorted sub-folder names) and their image files; DataError if empty."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    with os.scandir(root) as it:
        entries = sorted((e for e in it if _visible(e)), key=lambda e: e.name)
    class_dirs = [e for e in entries if e.is_dir()]
    if not class_dirs:
        stray = sum(1 for e in entries if e.is_file() and is_image_file(e.name))
        detail = f" ({stray} images lie directly in it)" if stray else ""
        raise DataError(f"image folder {root} has no identity sub-folders{detail}; expected {root}/<identity>/<image>")
    names, files = [], []
    for d in class_dirs:
        with os.scandir(d.path) as it:
            images = sorted(e.path for e in it if _visible(e) and e.is_file() and is_image_file(e.name))
        if not images:
            raise DataError(f"identity folder {d.path} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        names.append(d.name)
        files.append(images)
    return FolderListing(names, files)


class ImageFolderDataset(FaceDataset):
    """Samples of `root/<identity>/<image>`; label k = k-th identity in sorted order."""

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        train: bool = True,
        seed: int = 2048,
        num_classes: int | None = None,
        skip_bad_images: bool = False,
        image_size: tuple[int, int] = (112, 112),
    ):
        super().__init__(
            train=train, seed=seed, num_classes=num_classes, skip_bad_images=skip_bad_images, image_size=image_size
        )
        self.root = str(root)
        listing = list_image_folder(root)
        self.class_names = listing.class_names
        # Arrays rather than lists of str: forked workers do not touch millions of refcounts.
        self.paths = np.array([os.fsencode(p) for group in listing.files for p in group], dtype=np.bytes_)
        self.labels = np.repeat(np.arange(len(listing.files), dtype=np.int64), [len(g) for g in listing.files])

    def __len__(self) -> int:
        return len(self.paths)

    def read_encoded(self, index: int) -> tuple[bytes, float]:
        path = self.paths[index]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise DataError(f"{self.where(index)}: cannot read ({e.strerror})") from None
        return data, float(self.labels[index])

    def where(self, index: int) -> str:
        return os.fsdecode(self.paths[index])
