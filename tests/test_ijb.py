"""IJB 1:1 evaluation: ROC and TAR@FAR against plain loops, template pooling, and the CLI on a
synthetic release-layout folder whose expected TAR follows from its construction."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

import eval_ijb  # tools/ is on sys.path (pyproject.toml)
from eval.face_align import ARCFACE_TEMPLATE
from eval.onnx_export import export_onnx
from helpers import PYTHON, REPO_ROOT, run_script, run_script_on_terminal
from utils.errors import EXIT_USER_ERROR

SCRIPT = REPO_ROOT / "tools" / "eval_ijb.py"


# ---------------------------------------------------------------------------------------------
# ROC and TAR@FAR


def test_roc_matches_thresholding_every_distinct_score():
    rng = np.random.default_rng(0)
    labels = rng.random(300) < 0.3
    scores = np.round(rng.normal(size=300) + labels, 1)  # rounded: many tied scores
    fpr, tpr, thresholds = eval_ijb.roc_curve(labels, scores)
    assert thresholds[0] == np.inf and fpr[0] == 0 and tpr[0] == 0
    distinct = np.sort(np.unique(scores))[::-1]
    assert np.array_equal(thresholds[1:], distinct)
    for i, t in enumerate(distinct, start=1):
        accepted = scores >= t
        assert tpr[i] == pytest.approx(np.sum(accepted & labels) / labels.sum())
        assert fpr[i] == pytest.approx(np.sum(accepted & ~labels) / (~labels).sum())


def test_tar_at_far_takes_the_nearest_far_and_the_highest_tar_on_ties():
    fpr = np.array([0.0, 0.0, 0.0, 0.001, 0.001, 0.25, 0.5, 1.0])
    tpr = np.array([0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    got = eval_ijb.tar_at_far(fpr, tpr, far_levels=(1e-6, 1e-3, 4e-3, 0.375, 0.6))
    # 1e-6 -> fpr 0 (top of that run: 0.5); 1e-3 -> 0.7; 4e-3 -> nearest 1e-3 -> 0.7;
    # 0.375 is equally far from 0.25 and 0.5 -> the higher point, 0.9; 0.6 -> 0.5 -> 0.9.
    np.testing.assert_allclose(got, [0.5, 0.7, 0.7, 0.9, 0.9])


def test_roc_corners_keep_the_exact_curve_in_few_points():
    rng = np.random.default_rng(2)
    labels = np.zeros(20_000, dtype=bool)
    labels[:200] = True  # few genuine pairs among many impostors, as in IJB-C
    scores = rng.normal(size=labels.size) + 2.5 * labels
    scores[:20] = np.round(scores[:20], 1)  # a few ties: diagonal steps
    scores[-20:] = scores[:20]
    fpr, tpr, _ = eval_ijb.roc_curve(labels, scores)
    keep = eval_ijb.roc_corners(fpr, tpr)
    assert keep[0] == 0 and keep[-1] == len(fpr) - 1
    assert len(keep) <= 2 * labels.sum() + 2 * 20 + 2 < len(fpr) / 20
    far = np.sort(np.r_[rng.random(5000) ** 4, fpr[::97]])  # dense at small FARs, and on the ROC's own points
    # The curve through the corners is the whole curve: the same TPR at every FAR (np.interp
    # takes the top of a vertical run, as the step curve does).
    np.testing.assert_allclose(np.interp(far, fpr[keep], tpr[keep]), np.interp(far, fpr, tpr), atol=1e-12)


def test_roc_needs_both_classes():
    with pytest.raises(eval_ijb.UserError, match="genuine and impostor"):
        eval_ijb.roc_curve(np.ones(5), np.arange(5.0))


# ---------------------------------------------------------------------------------------------
# Template features


def test_template_features_average_within_media_and_sum_over_media():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(9, 4)).astype(np.float32)
    tids = np.array([7, 7, 7, 3, 3, 7, 9, 3, 9])
    mids = np.array([1, 1, 2, 5, 5, 1, 4, 6, 4])
    templates, got = eval_ijb.template_features(feats, tids, mids)
    assert templates.tolist() == [3, 7, 9]
    want = {}
    for t in (3, 7, 9):
        total = np.zeros(4)
        for m in set(mids[tids == t]):
            total += feats[(tids == t) & (mids == m)].mean(axis=0)
        want[t] = total / np.linalg.norm(total)
    for row, t in enumerate(templates):
        np.testing.assert_allclose(got[row], want[t], atol=1e-6)

    scores = eval_ijb.pair_scores(templates, got, np.array([3, 9]), np.array([7, 3]))
    np.testing.assert_allclose(scores, [want[3] @ want[7], want[9] @ want[3]], atol=1e-6)
    with pytest.raises(eval_ijb.UserError, match="template 5 has no faces"):
        eval_ijb.pair_scores(templates, got, np.array([3, 5]), np.array([7, 7]))


def test_face_rows_follow_names_when_the_orders_differ():
    rows = eval_ijb.face_rows(["a.jpg", "b.jpg", "c.jpg"], ["c.jpg", "a.jpg", "c.jpg"], "f", "m")
    assert rows.tolist() == [2, 0, 2]
    with pytest.raises(eval_ijb.UserError, match="d.jpg has no landmarks"):
        eval_ijb.face_rows(["a.jpg"], ["d.jpg"], "f", "m")


# ---------------------------------------------------------------------------------------------
# The CLI on a synthetic IJB folder

# Identity k is a 4x4 grid of random colours filling the aligned 112x112 face. The toy model
# averages each 28x28 cell, so an aligned face of identity k embeds to its 48 grid colours
# (scaled to [-1, 1]): same identity -> cosine ~1; other identities -> random colours, cosine
# near 0; the colour negative of identity k -> cosine ~-1.
N_IDENTITIES = 8
HARD = (0, 1)  # identities whose second genuine template shows the colour negative


class CellMeans(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = torch.nn.AvgPool2d(28)

    def forward(self, x):
        return self.pool(x).flatten(1)


def _grid_face(colours):
    return cv2.resize(colours, (112, 112), interpolation=cv2.INTER_NEAREST)


def _build_release(root, rng):
    """Write loose_crop/ and meta/ like the IJB-C release; return the expected TAR."""
    (root / "loose_crop").mkdir(parents=True)
    (root / "meta").mkdir()
    grids = rng.integers(0, 256, size=(N_IDENTITIES, 4, 4, 3), dtype=np.uint8)
    faces, members, pairs = [], [], []

    def add_image(face_bgr, template, media):
        name = f"{len(faces) + 1}.jpg"
        angle = np.deg2rad(rng.uniform(-30, 30))
        scale = rng.uniform(1.2, 1.7)
        rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        shift = np.array([130.0, 130.0]) + rng.uniform(-15, 15, size=2) - rotation @ [56.0, 56.0]
        forward = np.hstack([rotation, shift[:, None]])  # aligned face -> photo
        photo = cv2.warpAffine(face_bgr, forward, (260, 260), borderValue=(90, 90, 90))
        cv2.imwrite(str(root / "loose_crop" / name), photo, [cv2.IMWRITE_JPEG_QUALITY, 95])
        landmarks = ARCFACE_TEMPLATE @ rotation.T + shift
        score = rng.uniform(0.5, 1.0)
        faces.append(f"{name} " + " ".join(f"{v:.3f}" for v in landmarks.ravel()) + f" {score:.4f}")
        members.append(f"{name} {template} {media}")

    for k in range(N_IDENTITIES):
        face = _grid_face(grids[k])
        for media, count in ((100 * k + 1, 2), (100 * k + 2, 1)):
            for _ in range(count):
                add_image(face, 10 * k + 1, media)
        for _ in range(2):
            add_image(face, 10 * k + 2, 100 * k + 3)
        pairs.append((10 * k + 1, 10 * k + 2, 1))
        if k in HARD:
            add_image(255 - face, 10 * k + 3, 100 * k + 4)
            pairs.append((10 * k + 1, 10 * k + 3, 1))
    for k in range(N_IDENTITIES):
        for j in range(N_IDENTITIES):
            if j != k:
                pairs.append((10 * k + 1, 10 * j + 2, 0))
                if k in HARD:
                    pairs.append((10 * k + 3, 10 * j + 2, 0))
    (root / "meta" / "ijbc_name_5pts_score.txt").write_text("\n".join(faces) + "\n")
    (root / "meta" / "ijbc_face_tid_mid.txt").write_text("\n".join(members) + "\n")
    (root / "meta" / "ijbc_template_pair_label.txt").write_text("\n".join(f"{a} {b} {c}" for a, b, c in pairs) + "\n")
    # The hard genuine pairs score below every impostor, the others above: TAR = clean / all
    # genuine at every FAR level from 1e-6 to 1e-1 (70 impostors: FAR steps of 1/70).
    return (N_IDENTITIES) / (N_IDENTITIES + len(HARD)), pairs


@pytest.fixture(scope="module")
def ijb_release(tmp_path_factory):
    root = tmp_path_factory.mktemp("IJBC")
    expected_tar, pairs = _build_release(root, np.random.default_rng(7))
    model = root / "cells.onnx"
    export_onnx(CellMeans(), model)
    return root, model, expected_tar, pairs


def test_cli_reports_the_tar_built_into_the_data(ijb_release, tmp_path):
    root, model, expected_tar, pairs = ijb_release
    out = tmp_path / "result"
    proc = run_script_on_terminal(
        [PYTHON, SCRIPT, "--model", model, "--image-path", root, "--target", "IJBC", "--result-dir", out,
         "--use-flip", "--use-detector-score", "--batch-size", "4", "--workers", "2"],
        env={"CI": ""},
    )
    row = next(line for line in proc.stdout.splitlines() if line.startswith("cells-IJBC"))
    tars = [float(v) for v in row.split()[1:]]
    assert tars == [pytest.approx(100 * expected_tar)] * 6
    n_faces = len((root / "meta" / "ijbc_name_5pts_score.txt").read_text().splitlines())
    assert "IJBC: embedding" in proc.stderr and f"{n_faces}/{n_faces}" in proc.stderr  # the bar at a terminal

    scores = np.load(out / "ijbc.npy")
    assert scores.shape == (len(pairs),)
    labels = np.array([p[2] for p in pairs])
    hard = np.array([p[1] % 10 == 3 and p[2] == 1 for p in pairs])
    assert np.all(scores[(labels == 1) & ~hard] > 0.95)  # alignment recovered the grids
    assert np.all(scores[hard] < -0.8)
    assert np.all(np.abs(scores[labels == 0]) < 0.8)
    assert (out / "ijbc_tar_at_far.txt").read_text().strip().splitlines()[1] == row.strip()
    png = cv2.imread(str(out / "ijbc_roc.png"))
    assert png is not None and png.shape[:2] == (640, 960) and png.std() > 10
    roc = np.genfromtxt(out / "ijbc_roc.csv", delimiter=",", names=True)
    assert roc.dtype.names == ("fpr", "tpr", "threshold")
    fpr, tpr, _ = eval_ijb.roc_curve(labels, scores)  # the file holds the exact curve's corners
    assert roc["fpr"][0] == 0 and roc["fpr"][-1] == 1 and np.all(np.diff(roc["fpr"]) >= 0)
    far = np.r_[eval_ijb.FAR_LEVELS, fpr]
    np.testing.assert_allclose(np.interp(far, roc["fpr"], roc["tpr"]), np.interp(far, fpr, tpr), atol=1e-9)


def test_cli_missing_image_is_one_clear_line(ijb_release, tmp_path):
    root, model, _, _ = ijb_release
    broken = tmp_path / "IJBC"
    (broken / "meta").mkdir(parents=True)
    (broken / "loose_crop").mkdir()
    for f in (root / "meta").iterdir():
        (broken / "meta" / f.name).write_bytes(f.read_bytes())
    proc = run_script(
        [PYTHON, SCRIPT, "--model", model, "--image-path", broken, "--target", "IJBC", "--result-dir", tmp_path / "o"],
        check=False,
    )
    assert proc.returncode == EXIT_USER_ERROR
    assert "Traceback" not in proc.stderr
    assert f"image not found: {broken / 'loose_crop' / '1.jpg'}" in proc.stderr
