"""What `rec` points to, what it holds (read cheaply at start-up), and opening it."""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from dataset.base import FaceDataset
from dataset.errors import DataError, RecordIOError
from dataset.image_folder import ImageFolderDataset, list_image_folder
from dataset.mx_face import MS1M, MXFaceDataset, RecordLayout, detect_layout, read_property, rec_paths
from dataset.recordio import IndexedRecordReader, class_of
from dataset.synthetic import SyntheticDataset

SYNTHETIC = "synthetic"
RECORDIO = "recordio"
IMAGE_FOLDER = "image_folder"


class DatasetInfo(NamedTuple):
    kind: str  # "synthetic", "ms1m", "im2rec" or "image_folder"
    num_classes: int | None  # None for synthetic data
    num_images: int | None


def dataset_kind(root_dir: str | os.PathLike) -> str:
    """SYNTHETIC, RECORDIO or IMAGE_FOLDER; DataError when `root_dir` is none of them."""
    if str(root_dir) == SYNTHETIC:
        return SYNTHETIC
    root = Path(root_dir)
    expected = "a folder with train.rec + train.idx, a folder of identity sub-folders, or 'synthetic'"
    if not root.exists():
        raise DataError(f"data set {root} does not exist; rec must be {expected}")
    if not root.is_dir():
        raise DataError(f"data set {root} is a file; rec must be {expected}")
    if (root / "train.rec").exists() or (root / "train.idx").exists():
        return RECORDIO
    with os.scandir(root) as it:
        if any(e.is_dir() and not e.name.startswith(".") for e in it):
            return IMAGE_FOLDER
    raise DataError(f"data set folder {root} is empty or holds neither train.rec + train.idx nor identity sub-folders")


def open_dataset(
    root_dir: str | os.PathLike,
    local_rank: int = 0,
    *,
    seed: int = 2048,
    num_classes: int | None = None,
    skip_bad_images: bool = False,
    num_images: int | None = None,
    train: bool = True,
) -> FaceDataset:
    """The data set `root_dir` names (see `dataset_kind`)."""
    kind = dataset_kind(root_dir)
    if kind == SYNTHETIC:
        kwargs = {} if num_images is None else {"num_images": num_images}
        return SyntheticDataset(num_classes=num_classes, seed=seed, **kwargs)
    if kind == RECORDIO:
        return MXFaceDataset(
            root_dir, local_rank, train=train, seed=seed, num_classes=num_classes, skip_bad_images=skip_bad_images
        )
    return ImageFolderDataset(
        root_dir, train=train, seed=seed, num_classes=num_classes, skip_bad_images=skip_bad_images
    )


def inspect_dataset(root_dir: str | os.PathLike) -> DatasetInfo:
    """Kind, number of classes and number of images of `root_dir`, without decoding images.

    RecordIO, MS1M layout: the header record, the identity records (checked to tile the
    image records) and `property`, which must agree with each other. im2rec layout:
    `property`, else the labels of all records. Image folder: the listing.
    """
    kind = dataset_kind(root_dir)
    if kind == SYNTHETIC:
        return DatasetInfo(SYNTHETIC, None, None)
    if kind == IMAGE_FOLDER:
        listing = list_image_folder(root_dir)
        return DatasetInfo(IMAGE_FOLDER, len(listing.class_names), listing.num_images)
    reader = IndexedRecordReader(*rec_paths(root_dir))
    try:
        layout = detect_layout(reader)
        property_classes = read_property(root_dir)
        if layout.kind == MS1M:
            identities = _count_identities(reader, layout)
            if property_classes is not None and identities is not None and property_classes != identities:
                raise DataError(
                    f"{Path(root_dir) / 'property'} says {property_classes} classes but the header of "
                    f"{reader.rec_path} lists {identities} identity records"
                )
            num_classes = property_classes if property_classes is not None else identities
        else:
            num_classes = property_classes
        if num_classes is None:
            num_classes = _max_label(reader, layout) + 1
        return DatasetInfo(layout.kind, num_classes, len(layout.image_keys))
    finally:
        reader.close()


def _count_identities(reader: IndexedRecordReader, layout: RecordLayout) -> int | None:
    """Number of identity records after the images, checked to cover them in order; None if absent."""
    labels = layout.header.label
    if len(labels) < 2 or labels[1] <= labels[0]:
        return None
    first, end = int(labels[0]), int(labels[1])
    expected_start = 1
    for key in range(first, end):
        if key not in reader:
            raise RecordIOError(f"{reader.idx_path}: identity record key {key} (announced by record 0) is missing")
        header = reader.read_header(key)
        if header.flag < 2 or int(header.label[0]) != expected_start or header.label[1] <= header.label[0]:
            got = list(header.label) if header.flag else header.label
            raise RecordIOError(
                f"{reader.where(key)}: identity record {key - first} should hold the image range "
                f"[{expected_start}, end), got {got}"
            )
        expected_start = int(header.label[1])
    if expected_start != first:
        raise RecordIOError(
            f"{reader.rec_path}: identity records end at image key {expected_start}, but the images end at {first}"
        )
    return end - first


def _max_label(reader: IndexedRecordReader, layout: RecordLayout) -> int:
    """Largest class label over all image records (reads every record header: slow on big sets)."""
    best = -1
    for key in layout.image_keys:
        best = max(best, int(class_of(reader.read_header(int(key)))))
    if best < 0:
        raise DataError(f"{reader.rec_path}: no non-negative labels found")
    return best
