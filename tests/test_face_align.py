"""Five-point alignment: the template, the least-squares similarity fit, and a warp round trip."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from eval.face_align import ARCFACE_TEMPLATE, estimate_norm, norm_crop, similarity_transform, template_for


def _similarity(scale, degrees, tx, ty):
    a = np.deg2rad(degrees)
    return np.array([[scale * np.cos(a), -scale * np.sin(a), tx], [scale * np.sin(a), scale * np.cos(a), ty]])


def _apply(matrix, points):
    return points @ matrix[:, :2].T + matrix[:, 2]


def _smooth_face_like_image(size=112, seed=0):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)


def test_template_values_and_sizes():
    np.testing.assert_allclose(ARCFACE_TEMPLATE[0], [38.2946, 51.6963])
    np.testing.assert_allclose(ARCFACE_TEMPLATE[4], [70.7299, 92.2041])
    np.testing.assert_allclose(template_for(224), ARCFACE_TEMPLATE * 2)
    # 128: the 112 template sits in a 128-wide crop, 8 pixels from the left edge.
    np.testing.assert_allclose(template_for(128), ARCFACE_TEMPLATE + [8, 0])
    np.testing.assert_allclose(template_for(256), (ARCFACE_TEMPLATE + [8, 0]) * 2)
    with pytest.raises(ValueError, match="100"):
        template_for(100)


def test_template_maps_to_itself():
    np.testing.assert_allclose(estimate_norm(ARCFACE_TEMPLATE), [[1, 0, 0], [0, 1, 0]], atol=1e-9)


def test_warp_by_known_similarity_is_undone():
    aligned = _smooth_face_like_image()
    forward = _similarity(scale=1.6, degrees=23.0, tx=70.0, ty=25.0)  # aligned -> loose photo
    photo = cv2.warpAffine(aligned, forward, (260, 260))
    landmarks = _apply(forward, ARCFACE_TEMPLATE)

    matrix = estimate_norm(landmarks)
    inverse = cv2.invertAffineTransform(forward)
    np.testing.assert_allclose(matrix, inverse, atol=1e-9)
    np.testing.assert_allclose(_apply(matrix, landmarks), ARCFACE_TEMPLATE, atol=1e-9)

    crop = norm_crop(photo, landmarks)
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    diff = np.abs(crop[4:-4, 4:-4].astype(int) - aligned[4:-4, 4:-4].astype(int))
    assert diff.mean() < 2.0 and np.percentile(diff, 99) < 10


def test_noisy_landmarks_get_the_least_squares_fit():
    rng = np.random.default_rng(1)
    landmarks = _apply(_similarity(0.8, -12.0, 5.0, 9.0), ARCFACE_TEMPLATE) + rng.normal(0, 1.5, (5, 2))
    matrix = estimate_norm(landmarks)

    def residual(m):
        return np.sum((_apply(m, landmarks) - ARCFACE_TEMPLATE) ** 2)

    # A similarity is (a, -b, tx; b, a, ty): no nearby one fits better.
    best = residual(matrix)
    a, b, tx, ty = matrix[0, 0], matrix[1, 0], matrix[0, 2], matrix[1, 2]
    assert np.isclose(matrix[0, 1], -b) and np.isclose(matrix[1, 1], a)
    for delta in rng.normal(0, 1e-3, (200, 4)):
        da, db, dx, dy = delta * [1, 1, 100, 100]
        other = np.array([[a + da, -(b + db), tx + dx], [b + db, a + da, ty + dy]])
        assert residual(other) >= best - 1e-9


def test_mirrored_landmarks_give_a_rotation_not_a_reflection():
    mirrored = ARCFACE_TEMPLATE.copy()
    mirrored[:, 0] = 112 - mirrored[:, 0]
    matrix = estimate_norm(mirrored)
    assert np.linalg.det(matrix[:, :2]) > 0


def test_other_output_sizes():
    aligned = _smooth_face_like_image(size=224)
    forward = _similarity(0.9, 10.0, 30.0, 40.0)
    photo = cv2.warpAffine(aligned, forward, (300, 300))
    landmarks = _apply(forward, template_for(224))
    crop = norm_crop(photo, landmarks, image_size=224)
    assert crop.shape == (224, 224, 3)
    assert np.abs(crop[8:-8, 8:-8].astype(int) - aligned[8:-8, 8:-8].astype(int)).mean() < 3.0


@pytest.mark.parametrize(
    "landmarks, message",
    [(np.zeros((5, 2)), "degenerate"), (np.zeros((4, 2)), "5 landmarks"), (np.full((5, 2), np.nan), "degenerate")],
)
def test_bad_landmarks_are_refused(landmarks, message):
    with pytest.raises(ValueError, match=message):
        estimate_norm(landmarks)


def test_similarity_transform_of_two_points():
    # Two points fix a similarity exactly: (0,0)->(1,1), (1,0)->(1,3) is scale 2, rotation 90 degrees.
    m = similarity_transform(np.array([[0.0, 0.0], [1.0, 0.0]]), np.array([[1.0, 1.0], [1.0, 3.0]]))
    np.testing.assert_allclose(m, [[0, -2, 1], [2, 0, 1]], atol=1e-12)
