"""Synthetic faces: a procedurally drawn, seeded face data set for the CPU demo and tests.

Every identity is a set of drawing parameters (head shape, skin tone and texture, eyes,
brows, nose, mouth, ears, hair, and sometimes glasses, a beard or moles); every image of
it draws those parameters under a new pose (rotation, scale, shift, a little yaw),
expression, background, clothing, illumination, blur, noise and occlusion. Identities
differ in geometry and texture while images of one identity differ in everything a
camera changes, so a network has to learn what a face looks like to tell them apart:
raw pixels and an untrained network do much worse than a trained one.

`materialize(root, ...)` writes `train.rec` / `train.idx` / `property` (MS1M layout)
and a verification set `synthetic_val.bin` of held-out identities into `root`. The
output depends only on the parameters (each identity and image has its own random
stream), and a folder that already holds a complete set made with the same parameters
is reused.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from dataset.errors import DataError

SIZE = 112
VAL_NAME = "synthetic_val"  # the verification set is <root>/synthetic_val.bin
PARAMS_FILE = "synthetic_faces.json"  # written last: its presence with complete=true marks a finished set
_OUTPUTS = ("train.rec", "train.idx", "property", f"{VAL_NAME}.bin")
# Bump when the drawing changes, so that sets drawn by older code are regenerated.
GENERATOR_VERSION = 2

# Independent random streams: (seed, stream, ...) never collide between streams.
_TRAIN_IDENTITY, _VAL_IDENTITY, _VAL_PAIRS, _VAL_PHOTOS = 0, 1, 2, 3

_SHIFT = 4  # OpenCV drawing with 4 fractional bits: sub-pixel coordinates
_ONE = 1 << _SHIFT
_AA = cv2.LINE_AA

# Canonical frame: roughly the ArcFace 112x112 alignment (eyes near y=52, mouth near y=92).
_CX, _CY = 56.0, 62.0

_SKIN_LIGHT = np.array([200.0, 218.0, 245.0])  # BGR
_SKIN_DARK = np.array([50.0, 78.0, 122.0])
_HAIR_COLOURS = np.array([
    [22, 22, 28], [30, 42, 66], [42, 70, 112], [38, 66, 150], [105, 170, 215],
    [140, 142, 148], [205, 208, 212], [36, 80, 185], [60, 95, 140],
], dtype=np.float64)
_IRIS_COLOURS = np.array([
    [30, 58, 96], [24, 28, 36], [165, 118, 60], [85, 135, 75], [135, 135, 125], [48, 98, 128],
], dtype=np.float64)
_HAIR_STYLES = ("short", "medium", "long", "bangs", "side_part", "bald", "curly", "buzz")


@dataclass(frozen=True)
class Identity:
    """Drawing parameters of one person, in the canonical 112x112 frame."""

    head_w: float
    head_h: float
    head_cy: float
    jaw: float  # width of the chin relative to the cheeks
    skin: np.ndarray  # BGR
    texture: np.ndarray  # 112x112 multiplicative skin texture (blotches, freckles)
    moles: tuple  # ((x, y, r), ...)
    ear_size: float
    ear_y: float
    eye_dx: float  # half the distance between the eye centres
    eye_y: float
    eye_w: float
    eye_h: float
    eye_tilt: float  # degrees
    iris: np.ndarray
    iris_r: float
    brow_gap: float
    brow_len: float
    brow_thick: int
    brow_arch: float
    brow_tilt: float
    nose_y: float  # tip
    nose_w: float
    nose_bridge: float  # darkness of the bridge line
    mouth_y: float
    mouth_w: float
    lip: float  # lip thickness
    lip_colour: np.ndarray
    smile: float
    hair: np.ndarray
    hair_style: str
    hairline: float
    hair_volume: float
    part: float  # side parting position, -1..1
    beard: str | None  # None, "full", "goatee", "moustache", "stubble"
    glasses: str | None  # None, "round", "square", "sun"
    glasses_colour: np.ndarray
    cheek: float  # blush strength


def sample_identity(rng: np.random.Generator) -> Identity:
    u = rng.uniform
    tone = u(0.0, 1.0)
    skin = (1 - tone) * _SKIN_LIGHT + tone * _SKIN_DARK + rng.normal(0, 7, 3)
    hair = _HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))] + rng.normal(0, 10, 3)
    if tone > 0.6 and rng.random() < 0.7:  # darker skin: mostly dark hair
        hair = _HAIR_COLOURS[rng.integers(3)] + rng.normal(0, 6, 3)
    eye_y = u(47, 56)
    nose_y = eye_y + u(14, 22)
    mouth_y = nose_y + u(11, 18)
    lip_colour = skin * u(0.6, 0.85) + np.array([20.0, 25.0, 70.0]) * u(0.3, 1.0)
    beard = None
    if rng.random() < 0.3:
        beard = ("full", "goatee", "moustache", "stubble")[rng.integers(4)]
    glasses = None
    if rng.random() < 0.22:
        glasses = ("round", "square", "square", "sun")[rng.integers(4)]
    return Identity(
        head_w=u(34, 44), head_h=u(46, 56), head_cy=u(58, 66), jaw=u(0.62, 0.95),
        skin=np.clip(skin, 0, 255), texture=_skin_texture(rng), moles=_moles(rng),
        ear_size=u(6, 10), ear_y=eye_y + u(4, 12),
        eye_dx=u(14, 20.5), eye_y=eye_y, eye_w=u(5.0, 8.5), eye_h=u(2.2, 4.2), eye_tilt=u(-9, 9),
        iris=_IRIS_COLOURS[rng.integers(len(_IRIS_COLOURS))] + rng.normal(0, 8, 3), iris_r=u(0.45, 0.7),
        brow_gap=u(5.5, 11), brow_len=u(0.9, 1.45), brow_thick=int(rng.integers(1, 5)),
        brow_arch=u(-1.0, 4.5), brow_tilt=u(-10, 10),
        nose_y=nose_y, nose_w=u(4.5, 10), nose_bridge=u(0.0, 0.35),
        mouth_y=mouth_y, mouth_w=u(9, 17.5), lip=u(1.3, 4.0), lip_colour=np.clip(lip_colour, 0, 255),
        smile=u(-2.5, 4.0),
        hair=np.clip(hair, 0, 255), hair_style=_HAIR_STYLES[rng.integers(len(_HAIR_STYLES))],
        hairline=u(8, 26), hair_volume=u(1, 10), part=u(-1, 1),
        beard=beard, glasses=glasses, glasses_colour=rng.uniform(0, 200, 3), cheek=u(0, 0.12),
    )


def _skin_texture(rng: np.random.Generator) -> np.ndarray:
    """Low-frequency blotches plus, for some identities, freckles: a per-person skin pattern."""
    coarse = rng.normal(0.0, rng.uniform(0.03, 0.09), (6, 6)).astype(np.float32)
    texture = 1.0 + cv2.resize(coarse, (SIZE, SIZE), interpolation=cv2.INTER_CUBIC)
    if rng.random() < 0.3:
        for _ in range(int(rng.integers(12, 40))):
            x, y = rng.uniform(30, 82), rng.uniform(55, 85)
            cv2.circle(texture, (int(x * _ONE), int(y * _ONE)), int(rng.uniform(0.6, 1.3) * _ONE),
                       float(rng.uniform(0.72, 0.88)), -1, _AA, _SHIFT)
    return texture


def _moles(rng: np.random.Generator) -> tuple:
    count = int(rng.choice([0, 0, 1, 1, 2, 3]))
    return tuple((rng.uniform(32, 80), rng.uniform(45, 100), rng.uniform(0.9, 2.0)) for _ in range(count))


# ---------------------------------------------------------------------------- drawing


class _Pose:
    """Similarity transform (rotation, scale, shift) from the canonical frame to the image."""

    def __init__(self, angle_deg: float, scale: float, tx: float, ty: float):
        self.angle = angle_deg
        self.scale = scale
        a = math.radians(angle_deg)
        self.c, self.s = math.cos(a) * scale, math.sin(a) * scale
        self.tx, self.ty = _CX + tx, _CY + ty

    def point(self, x: float, y: float) -> tuple[int, int]:
        x, y = x - _CX, y - _CY
        return (int(round((self.c * x - self.s * y + self.tx) * _ONE)),
                int(round((self.s * x + self.c * y + self.ty) * _ONE)))

    def points(self, xy: np.ndarray) -> np.ndarray:
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        x, y = xy[:, 0] - _CX, xy[:, 1] - _CY
        out = np.stack([self.c * x - self.s * y + self.tx, self.s * x + self.c * y + self.ty], axis=1)
        return np.round(out * _ONE).astype(np.int32)

    def matrix(self) -> np.ndarray:
        return np.array([
            [self.c, -self.s, self.tx - self.c * _CX + self.s * _CY],
            [self.s, self.c, self.ty - self.s * _CX - self.c * _CY],
        ])


class _Canvas:
    """Draws canonical-frame primitives through a pose onto a BGR uint8 image."""

    def __init__(self, image: np.ndarray, pose: _Pose):
        self.image, self.pose = image, pose

    def ellipse(self, cx, cy, ax, ay, angle, colour, thickness=-1, start=0, end=360, image=None):
        centre = self.pose.point(cx, cy)
        axes = (max(1, int(round(ax * self.pose.scale * _ONE))), max(1, int(round(ay * self.pose.scale * _ONE))))
        cv2.ellipse(self.image if image is None else image, centre, axes, angle + self.pose.angle,
                    start, end, _colour(colour), thickness, _AA, _SHIFT)

    def poly(self, xy, colour, image=None):
        cv2.fillPoly(self.image if image is None else image, [self.pose.points(xy)], _colour(colour), _AA, _SHIFT)

    def line(self, xy, colour, thickness):
        pts = self.pose.points(xy)
        width = max(1, int(round(thickness * self.pose.scale)))
        cv2.polylines(self.image, [pts], False, _colour(colour), width, _AA, _SHIFT)


def _colour(c) -> tuple | float:
    if isinstance(c, (int, float)):
        return float(c)
    return tuple(min(255.0, max(0.0, float(v))) for v in c)


def _head_outline(p: Identity, grow: float = 0.0, n: int = 48) -> np.ndarray:
    """Head contour: an ellipse whose lower half narrows towards the chin by `jaw`."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    sin = np.sin(t)
    narrowing = 1 - (1 - p.jaw) * np.clip(sin, 0, None) ** 1.5
    x = _CX + (p.head_w + grow) * np.cos(t) * narrowing
    y = p.head_cy + (p.head_h + grow) * sin
    return np.stack([x, y], axis=1)


def _background(rng: np.random.Generator) -> np.ndarray:
    kind = rng.integers(4)
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    if kind == 0:  # plain
        return np.broadcast_to(a, (SIZE, SIZE, 3)).astype(np.uint8)
    if kind == 1:  # linear gradient
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
        t = np.clip(0.5 + (xx - 0.5) * math.cos(angle) + (yy - 0.5) * math.sin(angle), 0, 1)[..., None]
        return (a * (1 - t) + b * t).astype(np.uint8)
    image = np.empty((SIZE, SIZE, 3), np.uint8)
    image[:] = a.astype(np.uint8)
    if kind == 2:  # blobs (a room, foliage)
        for _ in range(int(rng.integers(4, 12))):
            centre = (int(rng.uniform(0, SIZE)), int(rng.uniform(0, SIZE)))
            cv2.circle(image, centre, int(rng.uniform(6, 30)), _colour(rng.uniform(0, 255, 3)), -1, _AA)
        return image
    for _ in range(int(rng.integers(3, 8))):  # rectangles (shelves, windows)
        x0, y0 = rng.integers(0, SIZE, 2)
        x1, y1 = x0 + rng.integers(8, 60), y0 + rng.integers(8, 60)
        cv2.rectangle(image, (int(x0), int(y0)), (int(x1), int(y1)), _colour(rng.uniform(0, 255, 3)), -1)
    return image


def _draw_hair_back(cv: _Canvas, p: Identity, jitter: float) -> None:
    vol = p.hair_volume + jitter
    if p.hair_style == "long":
        top = p.head_cy - p.head_h - vol
        xy = [(_CX - p.head_w - vol - 4, p.head_cy - 10), (_CX - p.head_w - vol - 8, SIZE + 10),
              (_CX + p.head_w + vol + 8, SIZE + 10), (_CX + p.head_w + vol + 4, p.head_cy - 10),
              (_CX, top)]
        cv.poly(xy, p.hair)
        cv.ellipse(_CX, p.head_cy - 8, p.head_w + vol + 3, p.head_h + vol, 0, p.hair)
    elif p.hair_style == "curly":
        cv.ellipse(_CX, p.head_cy - 10, p.head_w + vol + 8, p.head_h + vol + 2, 0, p.hair)
    elif p.hair_style == "medium":
        cv.ellipse(_CX, p.head_cy - 4, p.head_w + vol + 2, p.head_h + vol * 0.5, 0, p.hair)


def _draw_hair_top(cv: _Canvas, p: Identity, jitter: float) -> None:
    if p.hair_style == "bald":
        # Only the horseshoe at the sides.
        for side in (-1, 1):
            cv.ellipse(_CX + side * (p.head_w - 2), p.eye_y - 8, 4 + p.hair_volume * 0.3, 12, 0, p.hair)
        return
    vol = (1.5 if p.hair_style == "buzz" else p.hair_volume) + jitter
    outline = _head_outline(p, grow=vol)
    hairline = p.hairline + (10 if p.hair_style == "bangs" else 0)
    side_y = p.eye_y - (2 if p.hair_style in ("long", "medium", "curly") else 8)
    upper = outline[outline[:, 1] <= side_y]
    # Walk the upper arc left to right, then come back along the hairline.
    upper = upper[np.argsort(np.arctan2(upper[:, 1] - p.head_cy, upper[:, 0] - _CX))]
    xs = np.linspace(_CX + p.head_w - 3, _CX - p.head_w + 3, 15)
    rel = (xs - _CX) / p.head_w
    line = hairline + 14 * rel ** 2
    if p.hair_style == "side_part":
        line = line + 5 * np.clip(rel * np.sign(p.part), 0, None) - 3 * np.exp(-((rel - p.part * 0.5) ** 2) / 0.02)
    if p.hair_style == "bangs":
        line = line + np.where(np.arange(len(xs)) % 2 == 0, 0.0, -4.0)
    inner = np.stack([xs, line], axis=1)
    sides = [(_CX + p.head_w - 1, side_y + 4)], [(_CX - p.head_w + 1, side_y + 4)]
    cv.poly(np.concatenate([upper, sides[0], inner, sides[1]]), p.hair)
    if p.hair_style == "curly":
        for angle in np.linspace(np.pi * 1.05, np.pi * 1.95, 9):
            cv.ellipse(_CX + (p.head_w + vol) * math.cos(angle), p.head_cy + (p.head_h + vol) * math.sin(angle),
                       5, 5, 0, p.hair)


def _draw_eye(cv: _Canvas, p: Identity, x: float, side: int, width_scale: float, openness: float,
              gaze: tuple[float, float]) -> None:
    w, h = p.eye_w * width_scale, max(0.6, p.eye_h * openness)
    tilt = side * p.eye_tilt
    cv.ellipse(x, p.eye_y, w + 1.2, h + 1.4, tilt, p.skin * 0.72)  # socket shadow
    cv.ellipse(x, p.eye_y, w, h, tilt, (235, 238, 240))
    if openness > 0.35:
        r = min(h, w * p.iris_r)
        cv.ellipse(x + gaze[0] * w * 0.3, p.eye_y + gaze[1], r, r, 0, p.iris)
        cv.ellipse(x + gaze[0] * w * 0.3, p.eye_y + gaze[1], r * 0.45, r * 0.45, 0, (15, 15, 15))
    cv.ellipse(x, p.eye_y, w, h, tilt, p.skin * 0.45, thickness=1, start=180, end=360)  # upper lid


def _draw_brow(cv: _Canvas, p: Identity, x: float, side: int, raise_: float) -> None:
    length = p.eye_w * p.brow_len
    xs = np.linspace(-length, length, 7)
    arch = p.brow_arch * (1 - (xs / length) ** 2)
    tilt = math.tan(math.radians(p.brow_tilt)) * xs * side
    y = p.eye_y - p.eye_h - p.brow_gap - arch + tilt - raise_
    colour = p.hair * 0.8 if p.hair_style != "bald" else p.skin * 0.45
    cv.line(np.stack([x + xs, y], axis=1), colour, p.brow_thick + 1)


def _draw_beard(cv: _Canvas, p: Identity, yaw_shift: float) -> None:
    colour = p.hair * 0.9
    if p.beard in ("full", "stubble"):
        outline = _head_outline(p, grow=1.0)
        lower = outline[outline[:, 1] >= p.nose_y + 2]
        lower = lower[np.argsort(np.arctan2(lower[:, 1] - p.head_cy, lower[:, 0] - _CX))]
        inner = [(_CX + yaw_shift - p.mouth_w - 3, p.nose_y + 3), (_CX + yaw_shift + p.mouth_w + 3, p.nose_y + 3)]
        layer = cv.image.copy()
        cv.poly(np.concatenate([lower, inner[::-1]]), colour, image=layer)
        alpha = 0.45 if p.beard == "stubble" else 0.95
        cv2.addWeighted(layer, alpha, cv.image, 1 - alpha, 0, dst=cv.image)
    elif p.beard == "goatee":
        cv.ellipse(_CX + yaw_shift, p.mouth_y + 9, p.mouth_w * 0.6, 7, 0, colour)
    if p.beard in ("full", "moustache", "goatee"):
        cv.ellipse(_CX + yaw_shift, p.mouth_y - p.lip - 2, p.mouth_w + 1, 3.0, 0, colour)


def _draw_glasses(cv: _Canvas, p: Identity, xs: tuple[float, float]) -> None:
    colour = p.glasses_colour
    for x in xs:
        if p.glasses == "sun":
            cv.ellipse(x, p.eye_y + 1, p.eye_w + 5, p.eye_h + 5, 0, (25, 25, 25))
        if p.glasses == "square":
            cv.line([(x - p.eye_w - 4, p.eye_y - 6), (x + p.eye_w + 4, p.eye_y - 6), (x + p.eye_w + 4, p.eye_y + 6),
                     (x - p.eye_w - 4, p.eye_y + 6), (x - p.eye_w - 4, p.eye_y - 6)], colour, 2)
        else:
            cv.ellipse(x, p.eye_y + 1, p.eye_w + 5, p.eye_h + 5, 0, colour, thickness=2)
    cv.line([(xs[0] + p.eye_w + 4, p.eye_y - 1), (xs[1] - p.eye_w - 4, p.eye_y - 1)], colour, 2)


def render_face(p: Identity, rng: np.random.Generator, variation: float = 1.0) -> np.ndarray:
    """One 112x112 BGR uint8 photo of identity `p`; `rng` draws this photo's conditions."""
    u = rng.uniform
    v = variation
    pose = _Pose(u(-15, 15) * v, 1 + u(-0.1, 0.1) * v, u(-8, 8) * v, u(-8, 8) * v)
    yaw = u(-0.35, 0.35) * v  # turning the head: inner features slide sideways, the far side narrows
    image = np.ascontiguousarray(_background(rng))
    cv = _Canvas(image, pose)

    # Clothes and neck, below the head.
    shirt = rng.uniform(0, 255, 3)
    cv.poly([(_CX - 60, SIZE + 20), (_CX - 50, p.head_cy + p.head_h + 2), (_CX + 50, p.head_cy + p.head_h + 2),
             (_CX + 60, SIZE + 20)], shirt)
    cv.poly([(_CX - p.head_w * 0.45, p.head_cy + 20), (_CX + p.head_w * 0.45, p.head_cy + 20),
             (_CX + p.head_w * 0.5, p.head_cy + p.head_h + 6), (_CX - p.head_w * 0.5, p.head_cy + p.head_h + 6)],
            p.skin * 0.8)
    hair_jitter = u(-1.5, 1.5) * v
    _draw_hair_back(cv, p, hair_jitter)
    for side in (-1, 1):  # ears: the one the head turns away from shows more
        ear_w = p.ear_size * 0.55 * (1 + side * yaw * 1.2)
        cv.ellipse(_CX + side * (p.head_w - 1), p.ear_y, max(ear_w, 1.0), p.ear_size, 0, p.skin * 0.9)

    # Skin, with the identity's texture carried by the pose.
    outline = _head_outline(p)
    outline[:, 0] += yaw * 2
    cv.poly(outline, p.skin)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    cv.poly(outline, 255, image=mask)
    texture = cv2.warpAffine(p.texture, pose.matrix(), (SIZE, SIZE), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=1.0)
    shade = 1.0 + (texture - 1.0) * (mask.astype(np.float32) / 255.0)
    np.copyto(image, np.clip(image * shade[..., None], 0, 255).astype(np.uint8))
    for side in (-1, 1):  # cheeks
        if p.cheek > 0.02:
            layer = image.copy()
            cv.ellipse(_CX + side * p.eye_dx * 1.1 + yaw * 5, p.nose_y + 2, 7, 5, 0, (120, 110, 230), image=layer)
            cv2.addWeighted(layer, p.cheek, image, 1 - p.cheek, 0, dst=image)
    for x, y, r in p.moles:
        cv.ellipse(x + yaw * 5, y, r, r, 0, p.skin * 0.4)

    if p.beard:
        _draw_beard(cv, p, yaw * 6)

    # Eyes and brows; the far eye narrows with yaw.
    openness = 1.0 if rng.random() > 0.08 * v else u(0.1, 0.5)
    gaze = (u(-1, 1) * v, u(-0.6, 0.6) * v)
    brow_raise = u(-1.0, 2.0) * v
    eye_xs = []
    for side in (-1, 1):
        x = _CX + side * p.eye_dx + yaw * 6
        eye_xs.append(x)
        _draw_eye(cv, p, x, side, 1 - max(0.0, side * yaw) * 0.5, openness, gaze)
        _draw_brow(cv, p, x, side, brow_raise)

    # Nose: bridge, tip shadow, nostrils.
    tip_x = _CX + yaw * 10
    if p.nose_bridge > 0.05:
        cv.line([(_CX + yaw * 7 + 2, p.eye_y + 2), (tip_x + 3, p.nose_y - 3)], p.skin * (1 - p.nose_bridge), 1)
    cv.ellipse(tip_x, p.nose_y, p.nose_w * 0.55, 3.0, 0, p.skin * 0.82)
    for side in (-1, 1):
        cv.ellipse(tip_x + side * p.nose_w * 0.5, p.nose_y + 1.2, 1.6, 1.1, side * 20, p.skin * 0.45)

    # Mouth: lips follow the smile curve; sometimes open.
    mx = _CX + yaw * 7
    smile = p.smile + u(-1.5, 2.5) * v
    xs = np.linspace(-p.mouth_w, p.mouth_w, 11)
    curve = p.mouth_y - smile * (xs / p.mouth_w) ** 2
    if rng.random() < 0.2 * v:
        gap = u(1.5, 4.0)
        cv.poly(np.concatenate([np.stack([mx + xs, curve - gap * 0.3], 1), np.stack([mx + xs, curve + gap], 1)[::-1]]),
                (40, 30, 60))
    upper = np.stack([mx + xs, curve - p.lip * (1 - (xs / p.mouth_w) ** 2) - 0.5], 1)
    lower = np.stack([mx + xs, curve + p.lip * 1.2 * (1 - (xs / p.mouth_w) ** 2) + 0.5], 1)
    cv.poly(np.concatenate([upper, np.stack([mx + xs, curve], 1)[::-1]]), p.lip_colour)
    cv.poly(np.concatenate([np.stack([mx + xs, curve], 1), lower[::-1]]), p.lip_colour * 1.08)
    cv.line(np.stack([mx + xs, curve], 1), p.lip_colour * 0.55, 1)

    _draw_hair_top(cv, p, hair_jitter)
    if p.glasses:
        _draw_glasses(cv, p, (eye_xs[0], eye_xs[1]))

    return _photograph(image, rng, v)


def _photograph(image: np.ndarray, rng: np.random.Generator, v: float) -> np.ndarray:
    """What the camera adds: occlusion, illumination, colour cast, blur and sensor noise."""
    u = rng.uniform
    if rng.random() < 0.25 * v:  # something in front of the face
        w, h = int(u(14, 40)), int(u(10, 30))
        x0, y0 = int(u(10, SIZE - w - 10)), int(u(30, SIZE - h - 5))
        colour = _colour(rng.uniform(0, 255, 3))
        if rng.random() < 0.5:
            cv2.rectangle(image, (x0, y0), (x0 + w, y0 + h), colour, -1)
        else:
            cv2.ellipse(image, (x0 + w // 2, y0 + h // 2), (w // 2, h // 2), u(0, 180), 0, 360, colour, -1, _AA)
    out = image.astype(np.float32)
    # Light from one side: a linear gain across the image, a global exposure, a colour cast, gamma.
    angle = u(0, 2 * np.pi)
    strength = u(0, 0.45) * v
    ramp = (np.arange(SIZE, dtype=np.float32) - SIZE / 2) / (SIZE / 2)
    gain = 1 + strength * (ramp[None, :] * math.cos(angle) + ramp[:, None] * math.sin(angle))
    exposure = 1 + u(-0.25, 0.25) * v
    cast = 1 + rng.uniform(-0.08, 0.08, 3).astype(np.float32) * v
    out *= (gain * exposure)[..., None] * cast
    gamma = math.exp(u(-0.25, 0.25) * v)
    out = 255.0 * (np.clip(out, 0, 255) / 255.0) ** gamma
    if rng.random() < 0.5 * v:
        sigma = u(0.4, 1.6) * v
        out = cv2.GaussianBlur(out, (0, 0), sigma)
    noise = u(0, 7) * v
    if noise > 0.5:
        out += rng.standard_normal(out.shape, dtype=np.float32) * noise
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------- data set


def identity(seed: int, index: int, *, val: bool = False) -> Identity:
    """Training identity `index`, or held-out identity `index` with `val=True` (a separate stream)."""
    return sample_identity(np.random.default_rng([seed, _VAL_IDENTITY if val else _TRAIN_IDENTITY, index, 0]))


def _photo_rng(seed: int, stream: int, index: int, photo: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, index, 1, photo])


def _encode(image: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 image
        raise DataError("OpenCV failed to encode a synthetic face as JPEG")
    return buf.tobytes()


def identity_images(seed: int, index: int, count: int, *, variation: float = 1.0,
                    val: bool = False) -> list[np.ndarray]:
    """`count` BGR photos of training (or held-out, `val=True`) identity `index`."""
    stream = _VAL_IDENTITY if val else _TRAIN_IDENTITY
    person = identity(seed, index, val=val)
    return [render_face(person, _photo_rng(seed, stream, index, j), variation) for j in range(count)]


def verification_pairs(seed: int, num_identities: int, num_pairs: int) -> list[tuple[int, int, bool]]:
    """(identity a, identity b, same) for each pair; same and different pairs alternate within
    every tenth of the list so that each of the protocol's 10 contiguous folds is balanced."""
    if num_identities < 2:
        raise ValueError(f"different-identity pairs need at least 2 identities, got {num_identities}")
    rng = np.random.default_rng([seed, _VAL_PAIRS])
    pairs = []
    for k in range(num_pairs):
        a = int(rng.integers(num_identities))
        if k % 2 == 0:
            pairs.append((a, a, True))
        else:
            b = int(rng.integers(num_identities - 1))
            pairs.append((a, b + (b >= a), False))
    return pairs


def verification_photos(seed: int, pairs: list[tuple[int, int, bool]],
                        photos_per_identity: int | None) -> list[tuple[int, int]]:
    """The photo numbers (of identity a, of identity b) of each pair.

    None: every place of every pair gets a photo of its own (photo 2k and 2k + 1 of pair k), so
    no image repeats. A number P: each held-out identity has photos 0 .. P-1 and the pairs draw
    from them, the two photos of a same pair differing, so a photo is in about
    2 * len(pairs) / (P * identities) pairs, as in the public sets (CFP-FP's 7,000 pairs are
    drawn from its 7,000 photos), and evaluation embeds each distinct photo once.
    """
    if photos_per_identity is None:
        return [(2 * k, 2 * k + 1) for k in range(len(pairs))]
    rng = np.random.default_rng([seed, _VAL_PHOTOS])
    photos = []
    for _, _, same in pairs:
        first = int(rng.integers(photos_per_identity))
        if same:
            second = int(rng.integers(photos_per_identity - 1))
            second += second >= first
        else:
            second = int(rng.integers(photos_per_identity))
        photos.append((first, second))
    return photos


# Work is handed to the pool in chunks of identities (or photos): each task returns the
# encoded JPEGs, which are small next to the cost of drawing them.
_CHUNK = 16


def _encode_identities(task: tuple) -> list[list[bytes]]:
    seed, first, end, count, quality, variation = task
    return [[_encode(img, quality) for img in identity_images(seed, i, count, variation=variation)]
            for i in range(first, end)]


def _encode_val_photos(task: tuple) -> list[bytes]:
    """JPEGs of (held-out identity, photo number) pairs: a photo number picks the photo's own
    random stream, so a photo is the same whichever pair it is drawn for."""
    seed, photos, quality, variation = task
    people: dict[int, Identity] = {}
    encoded = []
    for index, photo in photos:
        if index not in people:
            people[index] = identity(seed, index, val=True)
        rng = _photo_rng(seed, _VAL_IDENTITY, index, photo)
        encoded.append(_encode(render_face(people[index], rng, variation), quality))
    return encoded


def _counted(identities: list[list[bytes]], bar) -> list[list[bytes]]:
    bar.update(sum(len(images) for images in identities))
    return identities


def _pool(workers: int):
    """A process pool, or None for one process. fork where the platform has it: the workers
    need only NumPy and OpenCV, and spawning would re-import the caller (torch) in each."""
    if workers <= 1:
        return None
    import multiprocessing

    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else None).Pool(workers)


def _params(num_identities, images_per_identity, num_val_identities, num_val_pairs, seed, quality, variation,
            val_photos_per_identity) -> dict:
    return {
        "generator_version": GENERATOR_VERSION, "num_identities": num_identities,
        "images_per_identity": images_per_identity, "num_val_identities": num_val_identities,
        "num_val_pairs": num_val_pairs, "seed": seed, "quality": quality, "variation": variation,
        "val_photos_per_identity": val_photos_per_identity,
    }


def _check_params(params: dict) -> None:
    where = "synthetic_faces"
    for key in ("num_identities", "images_per_identity", "num_val_identities", "num_val_pairs"):
        value = params[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise DataError(f"{where}: {key} must be a positive integer, got {value!r}")
    for key in ("num_val_identities", "images_per_identity"):
        if params[key] < 2:
            raise DataError(f"{where}: {key} must be at least 2, got {params[key]}")
    if params["num_val_pairs"] % 2:
        raise DataError(f"{where}: num_val_pairs must be even (half same, half different), got {params['num_val_pairs']}")
    if not isinstance(params["seed"], int) or isinstance(params["seed"], bool) or params["seed"] < 0:
        raise DataError(f"{where}: seed must be a non-negative integer, got {params['seed']!r}")
    if not isinstance(params["quality"], int) or not 1 <= params["quality"] <= 100:
        raise DataError(f"{where}: quality must be a JPEG quality in 1..100, got {params['quality']!r}")
    if not isinstance(params["variation"], (int, float)) or not 0 <= params["variation"] <= 2:
        raise DataError(f"{where}: variation must be a number in [0, 2], got {params['variation']!r}")
    photos = params["val_photos_per_identity"]
    if photos is not None and (not isinstance(photos, int) or isinstance(photos, bool) or photos < 2):
        raise DataError(f"{where}: val_photos_per_identity must be None or an integer of at least 2 "
                        f"(a same pair needs two photos), got {photos!r}")


def read_params(root: str | os.PathLike) -> dict | None:
    """The parameters of the complete set in `root`, or None when there is none."""
    path = Path(root) / PARAMS_FILE
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(recorded, dict) or not recorded.get("complete"):
        return None
    return recorded.get("params")


def materialize(
    root: str | os.PathLike,
    num_identities: int = 500,
    images_per_identity: int = 12,
    num_val_identities: int = 200,
    num_val_pairs: int = 600,
    seed: int = 0,
    quality: int = 90,
    variation: float = 1.0,
    val_photos_per_identity: int | None = None,
    *,
    workers: int | None = None,
    **unknown,
) -> bool:
    """Write the synthetic-faces set into `root` unless it already holds the same one.

    Files: `train.rec`, `train.idx`, `property` (MS1M layout, labels 0 .. num_identities-1)
    and `synthetic_val.bin` (num_val_pairs pairs of held-out identities, half of them
    same-identity; their photos drawn from `val_photos_per_identity` per identity, or
    with None a photo of its own in every place: `verification_photos`).
    `synthetic_faces.json` records the parameters; it is marked complete only after every
    other file is in place, so an interrupted run is redone. A folder
    holding a `train.rec` that this generator did not write is refused rather than
    overwritten. `workers` processes draw the images (default: the CPU count, at most 8);
    the output does not depend on it. Returns True when the set was (re)generated, False
    when it was reused. The parameters usually come from a config's `synthetic_faces`
    dict, so an unknown one is a DataError naming it rather than a TypeError.
    """
    logger = logging.getLogger("arcface.data")
    if unknown:
        raise DataError(_unknown_key_message(sorted(unknown)[0]))
    if str(root) == "synthetic":
        raise DataError("synthetic_faces needs rec to be a folder to draw into; rec='synthetic' means random tensors")
    params = _params(num_identities, images_per_identity, num_val_identities, num_val_pairs, seed, quality, variation,
                     val_photos_per_identity)
    _check_params(params)
    out = Path(root)
    marker = out / PARAMS_FILE
    if read_params(out) == params and all((out / name).is_file() for name in _OUTPUTS):
        logger.info("synthetic faces: reusing the set in %s (%d identities x %d images)",
                    out, num_identities, images_per_identity)
        return False
    if out.exists() and not out.is_dir():
        raise DataError(f"synthetic_faces: rec={str(root)!r} exists and is not a folder")
    if (out / "train.rec").exists() and not marker.exists():
        raise DataError(
            f"synthetic_faces: {out} already holds a train.rec that was not generated here "
            f"(no {PARAMS_FILE}); choose an empty folder for rec"
        )
    out.mkdir(parents=True, exist_ok=True)
    _write_marker(marker, params, complete=False)  # from here on, the folder is known to be ours
    start = time.perf_counter()
    logger.info("synthetic faces: drawing %d identities x %d images and %d verification pairs of %d held-out "
                "identities into %s", num_identities, images_per_identity, num_val_pairs, num_val_identities, out)
    from dataset.recordio import write_identity_records
    from dataset.verification_bin import write_bin

    from utils.progress import progress_bar

    workers = max(1, min(os.cpu_count() or 1, 8) if workers is None else workers)
    pool = _pool(workers)
    run = pool.imap if pool is not None else map
    pairs = verification_pairs(seed, num_val_identities, num_val_pairs)
    photos = verification_photos(seed, pairs, val_photos_per_identity)
    places = [place for (a, b, _), (pa, pb) in zip(pairs, photos) for place in ((a, pa), (b, pb))]
    distinct = list(dict.fromkeys(places))  # each photo drawn once, however many pairs hold it
    try:
        with progress_bar(total=num_identities * images_per_identity + len(distinct), desc="synthetic faces") as bar:
            chunks = [(seed, i, min(i + _CHUNK, num_identities), images_per_identity, quality, variation)
                      for i in range(0, num_identities, _CHUNK)]
            identities = (images for chunk in run(_encode_identities, chunks) for images in _counted(chunk, bar))
            write_identity_records(out, identities)
            tasks = [(seed, distinct[k:k + _CHUNK], quality, variation) for k in range(0, len(distinct), _CHUNK)]
            encoded = []
            for chunk in run(_encode_val_photos, tasks):
                encoded.extend(chunk)
                bar.update(len(chunk))
            jpeg_of = dict(zip(distinct, encoded))
            write_bin(str(out / f"{VAL_NAME}.bin"), [jpeg_of[place] for place in places], [same for _, _, same in pairs])
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    _write_marker(marker, params, complete=True)
    logger.info("synthetic faces: done in %.1f s", time.perf_counter() - start)
    return True


def _unknown_key_message(key: str) -> str:
    import inspect

    from utils.config import closest_key

    known = [name for name in inspect.signature(materialize).parameters if name not in ("root", "unknown")]
    close = closest_key(key, known)
    hint = f"did you mean {close!r}? " if close else ""
    return f"synthetic_faces: unknown key {key!r}; {hint}known keys: {', '.join(known)}"


def _write_marker(path: Path, params: dict, complete: bool) -> None:
    from utils.atomic_file import atomic_write

    with atomic_write(path) as f:
        f.write(json.dumps({"complete": complete, "params": params}, indent=2, sort_keys=True).encode() + b"\n")
