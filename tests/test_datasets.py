"""Data sets: the mxnet-written MS1M pair decoded exactly, the im2rec layout, image folders,
synthetic data, deterministic flips, bad data and inspect_dataset."""
from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest
import torch

from conftest import SHARED_TESTDATA
from helpers import PYTHON, run_script
from dataset import (
    BadImageError,
    DataError,
    ImageFolderDataset,
    IndexedRecordWriter,
    IRHeader,
    LabelError,
    MXFaceDataset,
    RecordIOError,
    SyntheticDataset,
    flip_decision,
    inspect_dataset,
    pack,
    write_identity_records,
)
from dataset.transforms import normalize_batch, to_float
from test_recordio import jpeg_bytes

MS1M = SHARED_TESTDATA / "ms1m_style"
EXACT = ((np.arange(256) / 255.0 - 0.5) / 0.5).astype(np.float32)  # the contract, rounded once


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((MS1M / "manifest.json").read_text())


def planar(dataset, index: int, epoch: int = 0) -> tuple[np.ndarray, int]:
    out = np.empty((3, 112, 112), dtype=np.uint8)
    label = dataset.load_planar(index, epoch, out)
    return out, label


# ---------------------------------------------------------------- MS1M pair written by mxnet


def test_ms1m_pixels_and_labels_exact(manifest):
    dataset = MXFaceDataset(MS1M, train=False)
    assert dataset.layout.kind == "ms1m" and len(dataset) == 48
    for index in range(48):
        expected = manifest["images"][str(index + 1)]
        rgb, label = planar(dataset, index)
        assert label == int(expected["label"])
        assert int(rgb.sum(dtype=np.int64)) == expected["sum"]
        assert rgb[:, 56, :8].T.tolist() == expected["row56_first8_rgb"]
        assert abs(rgb.mean() - expected["mean"]) <= 5e-4
        assert np.allclose(rgb.reshape(3, -1).mean(axis=1), expected["mean_rgb"], atol=5e-4)


def test_getitem_contract_float_rgb_normalised(manifest):
    dataset = MXFaceDataset(MS1M, train=False)
    image, label = dataset[5]
    assert image.shape == (3, 112, 112) and image.dtype == torch.float32 and image.is_contiguous()
    assert label.dtype == torch.int64 and label.item() == int(manifest["images"]["6"]["label"])
    rgb, _ = planar(dataset, 5)
    assert torch.equal(image, torch.from_numpy(EXACT[rgb]))
    # the loader's device-side normalisation gives the same floats
    assert torch.equal(normalize_batch(torch.from_numpy(rgb)[None])[0], image)
    assert np.array_equal(to_float(rgb), EXACT[rgb])


def test_flip_is_mirror_and_pure_function_of_seed_epoch_index():
    dataset = MXFaceDataset(MS1M, train=True, seed=7)
    plain = MXFaceDataset(MS1M, train=False)
    decisions = {(e, i): flip_decision(7, e, i) for e in range(3) for i in range(48)}
    assert 0.3 < np.mean(list(decisions.values())) < 0.7
    assert any(decisions[(0, i)] != decisions[(1, i)] for i in range(48))
    for epoch in (0, 1):
        for index in (0, 1, 2, 3, 17):
            rgb, _ = planar(dataset, index, epoch)
            reference, _ = planar(plain, index)
            expected = reference[:, :, ::-1] if decisions[(epoch, index)] else reference
            assert np.array_equal(rgb, expected)
    dataset.set_epoch(1)
    flipped = next(i for i in range(48) if decisions[(1, i)])
    assert torch.equal(dataset[flipped][0], plain[flipped][0].flip(-1))
    assert not any(plain.flips(i, e) for e in range(3) for i in range(48))  # evaluation never flips


def test_flip_decision_is_a_fair_coin_per_seed_and_epoch_that_any_process_agrees_on():
    n = 20_000
    coins = np.array([[[flip_decision(seed, epoch, i) for i in range(n)] for epoch in range(2)] for seed in (0, 7)])
    assert np.all(np.abs(coins.mean(axis=2) - 0.5) < 0.02)  # fair: 5 sigma of a true coin
    # A new epoch or a new seed draws new coins: about half agree (not all, not none).
    assert 0.47 < np.mean(coins[:, 0] == coins[:, 1]) < 0.53
    assert 0.47 < np.mean(coins[0] == coins[1]) < 0.53
    # Neighbouring samples are independent (no stripes a worker's contiguous share would see).
    assert 0.47 < np.mean(coins[..., 1:] == coins[..., :-1]) < 0.53
    # Another interpreter with another hash seed (a spawned worker, a resumed run) agrees:
    # the decision depends on (seed, epoch, index) alone, not on process state or call order.
    script = (
        "from dataset.transforms import flip_decision\n"
        "print(''.join('1' if flip_decision(s, e, i) else '0' for s in (0, 7) for e in (0, 1) for i in range(999, -1, -1)))"
    )
    proc = run_script([PYTHON, "-c", script], env={"PYTHONHASHSEED": "12345"})
    other = np.array([c == "1" for c in proc.stdout.strip()]).reshape(2, 2, 1000)[..., ::-1]
    assert np.array_equal(other, coins[..., :1000])


def test_inspect_ms1m():
    assert tuple(inspect_dataset(MS1M)) == ("ms1m", 12, 48)


def _copy_ms1m(tmp_path):
    for name in ("train.rec", "train.idx", "property"):
        shutil.copy(MS1M / name, tmp_path / name)
    return tmp_path


def test_inspect_property_disagreeing_with_header(tmp_path):
    root = _copy_ms1m(tmp_path)
    (root / "property").write_text("13,112,112")
    with pytest.raises(DataError, match=r"property says 13 classes.*12 identity records"):
        inspect_dataset(root)
    (root / "property").unlink()
    assert inspect_dataset(root).num_classes == 12  # from the identity records


# ---------------------------------------------------------------- im2rec layout


def _write_im2rec(root, labels, payloads):
    root.mkdir(exist_ok=True)
    with IndexedRecordWriter(root / "train.rec", root / "train.idx") as writer:
        for key, (label, payload) in enumerate(zip(labels, payloads)):
            writer.write(key, pack(IRHeader(0, label, key, 0), payload))


def test_im2rec_scalar_and_vector_labels(tmp_path):
    payloads = [jpeg_bytes(i) for i in range(6)]
    scalar = tmp_path / "scalar"
    _write_im2rec(scalar, [0.0, 1.0, 2.0, 1.0, 0.0, 2.0], payloads)
    vector = tmp_path / "vector"
    _write_im2rec(vector, [[0.0, 9.0], [1.0, 9.0], [2.0, 5.0], [1.0, 0.0], [0.0, 1.0], [2.0, 2.0]], payloads)
    for root in (scalar, vector):
        dataset = MXFaceDataset(root, train=False)
        assert dataset.layout.kind == "im2rec" and len(dataset) == 6
        labels = [int(dataset[i][1]) for i in range(6)]
        assert labels == [0, 1, 2, 1, 0, 2]
        expected = cv2.cvtColor(cv2.imdecode(np.frombuffer(payloads[4], np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        assert np.array_equal(planar(dataset, 4)[0], expected.transpose(2, 0, 1))
        assert tuple(inspect_dataset(root)) == ("im2rec", 3, 6)  # no property: read from the labels
    (scalar / "property").write_text("5,112,112")
    assert tuple(inspect_dataset(scalar)) == ("im2rec", 5, 6)


# ---------------------------------------------------------------- image folders


def _image_folder(root, counts, size=(112, 112)):
    for k, count in enumerate(counts):
        folder = root / f"id_{k:02d}"
        folder.mkdir(parents=True)
        for i in range(count):
            (folder / f"{i}.jpg").write_bytes(jpeg_bytes(100 * k + i, size))
    return root


def test_image_folder_labels_pixels_and_inspect(tmp_path):
    root = _image_folder(tmp_path / "faces", [2, 3, 1])
    (root / "id_01" / "notes.txt").write_text("ignored")
    (root / ".hidden").mkdir()
    dataset = ImageFolderDataset(root, train=False)
    assert dataset.class_names == ["id_00", "id_01", "id_02"] and len(dataset) == 6
    assert [int(dataset[i][1]) for i in range(6)] == [0, 0, 1, 1, 1, 2]
    raw = cv2.imdecode(np.frombuffer((root / "id_01" / "2.jpg").read_bytes(), np.uint8), cv2.IMREAD_COLOR)
    assert np.array_equal(planar(dataset, 4)[0], raw[:, :, ::-1].transpose(2, 0, 1))
    assert tuple(inspect_dataset(root)) == ("image_folder", 3, 6)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no identity sub-folders"):
        ImageFolderDataset(tmp_path / "empty")
    root = _image_folder(tmp_path / "f", [1, 0])
    with pytest.raises(DataError, match=r"id_01 has no images"):
        ImageFolderDataset(root)
    wrong = _image_folder(tmp_path / "w", [1], size=(100, 90))
    with pytest.raises(BadImageError, match=r"0\.jpg: image is 90x100.*expected 112x112"):
        ImageFolderDataset(wrong)[0]


# ---------------------------------------------------------------- synthetic


def test_synthetic_fixed_image_and_labels():
    dataset = SyntheticDataset(50, num_classes=7, seed=3)
    a, la = dataset[3]
    b, lb = dataset[10]
    assert len(dataset) == 50 and a.shape == (3, 112, 112) and torch.equal(a, b)
    assert (la.item(), lb.item()) == (3, 3)
    assert float(a.min()) >= -1.0 and float(a.max()) <= 1.0 and float(a.std()) > 0.3


# ---------------------------------------------------------------- bad data


def _rec_with_bad_image(tmp_path):
    images = [[jpeg_bytes(0), b"not a jpeg at all", jpeg_bytes(1)], [jpeg_bytes(2), jpeg_bytes(3)]]
    write_identity_records(tmp_path, images)
    return tmp_path


def test_undecodable_image_names_record(tmp_path):
    dataset = MXFaceDataset(_rec_with_bad_image(tmp_path), train=False)
    with pytest.raises(BadImageError, match=rf"{tmp_path / 'train.rec'} record key 2 \(offset \d+\): cannot decode"):
        dataset[1]


def test_skip_bad_images_substitutes_next_and_counts(tmp_path):
    dataset = MXFaceDataset(_rec_with_bad_image(tmp_path), train=False, skip_bad_images=True)
    with pytest.warns(RuntimeWarning, match="skipping undecodable image.*record key 2"):
        image, label = dataset[1]
    assert torch.equal(image, dataset[2][0]) and label.item() == 0
    dataset[1]
    assert dataset.num_skipped == 2


def test_label_not_below_num_classes(tmp_path):
    write_identity_records(tmp_path, [[jpeg_bytes(0)], [jpeg_bytes(1)], [jpeg_bytes(2)]])
    dataset = MXFaceDataset(tmp_path, num_classes=2)
    dataset[1]
    with pytest.raises(LabelError, match=rf"{tmp_path / 'train.rec'} record key 3 .*label 2 >= num_classes=2"):
        dataset[2]


def test_missing_folder_rec_or_idx(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        MXFaceDataset(tmp_path / "nothing")
    root = _copy_ms1m(tmp_path)
    (root / "train.idx").unlink()
    with pytest.raises(DataError, match=r"train\.idx not found"):
        MXFaceDataset(root)
    with pytest.raises(DataError, match=r"train\.idx not found"):
        inspect_dataset(root)


def test_header_announcing_missing_images(tmp_path):
    root = _copy_ms1m(tmp_path)
    lines = (root / "train.idx").read_text().splitlines()
    (root / "train.idx").write_text("\n".join(lines[:10] + lines[11:]) + "\n")  # drop key 10
    with pytest.raises(RecordIOError, match="announces image records 1 .. 48 but key 10 is not in the index"):
        MXFaceDataset(root)


def test_inspect_rejects_empty_and_missing(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        inspect_dataset(tmp_path / "missing")
    with pytest.raises(DataError, match="is empty or holds neither"):
        inspect_dataset(tmp_path)
    assert tuple(inspect_dataset("synthetic")) == ("synthetic", None, None)
