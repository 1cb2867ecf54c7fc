"""Verification sets: the real Python-2 .bin, refusing unsafe pickles, write/read round trip,
and evaluate() against a plain loop implementation of insightface's protocol."""
from __future__ import annotations

import json
import pickle

import cv2
import numpy as np
import pytest
import torch

from conftest import SHARED_TESTDATA
from dataset.verification_bin import VerificationSetError, load_bin, write_bin
from eval.verification import _interpolate_threshold, distinct_images, embed_verification_set, evaluate

LFW_BIN = SHARED_TESTDATA / "lfw_style.bin"
LFW_MANIFEST = SHARED_TESTDATA / "lfw_style_manifest.json"


# ---------------------------------------------------------------------------------------------
# Reading and writing .bin files


def test_python2_bin_decodes_exactly_as_the_manifest_says():
    manifest = json.loads(LFW_MANIFEST.read_text())
    (images, flipped), issame = load_bin(str(LFW_BIN))
    assert issame == manifest["issame"]
    assert images.dtype == torch.uint8 and images.shape == (manifest["num_images"], 3, 112, 112)
    for i, info in enumerate(manifest["images"]):
        rgb = images[i].permute(1, 2, 0).numpy()  # HWC, RGB
        assert int(rgb.astype(np.int64).sum()) == info["sum"], f"image {i}"
        assert rgb[56, :8].tolist() == info["row56_first8_rgb"], f"image {i}"
        assert np.allclose(rgb.reshape(-1, 3).mean(0), info["mean_rgb"], atol=5e-4)
    assert torch.equal(flipped, images.flip(3))


class _WritesAFile:
    """Unpickling this calls open(path, 'w'): the file appears if anything is executed."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_with_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "payload_ran"
    bin_path = tmp_path / "evil.bin"
    bin_path.write_bytes(pickle.dumps(([_WritesAFile(marker), b"\xff\xd8"], [True]), protocol=2))

    with pytest.raises(VerificationSetError) as err:
        load_bin(str(bin_path))
    assert str(bin_path) in str(err.value) and "refusing" in str(err.value)
    assert not marker.exists()

    # The payload is real: an unrestricted unpickler runs it.
    with open(bin_path, "rb") as f:
        pickle.load(f)
    assert marker.exists()


def _png(seed: int, size=(112, 112)) -> tuple[bytes, np.ndarray]:
    rgb = np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)
    ok, enc = cv2.imencode(".png", rgb[:, :, ::-1].copy())
    assert ok
    return enc.tobytes(), rgb


def test_write_then_load_round_trip(tmp_path):
    encoded, pixels = zip(*[_png(i) for i in range(6)])
    issame = [True, False, True]
    path = tmp_path / "set.bin"
    write_bin(str(path), encoded, issame)

    # What insightface's loader does with the file.
    with open(path, "rb") as f:
        bins, flags = pickle.load(f, encoding="bytes")
    assert bins == list(encoded) and flags == issame

    (images, flipped), loaded_issame = load_bin(str(path))
    assert loaded_issame == issame
    for i in range(6):
        assert np.array_equal(images[i].permute(1, 2, 0).numpy(), pixels[i])
        assert np.array_equal(flipped[i].permute(1, 2, 0).numpy(), pixels[i][:, ::-1])
    assert [p.name for p in tmp_path.iterdir()] == ["set.bin"]  # no temporary left behind


def test_other_sizes_are_resized(tmp_path):
    encoded, _ = zip(*[_png(i, size=(120, 100)) for i in range(2)])
    write_bin(str(tmp_path / "s.bin"), encoded, [True])
    (images, _), _ = load_bin(str(tmp_path / "s.bin"), image_size=(112, 96))
    assert images.shape == (2, 3, 112, 96)


@pytest.mark.parametrize(
    "content, expected",
    [
        (["not", "a", "pair"], "expected a pickled"),
        (([b"a", b"b", b"c"], [True]), "3 images for 1 pairs"),
        (([b"a", "text"], [True]), "image 1 is a str"),
        (([b"a", b"b"], ["yes"]), "issame[0]"),
        (([b"not an image", b"neither"], [True]), "image 0 (12 bytes) cannot be decoded"),
        (([], []), "no pairs"),
    ],
)
def test_malformed_sets_name_the_file_and_the_problem(tmp_path, content, expected):
    path = tmp_path / "bad.bin"
    path.write_bytes(pickle.dumps(content, protocol=4))
    with pytest.raises(VerificationSetError) as err:
        load_bin(str(path))
    assert str(path) in str(err.value) and expected in str(err.value)


def test_truncated_file_is_a_clear_error(tmp_path):
    path = tmp_path / "cut.bin"
    path.write_bytes(LFW_BIN.read_bytes()[:5000])
    with pytest.raises(VerificationSetError, match="not a readable verification .bin"):
        load_bin(str(path))


# ---------------------------------------------------------------------------------------------
# evaluate() against a plain implementation of the protocol


def _reference_accuracy(threshold, dist, issame):
    predict = dist < threshold
    tp = np.sum(predict & issame)
    fp = np.sum(predict & ~issame)
    tn = np.sum(~predict & ~issame)
    fn = np.sum(~predict & issame)
    tpr = 0.0 if tp + fn == 0 else tp / (tp + fn)
    fpr = 0.0 if fp + tn == 0 else fp / (fp + tn)
    return tpr, fpr, (tp + tn) / dist.size


def _reference_val_far(threshold, dist, issame):
    predict = dist < threshold
    n_same, n_diff = np.sum(issame), np.sum(~issame)
    val = 0.0 if n_same == 0 else np.sum(predict & issame) / n_same
    far = 0.0 if n_diff == 0 else np.sum(predict & ~issame) / n_diff
    return val, far


def _reference_folds(n, k):
    folds, start = [], 0
    for f in range(k):
        size = n // k + (1 if f < n % k else 0)
        folds.append(list(range(start, start + size)))
        start += size
    return folds


def _reference_pca_dist(e1, e2, train, n_components):
    fit = np.concatenate([e1[train], e2[train]])
    mean = fit.mean(0)
    _, _, vt = np.linalg.svd(fit - mean, full_matrices=False)
    p1 = (e1 - mean) @ vt[:n_components].T
    p2 = (e2 - mean) @ vt[:n_components].T
    p1 /= np.linalg.norm(p1, axis=1, keepdims=True)
    p2 /= np.linalg.norm(p2, axis=1, keepdims=True)
    return np.sum((p1 - p2) ** 2, 1)


def _reference_evaluate(embeddings, issame, n_folds=10, pca=0):
    emb = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    e1, e2 = emb[0::2], emb[1::2]
    issame = np.asarray(issame)
    n = len(issame)
    dist_all = np.sum((e1 - e2) ** 2, 1)
    thresholds = np.arange(0, 4, 0.01)
    val_thresholds = np.arange(0, 4, 0.001)
    tprs = np.zeros((n_folds, len(thresholds)))
    fprs = np.zeros((n_folds, len(thresholds)))
    acc, vals, fars, best_thresholds = [], [], [], []
    for f, test in enumerate(_reference_folds(n, n_folds)):
        in_test = set(test)
        train = [i for i in range(n) if i not in in_test]
        dist = _reference_pca_dist(e1, e2, train, pca) if pca else dist_all
        d_train, s_train, d_test, s_test = dist[train], issame[train], dist[test], issame[test]
        acc_train = [_reference_accuracy(t, d_train, s_train)[2] for t in thresholds]
        best = thresholds[int(np.argmax(acc_train))]
        best_thresholds.append(best)
        for j, t in enumerate(thresholds):
            tprs[f, j], fprs[f, j], _ = _reference_accuracy(t, d_test, s_test)
        acc.append(_reference_accuracy(best, d_test, s_test)[2])

        d_train = dist_all[train]
        far_train = [_reference_val_far(t, d_train, s_train)[1] for t in val_thresholds]
        if max(far_train) >= 1e-3:
            last = max(j for j, v in enumerate(far_train) if v <= 1e-3)
            if last + 1 < len(far_train):
                x0, x1 = far_train[last], far_train[last + 1]
                t0, t1 = val_thresholds[last], val_thresholds[last + 1]
                threshold = t0 + (1e-3 - x0) * (t1 - t0) / (x1 - x0)
            else:
                threshold = val_thresholds[last]
        else:
            threshold = 0.0
        v, fa = _reference_val_far(threshold, dist_all[test], issame[test])
        vals.append(v)
        fars.append(fa)
    return tprs.mean(0), fprs.mean(0), np.array(acc), np.mean(vals), np.std(vals), np.mean(fars), np.array(best_thresholds)


def _seeded_pairs(n_pairs, dim, seed, same_fraction=0.5, noise=1.2):
    rng = np.random.default_rng(seed)
    issame = rng.random(n_pairs) < same_fraction
    emb = rng.normal(size=(2 * n_pairs, dim))
    emb[1::2][issame] = emb[0::2][issame] + noise * rng.normal(size=(issame.sum(), dim))
    return emb.astype(np.float32), issame.tolist()


@pytest.mark.parametrize(
    "n_pairs, dim, seed, pca",
    [
        (600, 32, 0, 0),   # 60 pairs per fold
        (233, 16, 1, 0),   # uneven folds: the first 3 have 24 pairs, the rest 23
        (400, 16, 2, 6),   # PCA fitted on the training folds
    ],
)
def test_evaluate_matches_a_loop_implementation(n_pairs, dim, seed, pca):
    emb, issame = _seeded_pairs(n_pairs, dim, seed)
    got = evaluate(emb, issame, nrof_folds=10, pca=pca)
    want = _reference_evaluate(emb.astype(np.float64), issame, pca=pca)
    np.testing.assert_allclose(got.tpr, want[0], atol=1e-12)  # tpr per threshold
    np.testing.assert_allclose(got.fpr, want[1], atol=1e-12)  # fpr per threshold
    np.testing.assert_allclose(got.fold_accuracy, want[2], atol=1e-12)  # accuracy per fold
    np.testing.assert_allclose([got.val, got.val_std, got.far], want[3:6], atol=1e-12)
    np.testing.assert_allclose(got.fold_thresholds, want[6], atol=1e-12)  # best threshold per fold
    assert got.accuracy == pytest.approx(np.mean(want[2])) and got.accuracy_std == pytest.approx(np.std(want[2]))
    assert got.best_threshold == pytest.approx(np.mean(want[6]))
    assert 0.5 < got.accuracy < 1.0  # neither trivial nor degenerate data


def test_evaluate_val_on_many_impostors_reaches_the_far_target():
    # ~1,640 impostors in the training folds: FAR moves in steps of ~6e-4, so the training
    # FAR curve passes 1e-3 between long runs of repeated values.
    rng = np.random.default_rng(3)
    n_pairs = 2000
    issame = np.zeros(n_pairs, dtype=bool)
    issame[::11] = True
    emb = rng.normal(size=(2 * n_pairs, 8)).astype(np.float32)
    emb[1::2][issame] = emb[0::2][issame] + 0.3 * rng.normal(size=(issame.sum(), 8))
    got = evaluate(emb, issame)
    want = _reference_evaluate(emb.astype(np.float64), issame)
    np.testing.assert_allclose([got.val, got.val_std, got.far], want[3:6], atol=1e-12)
    assert 0 < got.far < 3e-3 and got.val > 0.5


def test_threshold_interpolation_on_repeated_far_values():
    thresholds = np.arange(8) * 0.001
    far = np.array([0, 0, 5e-4, 5e-4, 1e-3, 1e-3, 2e-3, 2e-3])
    # Target hit exactly by a run: the last index of the run, then a step up -> its threshold.
    assert _interpolate_threshold(far, thresholds, 1e-3) == pytest.approx(0.005)
    # Between the run at 1e-3 (last index 5) and 2e-3 (index 6): halfway.
    assert _interpolate_threshold(far, thresholds, 1.5e-3) == pytest.approx(0.0055)
    # Inside a rise from the run at 0 (last index 1) to 5e-4 at index 2.
    assert _interpolate_threshold(far, thresholds, 2.5e-4) == pytest.approx(0.0015)
    # Never reached: 0.
    assert _interpolate_threshold(far, thresholds, 3e-3) == 0.0
    # Reached only by the last value: the last threshold.
    assert _interpolate_threshold(far, thresholds, 2e-3) == pytest.approx(0.007)


def test_zero_denominators_give_zero_rates():
    emb, _ = _seeded_pairs(50, 8, 4)
    result = evaluate(emb, [False] * 50)
    assert np.all(result.tpr == 0) and result.far >= 0 and result.val == 0
    result = evaluate(emb, [True] * 50)
    assert np.all(result.fpr == 0) and result.far == 0


# ---------------------------------------------------------------------------------------------
# Embedding


class TinyNet(torch.nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 5, stride=4)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4 * 27 * 27, dim)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def test_embedding_sums_image_and_flip_and_restores_modes():
    torch.manual_seed(0)
    net = TinyNet()
    net.train()
    net.bn.eval()  # e.g. a frozen BatchNorm: must stay in eval afterwards
    images = torch.randint(0, 256, (6, 3, 112, 112), dtype=torch.uint8)
    data_list = [images, images.flip(3)]
    embeddings, xnorm = embed_verification_set(data_list, net, batch_size=4)

    assert net.training and not net.bn.training and net.conv.training
    net.eval()
    with torch.no_grad():
        raw = net((images.float() / 255 - 0.5) / 0.5)
        raw_flip = net((images.flip(3).float() / 255 - 0.5) / 0.5)
    want = torch.nn.functional.normalize(raw + raw_flip, dim=1).numpy()
    np.testing.assert_allclose(embeddings, want, atol=1e-5)
    want_xnorm = float(torch.cat([raw, raw_flip]).norm(dim=1).mean())
    assert xnorm == pytest.approx(want_xnorm, rel=1e-5)


def test_distinct_images_finds_exact_repeats_only():
    torch.manual_seed(1)
    base = torch.randint(0, 256, (4, 3, 112, 112), dtype=torch.uint8)
    nearly = base[2].clone()
    nearly[1, 60, 7] ^= 1  # one bit of one pixel: another image
    images = torch.stack([base[0], base[1], base[0], base[2], nearly, base[1], base[3], base[0]])
    first, inverse = distinct_images(images)
    assert first.tolist() == [0, 1, 3, 4, 6]  # each distinct image at its first place
    assert inverse.tolist() == [0, 1, 0, 2, 3, 1, 4, 0]
    assert torch.equal(images[first][inverse], images)
    # a view with strides of its own (every other image) is hashed by its pixels too
    first, inverse = distinct_images(images[::2])
    assert first.tolist() == [0, 2, 3] and inverse.tolist() == [0, 0, 1, 2]


class _SharedList(list):
    def __deepcopy__(self, memo):  # evaluation embeds with a folded deep copy of the model
        return self


class _CountingNet(TinyNet):
    def __init__(self):
        super().__init__()
        self.calls = _SharedList()

    def forward(self, x):
        self.calls.append(x.shape[0])
        return super().forward(x)


def test_a_repeated_image_is_embedded_once_and_scored_in_every_pair():
    torch.manual_seed(2)
    distinct = torch.randint(0, 256, (3, 3, 112, 112), dtype=torch.uint8)
    places = [0, 1, 2, 0, 1, 1, 2, 0]  # four pairs over three photos
    images = distinct[places]
    net = _CountingNet().eval()
    done = []
    embeddings, xnorm = embed_verification_set([images, images.flip(3)], net, batch_size=2, progress=done.append)

    assert sum(net.calls) == 2 * 3  # three photos and their flips, once each
    assert sum(done) == len(places)  # progress counts the set's places
    with torch.no_grad():
        single = [net((images.float() / 255 - 0.5) / 0.5), net((images.flip(3).float() / 255 - 0.5) / 0.5)]
    np.testing.assert_allclose(embeddings, torch.nn.functional.normalize(single[0] + single[1], dim=1).numpy(), atol=1e-5)
    assert xnorm == pytest.approx(float(torch.cat(single).norm(dim=1).mean()), rel=1e-5)


def test_pairs_at_distance_zero_are_not_accepted_at_threshold_zero():
    # Identical embeddings: distance exactly 0. "same" needs distance < threshold, so the first
    # threshold (0) accepts nothing, the second (0.01) accepts them.
    emb, issame = _seeded_pairs(100, 8, 5)
    same = np.flatnonzero(issame)
    emb[2 * same + 1] = emb[2 * same]
    result = evaluate(emb, issame)
    assert result.tpr[0] == 0 and result.tpr[1] == 1
    want = _reference_evaluate(emb.astype(np.float64), issame)
    np.testing.assert_allclose(result.tpr, want[0], atol=1e-12)
    np.testing.assert_allclose(result.fold_accuracy, want[2], atol=1e-12)


def test_python3_protocol2_bin_loads(tmp_path):
    # Python 3 writes bytes under protocol 2 as calls of _codecs.encode: the one global allowed.
    encoded, pixels = zip(*[_png(i) for i in range(2)])
    path = tmp_path / "py3.bin"
    path.write_bytes(pickle.dumps((list(encoded), [False]), protocol=2))
    assert b"_codecs" in path.read_bytes()
    (images, _), issame = load_bin(str(path))
    assert issame == [False] and np.array_equal(images[1].permute(1, 2, 0).numpy(), pixels[1])


def test_evaluate_refuses_mismatched_lengths():
    emb, issame = _seeded_pairs(20, 4, 6)
    with pytest.raises(ValueError, match="40 embeddings for 19 pairs"):
        evaluate(emb, issame[:19])
