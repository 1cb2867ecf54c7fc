"""`train.rec` / `train.idx` folders in either of the two layouts in use.

- MS1M / insightface: record 0 is a header (flag > 0, empty payload) whose first label is
  one past the last image record; images are records 1 .. label[0] - 1, followed by one
  record per identity holding its image range [start, end).
- mxnet im2rec: no header; every indexed record is an image whose (first) label is the class.

The layout is told apart by record 0: a header record has labels and no payload.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dataset.base import FaceDataset
from dataset.errors import DataError, RecordIOError
from dataset.recordio import IndexedRecordReader, IRHeader, class_of, parse_header

MS1M = "ms1m"
IM2REC = "im2rec"


@dataclass(frozen=True)
class RecordLayout:
    kind: str  # MS1M or IM2REC
    image_keys: np.ndarray  # int64 record keys of the images, in data-set order
    header: IRHeader | None  # record 0 of the MS1M layout


def rec_paths(root_dir: str | os.PathLike) -> tuple[Path, Path]:
    """(train.rec, train.idx) of a data-set folder; DataError naming what is missing."""
    root = Path(root_dir)
    if not root.is_dir():
        raise DataError(f"data set folder {root} does not exist")
    rec, idx = root / "train.rec", root / "train.idx"
    if not rec.is_file():
        raise DataError(f"{rec} not found")
    if not idx.is_file():
        raise DataError(f"{idx} not found: the .rec file needs its index (key<TAB>offset per record)")
    return rec, idx


def detect_layout(reader: IndexedRecordReader) -> RecordLayout:
    if 0 in reader:
        record = reader.read(0)
        header, start = parse_header(record, reader.where(0))
        if header.flag > 0 and start == len(record):
            return _ms1m_layout(reader, header)
    return RecordLayout(IM2REC, reader.keys.copy(), None)


def _ms1m_layout(reader: IndexedRecordReader, header: IRHeader) -> RecordLayout:
    end = int(header.label[0])
    if end < 2 or end != header.label[0]:
        raise RecordIOError(
            f"{reader.where(0)}: header label[0]={header.label[0]} must be one past the last image record (>= 2)"
        )
    image_keys = np.arange(1, end, dtype=np.int64)
    missing = reader.missing(image_keys)
    if missing.size:
        raise RecordIOError(
            f"{reader.idx_path}: the header (record 0) announces image records 1 .. {end - 1} but key "
            f"{missing[0]} is not in the index ({missing.size} missing)"
        )
    return RecordLayout(MS1M, image_keys, header)


def read_property(root_dir: str | os.PathLike) -> int | None:
    """num_classes from the `property` file (`num_classes,height,width`), None if there is none."""
    path = Path(root_dir) / "property"
    if not path.is_file():
        return None
    text = path.read_text().strip()
    fields = text.split(",")
    try:
        value = int(fields[0])
    except ValueError:
        raise DataError(f"{path}: expected 'num_classes,height,width', got {text[:80]!r}") from None
    if value <= 0:
        raise DataError(f"{path}: num_classes must be positive, got {value}")
    return value


class MXFaceDataset(FaceDataset):
    """Samples of a `train.rec` / `train.idx` folder (MS1M or im2rec layout).

    The `.rec` file is opened lazily in each process; construct the data set in the main
    process and let DataLoader workers inherit it.
    """

    def __init__(
        self,
        root_dir: str | os.PathLike,
        local_rank: int = 0,
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
        self.root_dir = str(root_dir)
        self.local_rank = local_rank  # kept for insightface's signature; the data are the same on every GPU
        rec, idx = rec_paths(root_dir)
        self.reader = IndexedRecordReader(rec, idx)
        self.layout = detect_layout(self.reader)
        self.image_keys = self.layout.image_keys

    def __len__(self) -> int:
        return len(self.image_keys)

    def read_encoded(self, index: int) -> tuple[memoryview, float]:
        key = int(self.image_keys[index])
        data = self.reader.read(key)
        try:
            header, start = parse_header(data)
        except RecordIOError:
            parse_header(data, self.where(index))  # raises again, naming the record
            raise
        return memoryview(data)[start:], class_of(header)

    def where(self, index: int) -> str:
        return self.reader.where(int(self.image_keys[index]))
