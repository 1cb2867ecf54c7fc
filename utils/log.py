"""Logging set-up and the training progress line (speed, loss, lr, ETA)."""
from __future__ import annotations

import logging
import sys
import time

LOGGER_NAME = "arcface"


def setup_logging(rank: int) -> logging.Logger:
    """Rank 0 logs INFO to the console, other ranks only errors (to stderr, tagged with the rank).
    The log file joins later (`add_file_handler`), once the run's checks have passed."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()
    logger.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    if rank == 0:
        logger.setLevel(logging.INFO)
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(fmt)
        logger.addHandler(console)
    else:
        logger.setLevel(logging.ERROR)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"[rank {rank}] %(levelname)s %(message)s"))
        logger.addHandler(handler)
    return logger


def add_file_handler(logger: logging.Logger, path: str) -> None:
    """Also write the log to `path` (appending: a resumed run continues its training.log)."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
    logger.addHandler(handler)


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


class SpeedMeter:
    """Samples/s and ETA over the steps since the last report.

    The loss is accumulated as a tensor on the device and only read when a line is
    printed, so steps that do not log never wait for the device.
    """

    def __init__(self, global_batch_size: int, total_steps: int, start_step: int = 0):
        self.global_batch_size = global_batch_size
        self.total_steps = total_steps
        self.start_step = start_step
        self.t_start = self.t_last = time.perf_counter()
        self.step_last = start_step
        self.loss_sum = None
        self.loss_count = 0

    def add_loss(self, loss) -> None:
        value = loss.detach()
        self.loss_sum = value if self.loss_sum is None else self.loss_sum + value
        self.loss_count += 1

    def report(self, step: int) -> dict:
        now = time.perf_counter()
        steps = max(1, step - self.step_last)
        elapsed = max(1e-9, now - self.t_last)
        speed = steps * self.global_batch_size / elapsed
        done = step - self.start_step
        rate = done / max(1e-9, now - self.t_start)  # steps/s since this process started
        remaining = (self.total_steps - step) / rate if rate > 0 else float("inf")
        loss = float(self.loss_sum) / self.loss_count if self.loss_count else float("nan")
        self.t_last, self.step_last = now, step
        self.loss_sum, self.loss_count = None, 0
        return {"samples_per_sec": speed, "loss": loss, "eta_seconds": remaining, "elapsed": now - self.t_start}
