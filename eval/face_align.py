"""Five-point face alignment to the ArcFace template.

The template gives where the eyes, nose tip and mouth corners of a 112x112 ArcFace
input lie. `estimate_norm` fits the least-squares similarity transform (rotation,
uniform scale, translation; Umeyama 1991) from detected landmarks to the template,
and `norm_crop` warps the image with it.
"""
from __future__ import annotations

import cv2
import numpy as np

# (x, y) of left eye, right eye, nose tip, left and right mouth corner in a 112x112 crop.
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)


def template_for(image_size: int = 112) -> np.ndarray:
    """The template scaled to `image_size`.

    Multiples of 112 scale it directly. Multiples of 128 follow insightface's
    convention: the 112 template is a 128-wide crop with 8 pixels cut off each side,
    so it is scaled by image_size/128 and shifted right by 8 scaled pixels.
    """
    if image_size > 0 and image_size % 112 == 0:
        return ARCFACE_TEMPLATE * (image_size / 112.0)
    if image_size > 0 and image_size % 128 == 0:
        ratio = image_size / 128.0
        dst = ARCFACE_TEMPLATE * ratio
        dst[:, 0] += 8.0 * ratio
        return dst
    raise ValueError(f"image_size {image_size} is not supported: use a multiple of 112 or of 128")


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform mapping points `src` [K,2] onto `dst` [K,2] (Umeyama).

    Returns the 2x3 matrix [sR | t]. A reflection is never used: with mirrored
    points the best proper rotation is returned.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"need two matching [K,2] point sets with K >= 2, got {src.shape} and {dst.shape}")
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = np.mean(np.sum(src_c**2, axis=1))
    if not np.isfinite(src_var) or src_var <= 1e-12:
        raise ValueError(f"landmarks are degenerate (all at one point or not finite): {src.tolist()}")
    cov = dst_c.T @ src_c / src.shape[0]
    u, s, vt = np.linalg.svd(cov)
    signs = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        signs[-1] = -1.0
    rotation = u @ np.diag(signs) @ vt
    scale = float(s @ signs) / src_var
    translation = dst_mean - scale * rotation @ src_mean
    return np.hstack([scale * rotation, translation[:, None]])


def estimate_norm(landmarks: np.ndarray, image_size: int = 112) -> np.ndarray:
    """2x3 affine matrix taking the five landmarks [5,2] (image coordinates) to the template."""
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.shape != (5, 2):
        raise ValueError(f"expected 5 landmarks as a [5,2] array, got shape {landmarks.shape}")
    return similarity_transform(landmarks, template_for(image_size))


def norm_crop(img: np.ndarray, landmarks: np.ndarray, image_size: int = 112) -> np.ndarray:
    """The aligned image_size x image_size face (same channel order and dtype as `img`)."""
    matrix = estimate_norm(landmarks, image_size)
    return cv2.warpAffine(img, matrix, (image_size, image_size), borderValue=0.0)
