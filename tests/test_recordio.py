"""RecordIO against files written by mxnet 1.9.1 (shared testdata) and against the format rules."""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import struct

import cv2
import numpy as np
import pytest

from conftest import SHARED_TESTDATA
from dataset.errors import DataError, RecordIOError
from dataset.recordio import (
    MAGIC,
    IndexedRecordReader,
    IndexedRecordWriter,
    IRHeader,
    frame,
    iter_frames,
    pack,
    read_index,
    unpack,
    write_identity_records,
)

MS1M = SHARED_TESTDATA / "ms1m_style"


def jpeg_bytes(seed: int, size: tuple[int, int] = (112, 112), quality: int = 95) -> bytes:
    """A small smooth random JPEG (shared by the data-layer tests)."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.float32)
    image = cv2.resize(coarse, (size[1], size[0]), interpolation=cv2.INTER_LINEAR).astype(np.uint8)
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return encoded.tobytes()


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((MS1M / "manifest.json").read_text())


@pytest.fixture()
def reader():
    r = IndexedRecordReader(MS1M / "train.rec", MS1M / "train.idx")
    yield r
    r.close()


# ---------------------------------------------------------------- the mxnet-written pair


def test_index_lists_keys_in_file_order(manifest):
    keys, offsets = read_index(MS1M / "train.idx")
    assert keys.tolist() == manifest["idx_keys_in_file_order"]
    assert offsets[0] == 0 and offsets[1] == 40  # record 0: 8-byte frame + 32 bytes of data
    assert (np.diff(offsets) > 0).all()


def test_header_record_zero(reader, manifest):
    header, payload = reader.read_unpacked(0)
    expected = manifest["header0"]
    assert (header.flag, header.id, header.id2) == (expected["flag"], expected["id"], expected["id2"])
    assert header.label.tolist() == expected["label"]
    assert payload == b""


def test_identity_records(reader, manifest):
    for key, expected in manifest["identity_records"].items():
        header, payload = reader.read_unpacked(int(key))
        assert header.flag == expected["flag"] and header.id == expected["id"] and header.id2 == 0
        assert header.label.tolist() == expected["label"]
        assert payload == b""


def test_image_records_headers_and_payloads(reader, manifest):
    for key, expected in manifest["images"].items():
        header, payload = reader.read_unpacked(int(key))
        assert (header.flag, header.label, header.id, header.id2) == (
            expected["flag"], expected["label"], expected["id"], expected["id2"],
        )
        assert len(payload) == expected["jpeg_bytes"]
        assert hashlib.sha256(payload).hexdigest()[:16] == expected["jpeg_sha256_16"]


def test_read_header_matches_full_read(reader):
    for key in (0, 1, 48, 49, 60):
        short = reader.read_header(key)
        full, _ = reader.read_unpacked(key)
        assert short.flag == full.flag and short.id == full.id
        assert np.array_equal(np.asarray(short.label), np.asarray(full.label))


def test_sequential_frames_equal_indexed_reads(reader):
    records = list(iter_frames((MS1M / "train.rec").read_bytes()))
    assert len(records) == 61
    assert all(records[k] == reader.read(k) for k in range(61))


def test_writer_reproduces_mxnet_files_byte_for_byte(reader, tmp_path):
    identities = [[reader.read_unpacked(4 * k + i)[1] for i in range(1, 5)] for k in range(12)]
    assert write_identity_records(tmp_path, iter(identities)) == (12, 48)
    for name in ("train.rec", "train.idx", "property"):
        assert (tmp_path / name).read_bytes() == (MS1M / name).read_bytes(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["property", "train.idx", "train.rec"]


def test_low_level_writer_reproduces_every_record(reader, tmp_path):
    with IndexedRecordWriter(tmp_path / "x.rec", tmp_path / "x.idx") as writer:
        for key in range(61):
            header, payload = reader.read_unpacked(key)
            label = header.label if header.flag else float(header.label)
            writer.write(key, pack(IRHeader(header.flag, label, header.id, header.id2), payload))
    assert (tmp_path / "x.rec").read_bytes() == (MS1M / "train.rec").read_bytes()
    assert (tmp_path / "x.idx").read_bytes() == (MS1M / "train.idx").read_bytes()


# ---------------------------------------------------------------- format rules


def test_pack_unpack_scalar_and_vector_labels():
    header, payload = unpack(pack(IRHeader(0, 7.0, 3, 0), b"abc"))
    assert header == IRHeader(0, 7.0, 3, 0) and payload == b"abc"
    data = pack(IRHeader(0, [4.0, 1.5, 2.0], 9, 1), b"xyz")
    assert struct.unpack_from("<IfQQ", data) == (3, 0.0, 9, 1)  # mxnet sets flag = count, label field 0
    header, payload = unpack(data)
    assert header.flag == 3 and header.label.tolist() == [4.0, 1.5, 2.0] and payload == b"xyz"


def test_frame_layout_and_padding():
    framed = frame(b"12345")
    magic, lrecord = struct.unpack_from("<II", framed)
    assert magic == MAGIC and lrecord == 5 and len(framed) == 16 and framed[13:] == b"\0\0\0"


def test_magic_inside_data_splits_record_like_dmlc():
    magic = struct.pack("<I", MAGIC)
    data = b"abcd" + magic + b"efgh" + magic + b"ij"
    framed = frame(data)
    words = [struct.unpack_from("<II", framed, off) for off in (0, 12, 24)]
    # parts "abcd" (flag 1), "efgh" (flag 2), "ij" (flag 3); the aligned magic words are dropped
    assert [(w[1] >> 29, w[1] & ((1 << 29) - 1)) for w in words] == [(1, 4), (2, 4), (3, 2)]
    assert len(framed) == 36
    assert list(iter_frames(framed)) == [data]
    # an unaligned magic is plain data
    unaligned = b"ab" + magic + b"cd"
    assert frame(unaligned)[4:8] == struct.pack("<I", len(unaligned))
    assert list(iter_frames(frame(unaligned))) == [unaligned]


def test_indexed_reader_joins_multi_part_records(tmp_path):
    magic = struct.pack("<I", MAGIC)
    records = {0: pack(IRHeader(0, 1.0, 0, 0), b"\0" * 8 + magic + b"tail!"), 5: pack(IRHeader(0, 2.0, 5, 0), b"x")}
    with IndexedRecordWriter(tmp_path / "m.rec", tmp_path / "m.idx") as writer:
        for key, record in records.items():
            writer.write(key, record)
    reader = IndexedRecordReader(tmp_path / "m.rec", tmp_path / "m.idx")
    assert reader.read(0) == records[0] and reader.read(5) == records[5]


def test_index_that_skips_records_still_reads_them(tmp_path):
    with IndexedRecordWriter(tmp_path / "s.rec", tmp_path / "full.idx") as writer:
        for key in range(3):
            writer.write(key, pack(IRHeader(0, float(key), key, 0), bytes([key]) * (100 + key)))
    lines = (tmp_path / "full.idx").read_text().splitlines()
    (tmp_path / "s.idx").write_text(lines[1] + "\n")  # only key 1
    reader = IndexedRecordReader(tmp_path / "s.rec", tmp_path / "s.idx")
    assert unpack(reader.read(1))[1] == b"\1" * 101


def _read_in_child(reader, keys, queue):
    records = [reader.read(k) for k in keys]
    queue.put((os.getpid(), reader._pid, records))
    reader.close()  # closes the child's own handle; the parent's stays open


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_child_process_reads_the_same_records_through_its_own_handle(reader, method):
    """A DataLoader worker gets the reader by fork (the parent's open handle inherited) or by
    spawn (pickled, without a handle): either way it opens its own and reads the same bytes,
    and the parent keeps reading through its handle afterwards."""
    keys = [int(k) for k in reader.keys[:8]]
    parent_bytes = [reader.read(k) for k in keys]  # the parent's handle is open before the child starts
    parent_fd = reader._fd
    ctx = multiprocessing.get_context(method)
    queue = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(reader, keys, queue))
    child.start()
    child_pid, handle_pid, child_bytes = queue.get(timeout=120)
    child.join(timeout=60)
    assert child.exitcode == 0
    assert handle_pid == child_pid != os.getpid()  # the child's reads went through a handle it opened
    assert child_bytes == parent_bytes
    assert reader._fd == parent_fd and reader._pid == os.getpid()
    assert [reader.read(k) for k in reversed(keys)] == parent_bytes[::-1]


# ---------------------------------------------------------------- bad files


def _copy_pair(tmp_path):
    rec, idx = tmp_path / "train.rec", tmp_path / "train.idx"
    rec.write_bytes((MS1M / "train.rec").read_bytes())
    idx.write_bytes((MS1M / "train.idx").read_bytes())
    return rec, idx


def test_truncated_rec_names_file_key_and_offset(tmp_path):
    rec, idx = _copy_pair(tmp_path)
    keys, offsets = read_index(idx)
    rec.write_bytes(rec.read_bytes()[: offsets[60] + 20])  # cut inside the last record
    reader = IndexedRecordReader(rec, idx)
    with pytest.raises(RecordIOError, match=rf"{rec}.*key 60.*offset {offsets[60]}.*truncated"):
        reader.read(60)


def test_wrong_magic_names_file_key_and_offset(tmp_path):
    rec, idx = _copy_pair(tmp_path)
    keys, offsets = read_index(idx)
    data = bytearray(rec.read_bytes())
    data[offsets[7]: offsets[7] + 4] = b"\0\0\0\0"
    rec.write_bytes(bytes(data))
    reader = IndexedRecordReader(rec, idx)
    with pytest.raises(RecordIOError, match=rf"{rec}.*key 7.*offset {offsets[7]}.*bad magic 0x00000000"):
        reader.read(7)


def test_index_offset_past_end_of_file(tmp_path):
    rec, idx = _copy_pair(tmp_path)
    idx.write_text(idx.read_text() + "61\t999999\n")
    with pytest.raises(RecordIOError, match=rf"{idx}.*key 61.*offset 999999.*past the end.*316320 bytes"):
        IndexedRecordReader(rec, idx)


def test_malformed_index_line(tmp_path):
    rec, idx = _copy_pair(tmp_path)
    lines = idx.read_text().splitlines()
    lines[3] = "3\tabc"
    idx.write_text("\n".join(lines) + "\n")
    with pytest.raises(RecordIOError, match=rf"{idx} line 4"):
        IndexedRecordReader(rec, idx)


def test_missing_files_and_keys(tmp_path, reader):
    with pytest.raises(DataError, match="not found"):
        IndexedRecordReader(tmp_path / "nope.rec", MS1M / "train.idx")
    with pytest.raises(DataError, match="not found"):
        IndexedRecordReader(MS1M / "train.rec", tmp_path / "nope.idx")
    with pytest.raises(RecordIOError, match="key 99 is not in"):
        reader.read(99)


def test_identity_writer_failure_leaves_nothing(tmp_path):
    def identities():
        yield [jpeg_bytes(0)]
        raise RuntimeError("encoder crashed")

    with pytest.raises(RuntimeError):
        write_identity_records(tmp_path, identities())
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DataError, match="identity 1 has no images"):
        write_identity_records(tmp_path, [[jpeg_bytes(0)], []])
    assert list(tmp_path.iterdir()) == []
