"""Line plots (ROC curves, benchmark curves) as PNG files, drawn by matplotlib.

Figures are built with `matplotlib.figure.Figure` and rendered by the Agg canvas
directly: no pyplot, so nothing here touches matplotlib's global state (the
backend, the current figure) and no display is needed. Files are written
atomically. Points that cannot be shown (NaN, or <= 0 on a log axis) leave a gap.
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np

from utils.atomic_file import atomic_write

Series = Mapping[str, tuple[Sequence[float], Sequence[float]]]  # {label: (xs, ys)}

DPI = 100
_MARKER_MAX_POINTS = 50  # sparse series (a benchmark's few sizes) get a marker on every point


def _draw(
    ax,
    series: Series,
    title: str,
    xlabel: str,
    ylabel: str,
    logx: bool = False,
    logy: bool = False,
    xlim: tuple[float, float] | None = None,
    ylim: tuple[float, float] | None = None,
) -> None:
    for label, (xs, ys) in series.items():
        xs, ys = np.asarray(xs, dtype=np.float64).ravel(), np.asarray(ys, dtype=np.float64).ravel()
        if xs.shape != ys.shape:
            raise ValueError(f"series '{label}': {xs.size} x values but {ys.size} y values")
        marker = "o" if xs.size <= _MARKER_MAX_POINTS else None
        ax.plot(xs, ys, label=label, linewidth=1.8, marker=marker, markersize=4)
    if logx:
        ax.set_xscale("log", nonpositive="mask")
    if logy:
        ax.set_yscale("log", nonpositive="mask")
    if xlim is not None:
        ax.set_xlim(*xlim)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", linestyle="--", alpha=0.5)
    if series:
        ax.legend(loc="best")


def line_plots(path_png: str | os.PathLike, panels: Sequence[dict], size: tuple[int, int] = (960, 640)) -> None:
    """Several line plots stacked vertically in one PNG; each panel is a dict of `line_plot`'s
    keyword arguments (series, title, xlabel, ylabel, logx, logy, xlim, ylim). `size` is one
    panel's width x height in pixels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not panels:
        raise ValueError("line_plots needs at least one panel")
    width, height = size
    fig = Figure(figsize=(width / DPI, height * len(panels) / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    for ax, panel in zip(fig.subplots(len(panels), 1, squeeze=False)[:, 0], panels):
        _draw(ax, **panel)
    os.makedirs(os.path.dirname(os.path.abspath(path_png)), exist_ok=True)
    with atomic_write(path_png) as f:
        fig.savefig(f, format="png", dpi=DPI)


def line_plot(
    path_png: str | os.PathLike,
    series: Series,
    title: str,
    xlabel: str,
    ylabel: str,
    logx: bool = False,
    logy: bool = False,
    xlim: tuple[float, float] | None = None,
    ylim: tuple[float, float] | None = None,
    size: tuple[int, int] = (960, 640),
) -> None:
    """One line per entry of `series` ({label: (xs, ys)}), saved as a `size` (width, height) PNG."""
    panel = dict(series=series, title=title, xlabel=xlabel, ylabel=ylabel, logx=logx, logy=logy, xlim=xlim, ylim=ylim)
    line_plots(path_png, [panel], size=size)


def write_csv(path: str | os.PathLike, columns: Mapping[str, Sequence[float]]) -> None:
    """The numbers behind a plot: a header line, then one row per point (full float precision)."""
    arrays = [np.asarray(v, dtype=np.float64).ravel() for v in columns.values()]
    if len({a.size for a in arrays}) > 1:
        raise ValueError(f"columns of different lengths: {', '.join(f'{k} {a.size}' for k, a in zip(columns, arrays))}")
    with atomic_write(path, "w", newline="") as f:
        np.savetxt(f, np.stack(arrays, axis=1), delimiter=",", header=",".join(columns), comments="", fmt="%.9g")
