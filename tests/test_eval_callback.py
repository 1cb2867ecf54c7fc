"""In-training verification: logs, best accuracy, another model without touching the best, modes, and 2 gloo ranks = 1 process."""
from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch

from conftest import SHARED_TESTDATA
from helpers import run_distributed
from eval.eval_callback import VerificationCallback
from eval.verification import embed_verification_set, evaluate
from dataset.verification_bin import load_bin, write_bin

LOGGER = "test_eval_callback"


class _Tally:
    """A count shared with deep copies: evaluation embeds with a copy of the model."""

    def __init__(self):
        self.count = 0

    def __deepcopy__(self, memo):
        return self


class SmallNet(torch.nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 6, 7, stride=8)
        self.bn = torch.nn.BatchNorm2d(6)
        self.fc = torch.nn.Linear(6 * 14 * 14, 16)
        self.tally = _Tally()

    @property
    def images_seen(self) -> int:
        return self.tally.count

    def forward(self, x):
        self.tally.count += x.shape[0]
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


class ListHandler(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture()
def rec_dir(tmp_path):
    shutil.copy(SHARED_TESTDATA / "lfw_style.bin", tmp_path / "lfw.bin")
    return tmp_path


def _expected(net, path):
    """Accuracy and XNorm computed by hand from the model's outputs."""
    (images, flipped), issame = load_bin(str(path))
    net.eval()
    with torch.no_grad():
        raw = net((images.float() / 255 - 0.5) / 0.5)
        raw_flip = net((flipped.float() / 255 - 0.5) / 0.5)
    emb = torch.nn.functional.normalize(raw + raw_flip, dim=1).numpy()
    acc = evaluate(emb, issame).fold_accuracy
    return float(np.mean(acc)), float(np.std(acc)), float(torch.cat([raw, raw_flip]).norm(dim=1).mean())


def test_logs_best_accuracy_and_mode(rec_dir, caplog):
    with caplog.at_level(logging.INFO, logger=LOGGER):
        callback = VerificationCallback(
            ["lfw", "agedb_30"], str(rec_dir), None, batch_size=8,
            logger=logging.getLogger(LOGGER),
        )
    missing = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(missing) == 1 and str(rec_dir / "agedb_30.bin") in missing[0].getMessage()

    first, second = SmallNet(0), SmallNet(1)
    first.train()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        result1 = callback(100, first)
    assert first.training and first.bn.training  # the caller's mode is back

    acc, std, xnorm = _expected(SmallNet(0), rec_dir / "lfw.bin")
    assert set(result1) == {"lfw"}
    r = result1["lfw"]
    assert r["acc"] == pytest.approx(acc, abs=1e-12) and r["std"] == pytest.approx(std, abs=1e-12)
    assert r["xnorm"] == pytest.approx(xnorm, rel=1e-5) and r["acc_best"] == r["acc"]
    messages = [rec.getMessage() for rec in caplog.records]
    assert messages == [
        "[lfw][100]XNorm: %f" % r["xnorm"],
        "[lfw][100]Accuracy-Flip: %1.5f+-%1.5f" % (acc, std),
        "[lfw][100]Accuracy-Highest: %1.5f" % acc,
    ]

    # another model (a distillation teacher): its figures, no log line, the best unchanged
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        other = callback.evaluate(SmallNet(1))
    acc1, std1, xnorm1 = _expected(SmallNet(1), rec_dir / "lfw.bin")
    assert other["lfw"] == {"acc": pytest.approx(acc1, abs=1e-12), "std": pytest.approx(std1, abs=1e-12),
                            "xnorm": pytest.approx(xnorm1, rel=1e-5)}
    assert not caplog.records and callback.highest_acc["lfw"] == acc

    result2 = callback(200, second)
    acc2, _, _ = _expected(SmallNet(1), rec_dir / "lfw.bin")
    assert acc2 != acc  # two different models, so "best" is meaningful
    assert result2["lfw"]["acc"] == pytest.approx(acc2, abs=1e-12)
    assert result2["lfw"]["acc_best"] == pytest.approx(max(acc, acc2), abs=1e-12)


def test_a_set_that_repeats_photos_embeds_each_once_at_every_evaluation(tmp_path):
    # lfw_style.bin's 40 photos packed again as 60 places: pairs reusing photos, as public sets do.
    from dataset.verification_bin import _read_pairs_pickle

    jpegs, issame = _read_pairs_pickle(str(SHARED_TESTDATA / "lfw_style.bin"))
    order = list(range(40)) + [0, 3, 5, 8, 12, 13, 20, 21, 30, 31, 2, 7, 16, 17, 22, 25, 33, 34, 38, 39]
    write_bin(str(tmp_path / "reused.bin"), [jpegs[i] for i in order], list(issame) + list(issame[:10]))
    callback = VerificationCallback(["reused"], str(tmp_path), None, batch_size=8)
    net = SmallNet(0)
    for step in (1, 2):
        result = callback(step, net)
        assert net.images_seen == step * 2 * 40  # 40 distinct photos and their flips, 60 places
    acc, std, xnorm = _expected(SmallNet(0), tmp_path / "reused.bin")
    assert result["reused"]["acc"] == pytest.approx(acc, abs=1e-12)
    assert result["reused"]["std"] == pytest.approx(std, abs=1e-12)
    assert result["reused"]["xnorm"] == pytest.approx(xnorm, rel=1e-5)


def _evaluate_on_ranks(ctx, rec_dir):
    handler = ListHandler()
    logger = logging.getLogger(f"{LOGGER}.rank{ctx.rank}")
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    callback = VerificationCallback(["lfw", "missing"], rec_dir, ctx, batch_size=4, logger=logger)
    net = SmallNet(0)
    results = callback(7, net)
    # An odd number of images: the shares are padded to equal size and trimmed after the gather.
    (images, flipped), _ = load_bin(f"{rec_dir}/lfw.bin")
    odd, xnorm = embed_verification_set([images[:9], flipped[:9]], net, 2, ctx=ctx)
    seen = net.images_seen
    # Repeated images (5 distinct in 9 places): the ranks share the distinct ones, 3 each.
    repeated = torch.tensor(REPEATS)
    rep, rep_xnorm = embed_verification_set([images[repeated], flipped[repeated]], net, 2, ctx=ctx)
    return results, odd, xnorm, handler.messages, seen, rep, rep_xnorm, net.images_seen - seen


REPEATS = [0, 1, 2, 0, 1, 2, 3, 3, 4]


def test_two_gloo_ranks_give_the_single_process_result(rec_dir):
    single = VerificationCallback(["lfw"], str(rec_dir), None, batch_size=4)(7, SmallNet(0))
    (images, flipped), _ = load_bin(str(rec_dir / "lfw.bin"))
    odd, odd_xnorm = embed_verification_set([images[:9], flipped[:9]], SmallNet(0), 2)

    # The repeated set as nine separate images, each embedded in its own place.
    one_by_one = [embed_verification_set([images[i:i + 1], flipped[i:i + 1]], SmallNet(0), 1) for i in REPEATS]
    per_image_raw_norms = [xn for _, xn in one_by_one]

    per_rank = run_distributed(_evaluate_on_ranks, 2, str(rec_dir))
    assert len(per_rank) == 2
    for rank, (results, rank_odd, rank_xnorm, messages, images_seen, rep, rep_xnorm, rep_seen) in enumerate(per_rank):
        assert rep_seen == 2 * 3
        np.testing.assert_allclose(rep, np.concatenate([e for e, _ in one_by_one]), atol=1e-6)
        assert rep_xnorm == pytest.approx(float(np.mean(per_image_raw_norms)), rel=1e-6)
        # Each rank embedded its share only: half of the 40 images and 5 of the 9, each with its flip.
        assert images_seen == 2 * 20 + 2 * 5
        assert set(results) == {"lfw"}
        for key in ("acc", "std", "acc_best"):
            assert results["lfw"][key] == pytest.approx(single["lfw"][key], abs=1e-12)
        assert results["lfw"]["xnorm"] == pytest.approx(single["lfw"]["xnorm"], rel=1e-6)
        assert rank_odd.shape == odd.shape
        np.testing.assert_allclose(rank_odd, odd, atol=1e-6)
        assert rank_xnorm == pytest.approx(odd_xnorm, rel=1e-6)
        if rank == 0:
            assert any("not found" in m for m in messages) and any("Accuracy-Flip" in m for m in messages)
        else:
            assert messages == []  # non-main ranks log nothing
