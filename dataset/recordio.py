"""mxnet / dmlc RecordIO in pure Python.

A `.rec` file is a sequence of framed records; a `.idx` text file maps record keys to
byte offsets. This module reads and writes both exactly as mxnet 1.x does
(`MXIndexedRecordIO`, `recordio.pack` / `unpack`), without mxnet:

- framing: uint32 magic, uint32 (3-bit continuation flag << 29 | 29-bit length), data,
  zero padding to 4 bytes. Like dmlc's writer, a record whose data contain the magic
  word at a 4-byte-aligned position is split there into parts (flags 1, 2 ..., 3) and the
  magic word itself is dropped; the reader puts it back.
- the image-record header `IRHeader` (`<IfQQ`): flag, label, id, id2; flag > 0 means
  `flag` float32 labels follow the header.

`IndexedRecordReader` opens the `.rec` file lazily in each process (DataLoader workers
must never share a file handle with their parent) and reads a record with one `pread`.
`write_identity_records` writes a whole data set in the insightface (MS1M) layout.

Hand-written although a library exists: mxnet, the only implementation, is retired (moved
to the Apache attic) and would pull in a large native package for a format this small.
"""
from __future__ import annotations

import contextlib
import numbers
import os
import struct
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import numpy as np

from dataset.errors import DataError, RecordIOError
from utils.atomic_file import atomic_path

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_FRAME = struct.Struct("<II")  # magic, lrecord
FRAME_HEADER_SIZE = _FRAME.size
_LENGTH_BITS = 29
_LENGTH_MASK = (1 << _LENGTH_BITS) - 1
MAX_RECORD_SIZE = _LENGTH_MASK  # what 29 bits can hold

# Continuation flags of a record part.
_WHOLE, _FIRST, _MIDDLE, _LAST = 0, 1, 2, 3

IR_FORMAT = "<IfQQ"
_IR = struct.Struct(IR_FORMAT)
IR_SIZE = _IR.size  # 24


class IRHeader(NamedTuple):
    """Header of an image record. `label` is a float, or a float32 array when flag > 0."""

    flag: int
    label: float | np.ndarray
    id: int
    id2: int


# ---------------------------------------------------------------------------- records


def pack(header: IRHeader | Sequence, payload: bytes = b"") -> bytes:
    """Header + payload as mxnet's `recordio.pack` builds them.

    A scalar label is stored in the header (flag 0); a sequence of labels is stored as
    float32 values after the header, flag = their number, header label field 0.0.
    """
    flag, label, id_, id2 = header
    if isinstance(label, numbers.Number):
        head = _IR.pack(0, float(label), int(id_), int(id2))
        return head + bytes(payload)
    labels = np.asarray(label, dtype=np.float32).ravel()
    head = _IR.pack(labels.size, 0.0, int(id_), int(id2))
    return head + labels.tobytes() + bytes(payload)


def parse_header(record: bytes | memoryview, where: str = "record") -> tuple[IRHeader, int]:
    """(header, offset of the payload in `record`); no copy of the payload."""
    if len(record) < IR_SIZE:
        raise RecordIOError(f"{where}: {len(record)} bytes, shorter than the {IR_SIZE}-byte image-record header")
    flag, label, id_, id2 = _IR.unpack_from(record, 0)
    if flag == 0:
        return IRHeader(flag, label, id_, id2), IR_SIZE
    end = IR_SIZE + 4 * flag
    if len(record) < end:
        raise RecordIOError(
            f"{where}: header announces {flag} float32 labels but the record has only {len(record)} bytes"
        )
    labels = np.frombuffer(record, dtype=np.float32, count=flag, offset=IR_SIZE)
    return IRHeader(flag, labels, id_, id2), end


def unpack(record: bytes) -> tuple[IRHeader, bytes]:
    """Inverse of `pack`: (header, payload) as mxnet's `recordio.unpack` returns them."""
    header, start = parse_header(record)
    return header, bytes(record[start:])


def class_of(header: IRHeader) -> float:
    """The class label of an image record: the scalar label, or the first of several."""
    label = header.label
    if isinstance(label, np.ndarray):
        return float(label[0]) if label.size else 0.0
    return float(label)


# ---------------------------------------------------------------------------- framing


def _frame_word(cflag: int, length: int) -> bytes:
    return _FRAME.pack(MAGIC, (cflag << _LENGTH_BITS) | length)


def frame(data: bytes) -> bytes:
    """The bytes dmlc's RecordIOWriter writes for one record (framing, splits, padding)."""
    data = bytes(data)
    size = len(data)
    if size > MAX_RECORD_SIZE:
        raise ValueError(f"a RecordIO record holds at most {MAX_RECORD_SIZE} bytes, got {size}")
    # dmlc scans the 4-byte-aligned words only; the magic there must not appear inside a part.
    lower_align = size & ~3
    parts: list[bytes] = []
    start = 0
    pos = data.find(_MAGIC_BYTES)
    while 0 <= pos < lower_align:
        if pos % 4:
            pos = data.find(_MAGIC_BYTES, pos + 1)
            continue
        parts.append(_frame_word(_FIRST if start == 0 else _MIDDLE, pos - start))
        parts.append(data[start:pos])
        start = pos + 4
        pos = data.find(_MAGIC_BYTES, start)
    parts.append(_frame_word(_LAST if start else _WHOLE, size - start))
    parts.append(data[start:])
    parts.append(b"\0" * (-size % 4))
    return b"".join(parts)


def _pad4(n: int) -> int:
    return (n + 3) & ~3


def iter_frames(buffer: bytes, where: str = "buffer") -> Iterable[bytes]:
    """Records of an in-memory `.rec` file, in file order (multi-part records joined)."""
    pos = 0
    while pos < len(buffer):
        data, pos = _parse_record(buffer, pos, lambda p: f"{where} at offset {p}")
        yield data


def _parse_record(buffer: bytes, pos: int, where) -> tuple[bytes, int]:
    """(record data, offset after it) for the record framed at `buffer[pos:]`."""
    pieces: list[bytes] = []
    expect_continuation = False
    while True:
        if len(buffer) - pos < FRAME_HEADER_SIZE:
            raise RecordIOError(f"{where(pos)}: truncated: {len(buffer) - pos} bytes left, a record header needs 8")
        magic, lrecord = _FRAME.unpack_from(buffer, pos)
        if magic != MAGIC:
            raise RecordIOError(f"{where(pos)}: bad magic 0x{magic:08x} (expected 0x{MAGIC:08x})")
        cflag, length = lrecord >> _LENGTH_BITS, lrecord & _LENGTH_MASK
        if cflag > _LAST or (cflag in (_WHOLE, _FIRST)) == expect_continuation:
            raise RecordIOError(f"{where(pos)}: unexpected continuation flag {cflag}")
        start = pos + FRAME_HEADER_SIZE
        if len(buffer) - start < length:
            raise RecordIOError(
                f"{where(pos)}: truncated: the record announces {length} bytes, only {len(buffer) - start} follow"
            )
        pieces.append(buffer[start:start + length])
        pos = start + _pad4(length)
        if cflag in (_WHOLE, _LAST):
            return (pieces[0] if len(pieces) == 1 else _MAGIC_BYTES.join(pieces)), pos
        expect_continuation = True


# ---------------------------------------------------------------------------- index


def read_index(idx_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(keys, offsets) of a `.idx` file as int64 arrays, in file order."""
    try:
        with open(idx_path, "rb") as f:
            text = f.read()
    except FileNotFoundError:
        raise DataError(f"index file {idx_path} not found") from None
    # Fast path for the files mxnet writes: one `key<TAB>offset` per line, parsed in C.
    num_lines = text.count(b"\n") + (1 if text and not text.endswith(b"\n") else 0)
    if text.count(b"\t") == num_lines:
        try:
            values = np.fromstring(text, dtype=np.int64, sep=" ")
        except ValueError:
            values = None
        if values is not None and values.size == 2 * num_lines and (values >= 0).all():
            pairs = values.reshape(-1, 2)
            return pairs[:, 0].copy(), pairs[:, 1].copy()
    # Slow path: names the first bad line (or copes with whitespace-only lines).
    keys, offsets = [], []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or not all(f.isdigit() for f in fields):
            raise RecordIOError(
                f"{idx_path} line {number}: expected 'key<TAB>offset' with non-negative integers, "
                f"got {line[:80]!r}"
            )
        keys.append(int(fields[0]))
        offsets.append(int(fields[1]))
    return np.array(keys, dtype=np.int64), np.array(offsets, dtype=np.int64)


# ---------------------------------------------------------------------------- reader


class IndexedRecordReader:
    """Random access to the records of a `.rec` file through its `.idx`.

    The file is opened on first use in each process (the pid is remembered), so an
    instance created in the main process can be handed to forked or spawned DataLoader
    workers: each opens its own descriptor. A record is read with one `pread` of the
    bytes up to the next indexed record.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None):
        self.rec_path = str(rec_path)
        self.idx_path = str(idx_path) if idx_path is not None else str(Path(rec_path).with_suffix(".idx"))
        try:
            self.file_size = os.path.getsize(self.rec_path)
        except FileNotFoundError:
            raise DataError(f"record file {self.rec_path} not found") from None
        self.keys, self.offsets = read_index(self.idx_path)
        if len(self.keys) == 0:
            raise RecordIOError(f"{self.idx_path} lists no records")
        past_end = np.flatnonzero(self.offsets >= self.file_size)
        if past_end.size:
            i = past_end[0]
            raise RecordIOError(
                f"{self.idx_path}: record key {self.keys[i]} has offset {self.offsets[i]}, past the end of "
                f"{self.rec_path} ({self.file_size} bytes); the index does not belong to this file or the file "
                f"is truncated"
            )
        # A record extends at most to the next indexed offset (or the end of the file).
        starts = np.unique(self.offsets)
        ends = np.append(starts[1:], self.file_size)
        self.extents = ends[np.searchsorted(starts, self.offsets)] - self.offsets
        self._build_lookup()
        self._fd: int | None = None
        self._pid: int | None = None

    def _build_lookup(self) -> None:
        keys = self.keys
        lo, hi = int(keys.min()), int(keys.max())
        if lo >= 0 and hi < 2 * len(keys) + 1024:
            # Dense table: keys are (nearly) 0..n-1, the usual case.
            table = np.full(hi + 1, -1, dtype=np.int64)
            table[keys] = np.arange(len(keys))
            self._table, self._sorted_keys, self._sorted_pos = table, None, None
        else:
            order = np.argsort(keys, kind="stable")
            self._table, self._sorted_keys, self._sorted_pos = None, keys[order], order

    def _position(self, key: int) -> int:
        if self._table is not None:
            if 0 <= key < len(self._table) and self._table[key] >= 0:
                return int(self._table[key])
        else:
            i = int(np.searchsorted(self._sorted_keys, key))
            if i < len(self._sorted_keys) and self._sorted_keys[i] == key:
                return int(self._sorted_pos[i])
        raise RecordIOError(f"record key {key} is not in {self.idx_path}")

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: int) -> bool:
        try:
            self._position(int(key))
        except RecordIOError:
            return False
        return True

    def missing(self, keys: np.ndarray) -> np.ndarray:
        """The keys among `keys` that the index does not list."""
        keys = np.asarray(keys, dtype=np.int64)
        if self._table is not None:
            inside = (keys >= 0) & (keys < len(self._table))
            found = np.zeros(len(keys), dtype=bool)
            found[inside] = self._table[keys[inside]] >= 0
        else:
            i = np.minimum(np.searchsorted(self._sorted_keys, keys), len(self._sorted_keys) - 1)
            found = self._sorted_keys[i] == keys
        return keys[~found]

    def offset(self, key: int) -> int:
        return int(self.offsets[self._position(key)])

    # -- file handle, one per process

    def _file(self) -> int:
        pid = os.getpid()
        if self._pid != pid:
            if self._fd is not None:
                # Inherited through fork: close our copy, never use the parent's handle.
                try:
                    os.close(self._fd)
                except OSError:
                    pass
            self._fd = None
            try:
                self._fd = os.open(self.rec_path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            except FileNotFoundError:
                raise DataError(f"record file {self.rec_path} not found") from None
            self._pid = pid
        return self._fd

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd, self._pid = None, None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fd"], state["_pid"] = None, None
        return state

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _pread(self, length: int, offset: int) -> bytes:
        fd = self._file()
        if hasattr(os, "pread"):
            return os.pread(fd, length, offset)
        os.lseek(fd, offset, os.SEEK_SET)  # pragma: no cover - platforms without pread
        return os.read(fd, length)  # pragma: no cover

    # -- reading

    def where(self, key: int) -> str:
        return f"{self.rec_path} record key {key} (offset {self.offset(key)})"

    def read(self, key: int) -> bytes:
        """The data of record `key` (continuation parts joined), as mxnet's read_idx returns it."""
        pos = self._position(int(key))
        offset, extent = int(self.offsets[pos]), int(self.extents[pos])
        chunk = self._pread(extent, offset)
        if len(chunk) >= FRAME_HEADER_SIZE:
            magic, lrecord = _FRAME.unpack_from(chunk, 0)
            length = lrecord & _LENGTH_MASK
            if magic == MAGIC and lrecord >> _LENGTH_BITS == _WHOLE and FRAME_HEADER_SIZE + length <= len(chunk):
                return chunk[FRAME_HEADER_SIZE:FRAME_HEADER_SIZE + length]  # the common case
        return self._read_slow(key, offset, chunk)

    def _read_slow(self, key: int, offset: int, chunk: bytes) -> bytes:
        # The record runs past the next indexed offset (an index that skips records):
        # read on until the parts are complete or the file ends.
        def where(pos: int) -> str:
            return f"{self.rec_path} record key {key} (offset {offset}, part at offset {offset + pos})"

        while True:
            try:
                data, _ = _parse_record(chunk, 0, where)
                return data
            except RecordIOError as e:
                if "truncated" not in str(e) or offset + len(chunk) >= self.file_size:
                    raise
            more = self._pread(max(len(chunk), 1 << 16), offset + len(chunk))
            if not more:
                raise RecordIOError(f"{where(len(chunk))}: truncated at the end of the file")
            chunk += more

    def read_header(self, key: int) -> IRHeader:
        """Only the image-record header of `key` (a short read; the payload is not touched)."""
        pos = self._position(int(key))
        offset = int(self.offsets[pos])
        chunk = self._pread(FRAME_HEADER_SIZE + IR_SIZE + 64, offset)
        where = f"{self.rec_path} record key {key} (offset {offset})"
        if len(chunk) >= FRAME_HEADER_SIZE:
            magic, lrecord = _FRAME.unpack_from(chunk, 0)
            if magic == MAGIC and lrecord >> _LENGTH_BITS in (_WHOLE, _FIRST):
                length = lrecord & _LENGTH_MASK
                if length >= IR_SIZE and len(chunk) >= FRAME_HEADER_SIZE + IR_SIZE:
                    flag = _IR.unpack_from(chunk, FRAME_HEADER_SIZE)[0]
                    if flag == 0 or len(chunk) >= FRAME_HEADER_SIZE + IR_SIZE + 4 * flag:
                        return parse_header(chunk[FRAME_HEADER_SIZE:FRAME_HEADER_SIZE + length], where)[0]
        return parse_header(self.read(key), where)[0]

    def read_unpacked(self, key: int) -> tuple[IRHeader, bytes]:
        """(header, payload) of record `key`, as mxnet's `unpack(read_idx(key))`."""
        data = self.read(key)
        header, start = parse_header(data, self.where(key))
        return header, data[start:]


# ---------------------------------------------------------------------------- writer


class IndexedRecordWriter:
    """Writes a `.rec` / `.idx` pair with the same bytes as mxnet's MXIndexedRecordIO."""

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike):
        self.rec_path, self.idx_path = str(rec_path), str(idx_path)
        self._rec = open(self.rec_path, "wb")
        self._idx = open(self.idx_path, "w", newline="\n")

    def tell(self) -> int:
        return self._rec.tell()

    def write(self, key: int, record: bytes) -> int:
        """Append `record` (already `pack`ed) under `key`; returns its byte offset."""
        offset = self._rec.tell()
        self._rec.write(frame(record))
        self._idx.write(f"{int(key)}\t{offset}\n")
        return offset

    def overwrite(self, offset: int, record: bytes) -> None:
        """Replace the record at `offset` by one of exactly the same framed size."""
        framed = frame(record)
        end = self._rec.tell()
        self._rec.seek(offset)
        self._rec.write(framed)
        self._rec.seek(end)

    def close(self) -> None:
        for f in (self._rec, self._idx):
            if not f.closed:
                f.close()

    def __enter__(self) -> "IndexedRecordWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# Record 0's labels are float32: keys above 2**24 are not representable exactly.
_MAX_FLOAT32_INT = 1 << 24


def write_identity_records(
    out_dir: str | os.PathLike,
    identities: Iterable[Sequence[bytes]],
    image_size: tuple[int, int] = (112, 112),
) -> tuple[int, int]:
    """Write `train.rec`, `train.idx` and `property` in the insightface (MS1M) layout.

    `identities[k]` holds the encoded images (JPEG/PNG bytes) of class k. Layout: record 0
    is a header (labels [1 + num_images, 1 + num_images + num_classes]); records
    1 .. num_images are the images in identity order (label = class, id = key); then one
    record per identity with labels [first image key, last image key + 1]. Files appear
    under their final names only when everything was written. Returns
    (num_classes, num_images).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        # Entered in this order, renamed in the reverse one: train.idx, train.rec, then property.
        temp = {name: stack.enter_context(atomic_path(out / name)) for name in ("property", "train.rec", "train.idx")}
        ranges: list[tuple[int, int]] = []
        with IndexedRecordWriter(temp["train.rec"], temp["train.idx"]) as writer:
            # Placeholder header of the final size; rewritten once the counts are known.
            writer.write(0, pack(IRHeader(2, [0.0, 0.0], 0, 0)))
            key = 1
            for label, images in enumerate(identities):
                start = key
                for image in images:
                    writer.write(key, pack(IRHeader(0, float(label), key, 0), image))
                    key += 1
                if key == start:
                    raise DataError(f"identity {label} has no images")
                ranges.append((start, key))
            num_images, num_classes = key - 1, len(ranges)
            if num_classes == 0:
                raise DataError("no identities to write")
            if 1 + num_images + num_classes > _MAX_FLOAT32_INT:
                raise DataError(
                    f"{num_images} images + {num_classes} identities exceed what the MS1M layout's float32 "
                    f"header can index ({_MAX_FLOAT32_INT})"
                )
            for k, (start, end) in enumerate(ranges):
                id_key = 1 + num_images + k
                writer.write(id_key, pack(IRHeader(2, [float(start), float(end)], id_key, 0)))
            writer.overwrite(0, pack(IRHeader(2, [float(1 + num_images), float(1 + num_images + num_classes)], 0, 0)))
        height, width = image_size
        temp["property"].write_text(f"{num_classes},{height},{width}", newline="")
    return num_classes, num_images
