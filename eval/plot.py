"""Line plots drawn with OpenCV, so the tools need no plotting library.

`line_plot` draws axes, ticks, a dashed grid, axis labels, a title and a legend;
logarithmic axes get decade ticks. Points that cannot be shown (NaN, or <= 0 on
a log axis) are skipped.
"""
from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import cv2
import numpy as np

from utils.atomic_file import atomic_write

FONT = cv2.FONT_HERSHEY_SIMPLEX
# Distinguishable colours (BGR): blue, orange, green, red, purple, brown, pink, grey, olive, cyan.
PALETTE = [
    (180, 119, 31), (14, 127, 255), (44, 160, 44), (40, 39, 214), (189, 103, 148),
    (75, 86, 140), (194, 119, 227), (127, 127, 127), (34, 189, 188), (207, 190, 23),
]
_SUBPIXEL_BITS = 4  # cv2 draws with 1/16 pixel precision when given shifted coordinates
_BLACK, _GRID, _WHITE = (0, 0, 0), (210, 210, 210), (255, 255, 255)


def _ascii(text: str) -> str:
    return text.encode("ascii", "replace").decode("ascii")  # Hershey fonts have ASCII only


def _nice_step(span: float, target_ticks: int = 6) -> float:
    raw = span / max(1, target_ticks)
    magnitude = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 2.5, 5, 10):
        if raw <= factor * magnitude:
            return factor * magnitude
    return 10 * magnitude


class _Axis:
    """Maps data values to pixels along one axis; knows its ticks and their labels."""

    def __init__(self, values: np.ndarray, log: bool, limits: tuple[float, float] | None):
        """values: the data already in axis space (log10 on a log axis); limits in data units."""
        self.log = log
        if limits is not None:
            lo, hi = (float(v) for v in _to_axis_space(np.asarray(limits, dtype=np.float64), log))
            self.fixed = True
        else:
            finite = values[np.isfinite(values)]
            lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
            self.fixed = False
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError(f"axis limits {limits} cannot be shown on a {'log' if log else 'linear'} axis")
        if hi - lo < 1e-12:
            pad = 1.0 if log else max(abs(lo) * 0.1, 0.5)
            lo, hi = lo - pad, hi + pad
        if log:
            if not self.fixed:
                lo, hi = math.floor(lo + 1e-9), math.ceil(hi - 1e-9)
            step = max(1, math.ceil((hi - lo) / 8))
            first = math.ceil(lo - 1e-9)
            self.ticks = [float(t) for t in range(first, int(math.floor(hi + 1e-9)) + 1, step)]
        else:
            step = _nice_step(hi - lo)
            if not self.fixed:
                lo, hi = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
            first = math.ceil(lo / step - 1e-9)
            self.ticks = [k * step for k in range(first, int(math.floor(hi / step + 1e-9)) + 1)]
            self.decimals = max(0, -int(math.floor(math.log10(step) + 1e-9)))
            if step * 10**self.decimals % 1 > 1e-6:  # steps like 0.25 need one more digit
                self.decimals += 1
        self.lo, self.hi = lo, hi

    def transform(self, values) -> np.ndarray:
        return _to_axis_space(np.asarray(values, dtype=np.float64), self.log)

    def fraction(self, transformed: np.ndarray) -> np.ndarray:
        return (transformed - self.lo) / (self.hi - self.lo)

    def label(self, tick: float) -> str:
        if self.log:
            exponent = int(round(tick))
            return {0: "1", 1: "10"}.get(exponent, f"1e{exponent}")
        text = f"{tick:.{self.decimals}f}"
        return "0" if text.strip("-0.") == "" else text


def _dashed_line(img, p0, p1, color, dash=6, gap=5):
    p0, p1 = np.array(p0, dtype=float), np.array(p1, dtype=float)
    length = float(np.hypot(*(p1 - p0)))
    if length == 0:
        return
    direction = (p1 - p0) / length
    pos = 0.0
    while pos < length:
        a = p0 + direction * pos
        b = p0 + direction * min(pos + dash, length)
        cv2.line(img, tuple(int(round(v)) for v in a), tuple(int(round(v)) for v in b), color, 1, cv2.LINE_AA)
        pos += dash + gap


def _put_text(img, text, org, scale, color=_BLACK, thickness=1, anchor="left"):
    """Text with its baseline-left (anchor "left"), centre ("center") or right end ("right") at org."""
    text = _ascii(text)
    (w, h), _ = cv2.getTextSize(text, FONT, scale, thickness)
    x, y = org
    if anchor == "center":
        x -= w // 2
    elif anchor == "right":
        x -= w
    cv2.putText(img, text, (int(x), int(y)), FONT, scale, color, thickness, cv2.LINE_AA)
    return w, h


def line_plot(
    path_png: str,
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    title: str,
    xlabel: str,
    ylabel: str,
    logx: bool = False,
    logy: bool = False,
    xlim: tuple[float, float] | None = None,
    ylim: tuple[float, float] | None = None,
    size: tuple[int, int] = (960, 640),
) -> None:
    """Draw one line per entry of `series` ({label: (xs, ys)}) and save it as a PNG."""
    width, height = size
    left, right, top, bottom = 96, 28, 56, 72
    pw, ph = width - left - right, height - top - bottom
    if pw < 100 or ph < 100:
        raise ValueError(f"plot size {size} is too small")

    curves = []
    for label, (xs, ys) in series.items():
        xs, ys = np.asarray(xs, dtype=np.float64).ravel(), np.asarray(ys, dtype=np.float64).ravel()
        if xs.shape != ys.shape:
            raise ValueError(f"series '{label}': {xs.size} x values but {ys.size} y values")
        curves.append((label, xs, ys))
    all_x = np.concatenate([c[1] for c in curves]) if curves else np.zeros(0)
    all_y = np.concatenate([c[2] for c in curves]) if curves else np.zeros(0)
    xaxis = _Axis(_to_axis_space(all_x, logx), logx, xlim)
    yaxis = _Axis(_to_axis_space(all_y, logy), logy, ylim)

    img = np.full((height, width, 3), 255, dtype=np.uint8)
    area = np.full((ph, pw, 3), 255, dtype=np.uint8)

    def to_px(tx, ty):
        return xaxis.fraction(tx) * (pw - 1), (1.0 - yaxis.fraction(ty)) * (ph - 1)

    for t in xaxis.ticks:
        x = xaxis.fraction(t) * (pw - 1)
        _dashed_line(area, (x, 0), (x, ph - 1), _GRID)
    for t in yaxis.ticks:
        y = (1.0 - yaxis.fraction(t)) * (ph - 1)
        _dashed_line(area, (0, y), (pw - 1, y), _GRID)

    scale = 1 << _SUBPIXEL_BITS
    for i, (label, xs, ys) in enumerate(curves):
        px, py = to_px(xaxis.transform(xs), yaxis.transform(ys))
        ok = np.isfinite(px) & np.isfinite(py)
        # Break the line where a point cannot be shown; clamp far-away points so cv2 can clip them.
        for run in np.split(np.arange(px.size), np.flatnonzero(~ok)):
            run = run[ok[run]]
            if run.size == 0:
                continue
            pts = np.stack([px[run], py[run]], axis=1).clip(-1e4, 1e4)
            pts = np.round(pts * scale).astype(np.int32).reshape(-1, 1, 2)
            color = PALETTE[i % len(PALETTE)]
            if run.size == 1:
                cv2.circle(area, tuple(pts[0, 0]), 3 * scale, color, -1, cv2.LINE_AA, _SUBPIXEL_BITS)
            else:
                cv2.polylines(area, [pts], False, color, 2, cv2.LINE_AA, _SUBPIXEL_BITS)
    img[top : top + ph, left : left + pw] = area
    cv2.rectangle(img, (left - 1, top - 1), (left + pw, top + ph), _BLACK, 1)

    for t in xaxis.ticks:
        x = left + int(round(xaxis.fraction(t) * (pw - 1)))
        cv2.line(img, (x, top + ph), (x, top + ph + 5), _BLACK, 1)
        _put_text(img, xaxis.label(t), (x, top + ph + 22), 0.5, anchor="center")
    max_label_w = 0
    for t in yaxis.ticks:
        y = top + int(round((1.0 - yaxis.fraction(t)) * (ph - 1)))
        cv2.line(img, (left - 6, y), (left - 1, y), _BLACK, 1)
        w, h = _put_text(img, yaxis.label(t), (left - 10, y + 5), 0.5, anchor="right")
        max_label_w = max(max_label_w, w)

    _put_text(img, title, (left + pw // 2, top - 20), 0.75, thickness=2, anchor="center")
    _put_text(img, xlabel, (left + pw // 2, height - 20), 0.6, anchor="center")
    _draw_vertical_label(img, ylabel, center_y=top + ph // 2, right_x=left - 16 - max_label_w)
    if curves:
        _draw_legend(img, curves, (left, top, pw, ph), to_px, xaxis, yaxis)
    _write_png(path_png, img)


def _to_axis_space(values: np.ndarray, log: bool) -> np.ndarray:
    """log10 on a log axis (NaN where not positive), unchanged otherwise."""
    if not log:
        return values
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(values > 0, np.log10(np.where(values > 0, values, 1.0)), np.nan)


def _draw_vertical_label(img, text, center_y, right_x):
    text = _ascii(text)
    (w, h), base = cv2.getTextSize(text, FONT, 0.6, 1)
    strip = np.full((h + base + 4, w + 4, 3), 255, dtype=np.uint8)
    cv2.putText(strip, text, (2, h + 2), FONT, 0.6, _BLACK, 1, cv2.LINE_AA)
    strip = cv2.rotate(strip, cv2.ROTATE_90_COUNTERCLOCKWISE)
    sh, sw = strip.shape[:2]
    x0 = max(0, right_x - sw)
    y0 = max(0, center_y - sh // 2)
    sh, sw = min(sh, img.shape[0] - y0), min(sw, img.shape[1] - x0)
    img[y0 : y0 + sh, x0 : x0 + sw] = np.minimum(img[y0 : y0 + sh, x0 : x0 + sw], strip[:sh, :sw])


def _draw_legend(img, curves, area_box, to_px, xaxis, yaxis):
    left, top, pw, ph = area_box
    labels = [_ascii(c[0]) for c in curves]
    sizes = [cv2.getTextSize(t, FONT, 0.5, 1)[0] for t in labels]
    row_h, swatch, pad = 22, 28, 10
    box_w = swatch + 8 + max(w for w, _ in sizes) + 2 * pad
    box_h = row_h * len(labels) + pad
    # Put the legend in the corner that hides the fewest plotted points.
    pts = [to_px(xaxis.transform(xs), yaxis.transform(ys)) for _, xs, ys in curves]
    px = np.concatenate([p[0] for p in pts])
    py = np.concatenate([p[1] for p in pts])
    best = None
    for cx, cy in ((pw - box_w - pad, ph - box_h - pad), (pw - box_w - pad, pad), (pad, pad), (pad, ph - box_h - pad)):
        inside = np.sum((px >= cx) & (px <= cx + box_w) & (py >= cy) & (py <= cy + box_h))
        if best is None or inside < best[0]:
            best = (inside, cx, cy)
    x0, y0 = left + int(best[1]), top + int(best[2])
    cv2.rectangle(img, (x0, y0), (x0 + box_w, y0 + box_h), _WHITE, -1)
    cv2.rectangle(img, (x0, y0), (x0 + box_w, y0 + box_h), (120, 120, 120), 1)
    for i, text in enumerate(labels):
        y = y0 + pad + i * row_h + row_h // 2
        cv2.line(img, (x0 + pad, y - 4), (x0 + pad + swatch, y - 4), PALETTE[i % len(PALETTE)], 2, cv2.LINE_AA)
        _put_text(img, text, (x0 + pad + swatch + 8, y + 1), 0.5)


def _write_png(path: str, img: np.ndarray) -> None:
    ok, encoded = cv2.imencode(".png", img)
    if not ok:
        raise RuntimeError(f"{path}: PNG encoding failed")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path) as f:
        f.write(encoded.tobytes())
