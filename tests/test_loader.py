"""The distributed sampler and the training DataLoader; tools/pack_rec.py round trips.

Sampler: identical permutation on every rank, disjoint equal shards, set_epoch, resume at a
batch. Loader: whole batches only, workers seeded per rank, the same batches with 0 and 2
workers, DataError from a worker arrives with its message. pack_rec: an image folder packed
and read back with our reader, byte for byte for JPEG files, and its errors.
"""

import cv2
import numpy as np
import pytest
import torch

from conftest import copy_ms1m_style
from dataset import DataError, MXFaceDataset, ResumableDistributedSampler, get_dataloader, inspect_dataset
from helpers import PYTHON, REPO_ROOT, run_script


def test_shards_are_disjoint_equal_and_cover_all_but_the_tail():
    shards = []
    for rank in range(3):
        sampler = ResumableDistributedSampler(50, rank=rank, world_size=3, seed=5, batch_size=4)
        sampler.set_epoch(1)
        shards.append(list(sampler))
    assert [len(s) for s in shards] == [16, 16, 16]
    union = set().union(*map(set, shards))
    assert len(union) == 48 and union <= set(range(50))


def test_epochs_shuffle_differently_and_reproducibly():
    sampler = ResumableDistributedSampler(40, seed=5, batch_size=4)
    sampler.set_epoch(0)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert first != second and sorted(first) == sorted(second) == list(range(40))
    again = ResumableDistributedSampler(40, seed=5, batch_size=4)
    again.set_epoch(1)
    assert list(again) == second


def test_resume_at_a_batch_continues_the_same_order():
    sampler = ResumableDistributedSampler(40, rank=1, world_size=2, seed=3, batch_size=4)
    sampler.set_epoch(2)
    whole = list(sampler)
    sampler.set_epoch(2, start_batch=3)
    assert list(sampler) == whole[12:] and len(sampler) == len(whole) - 12
    with pytest.raises(ValueError, match="start_batch=6 is outside this epoch"):
        sampler.set_epoch(2, start_batch=6)


@pytest.fixture(scope="module")
def ms1m(tmp_path_factory):
    return copy_ms1m_style(tmp_path_factory.mktemp("ms1m"))


def _epoch(loader, epoch, start_batch=0):
    loader.set_epoch(epoch, start_batch=start_batch)
    return [(images.clone(), labels.clone()) for images, labels in loader]


def test_loader_batches_are_the_same_with_and_without_workers(ms1m):
    batches = {}
    for workers in (0, 2):
        loader = get_dataloader(str(ms1m), 0, 5, seed=11, num_workers=workers, rank=1, world_size=2)
        batches[workers] = _epoch(loader, 3)
    assert len(batches[0]) == 24 // 5  # drop_last: 24 samples per rank, whole batches only
    for (x0, y0), (x2, y2) in zip(batches[0], batches[2]):
        assert x0.shape == (5, 3, 112, 112) and x0.dtype == torch.float32 and y0.dtype == torch.int64
        assert torch.equal(x0, x2) and torch.equal(y0, y2)
    images = torch.cat([x for x, _ in batches[0]])
    assert -1.0 <= images.min() and images.max() <= 1.0


def test_loader_resumes_mid_epoch_with_the_remaining_batches(ms1m):
    loader = get_dataloader(str(ms1m), 0, 4, seed=11, num_workers=1)
    whole = _epoch(loader, 1)
    resumed = _epoch(loader, 1, start_batch=5)
    assert len(resumed) == len(whole) - 5
    for (xa, ya), (xb, yb) in zip(whole[5:], resumed):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_ranks_read_different_samples(ms1m):
    labels = []
    for rank in range(2):
        loader = get_dataloader(str(ms1m), 0, 4, seed=11, num_workers=0, rank=rank, world_size=2)
        labels.append(torch.cat([y.cpu() for _, y in _epoch(loader, 0)]))
    both = torch.cat(labels).sort().values
    assert torch.equal(both, torch.arange(12).repeat_interleave(4))  # every image once over the 2 ranks


def test_batch_larger_than_the_rank_share_is_a_clear_error(ms1m):
    with pytest.raises(DataError, match=r"batch_size=30 is larger than this rank's share .* 24 per rank"):
        get_dataloader(str(ms1m), 0, 30, rank=0, world_size=2)


def test_worker_data_error_arrives_with_its_message(tmp_path):
    folder = tmp_path / "faces"
    for identity in ("a", "b"):
        (folder / identity).mkdir(parents=True)
        for i in range(4):
            image = np.full((112, 112, 3), 40 * i, dtype=np.uint8)
            cv2.imwrite(str(folder / identity / f"{i}.png"), image)
    (folder / "b" / "3.png").write_bytes(b"not an image")
    loader = get_dataloader(str(folder), 0, 8, num_workers=1)
    loader.set_epoch(0)
    with pytest.raises(DataError, match=r"3\.png"):
        list(loader)


# --- tools/pack_rec.py --------------------------------------------------------------------

def _face_folder(root, identities=3, per_identity=3):
    rng = np.random.default_rng(0)
    for k in range(identities):
        (root / f"id_{k:02d}").mkdir(parents=True)
        for i in range(per_identity):
            # Smooth colour fields, like real faces (pure noise is what JPEG cannot keep).
            coarse = rng.uniform(0, 255, size=(7, 7, 3)).astype(np.float32)
            image = np.clip(cv2.resize(coarse, (112, 112), interpolation=cv2.INTER_CUBIC), 0, 255).astype(np.uint8)
            ext = ".jpg" if i % 2 == 0 else ".png"
            cv2.imwrite(str(root / f"id_{k:02d}" / f"{i}{ext}"), image)
    return root


def test_pack_rec_round_trip(tmp_path):
    faces = _face_folder(tmp_path / "faces")
    out = tmp_path / "rec"
    proc = run_script([PYTHON, REPO_ROOT / "tools" / "pack_rec.py", faces, out, "--workers", "2", "--quality", "100"])
    assert "num_classes = 3" in proc.stdout and "num_image = 9" in proc.stdout
    assert (out / "property").read_text().startswith("3,112,112")
    info = inspect_dataset(str(out))
    assert (info.num_classes, info.num_images) == (3, 9)

    dataset = MXFaceDataset(str(out), train=False)
    assert len(dataset) == 9
    paths = sorted(faces.glob("*/*"))
    for index, path in enumerate(paths):
        image, label = dataset[index]
        assert int(label) == index // 3
        stored = bytes(dataset.read_encoded(index)[0])
        if path.suffix == ".jpg":  # JPEG files are copied, not re-encoded
            assert stored == path.read_bytes()
        else:  # other formats are encoded as JPEG at the chosen quality
            original = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB).astype(np.float32)
            decoded = (image.permute(1, 2, 0).numpy() * 0.5 + 0.5) * 255
            assert np.abs(decoded - original).mean() < 2


def test_pack_rec_refuses_bad_images_and_leaves_nothing(tmp_path):
    faces = _face_folder(tmp_path / "faces", identities=2, per_identity=2)
    cv2.imwrite(str(faces / "id_01" / "big.png"), np.zeros((120, 100, 3), dtype=np.uint8))
    out = tmp_path / "rec"
    proc = run_script([PYTHON, REPO_ROOT / "tools" / "pack_rec.py", faces, out], check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "\r" not in line]
    assert proc.returncode == 2 and "big.png: image is 100x120" in proc.stderr and "--resize" in lines[-1]
    assert not out.exists() or not any(out.iterdir())
