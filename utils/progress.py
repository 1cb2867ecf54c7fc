"""Progress bars for the long-running tools: tqdm with the project's defaults.

Bars go to stderr (stdout stays the tool's result, fit for a pipe) and show the
count, the rate and the ETA. They are off when stderr is not a terminal (a log
file, a pipe, a test's captured output) and when the environment variable CI is
set to anything but "", "0" or "false", so batch jobs get no carriage-return noise.
The training log's speed/ETA is a log line (utils.log.SpeedMeter), not a bar.
"""
from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def _under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false")


def progress_bar(
    iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str | None = None, unit: str = "img", **kwargs
) -> tqdm:
    """A tqdm bar on stderr; `disable=None` is tqdm's "only on a terminal", forced off under CI.

    Use as an iterator wrapper (`for x in progress_bar(items, desc=...)`) or as a counter
    (`with progress_bar(total=n) as bar: ... bar.update(k)`).
    """
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("disable", True if _under_ci() else None)
    return tqdm(iterable, total=total, desc=desc, unit=unit, **kwargs)
