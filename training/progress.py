"""The one place where a logging step becomes metrics, and the metrics go out.

`ProgressReport` builds one dict per logging step (loss, each auxiliary term, lr,
samples/s, grad scale, epoch, skipped steps, elapsed time, ETA) and hands it to the
progress line in training.log, to TensorBoard (`train/loss`, `train/lr`,
`train/samples_per_sec` and `train/<term>` for each auxiliary term) and to any further
tracker: an object with `log(metrics: dict, step: int)` passed in `trackers`.
"""
from __future__ import annotations

import math

from utils.log import format_duration

# Metrics that are not losses; every other key of the dict is a loss ("loss" first).
_NOT_LOSSES = ("lr", "samples_per_sec", "grad_scale", "epoch", "skipped_nonfinite_steps", "elapsed_s", "eta_s")


class TensorBoardTracker:
    """The TensorBoard scalars of the progress line."""

    def __init__(self, writer):
        self.writer = writer

    def log(self, metrics: dict, step: int) -> None:
        for name, value in metrics.items():
            if name not in _NOT_LOSSES:
                self.writer.add_scalar(f"train/{name}", value, step)
        self.writer.add_scalar("train/lr", metrics["lr"], step)
        self.writer.add_scalar("train/samples_per_sec", metrics["samples_per_sec"], step)


class ProgressReport:
    """Metrics of a logging step -> the log line (rank 0) and every tracker."""

    def __init__(self, logger, meter, total_steps: int, trackers=()):
        self.logger, self.meter, self.total_steps = logger, meter, total_steps
        self.trackers = list(trackers)

    def metrics(self, step: int, *, epoch: int, losses: dict[str, float], lr: float, scaler=None,
                skipped_nonfinite: int = 0) -> dict:
        """The step's metrics; reads the speed meter (so call it once per logging step)."""
        timing = self.meter.report(step)
        metrics = dict(losses)
        metrics.update(lr=lr, samples_per_sec=timing["samples_per_sec"], epoch=epoch,
                       skipped_nonfinite_steps=skipped_nonfinite,
                       elapsed_s=timing["elapsed"], eta_s=timing["eta_seconds"])
        if scaler is not None:
            metrics["grad_scale"] = scaler.get_scale()
        return metrics

    def line(self, step: int, metrics: dict) -> str:
        parts = [f"step {step}/{self.total_steps} ({100.0 * step / self.total_steps:.1f}%)", f"epoch {metrics['epoch']}"]
        parts += [f"{name} {value:.4f}" for name, value in metrics.items() if name not in _NOT_LOSSES]
        parts += [f"lr {metrics['lr']:.6f}", f"{metrics['samples_per_sec']:.1f} samples/s"]
        if "grad_scale" in metrics:
            parts.append(f"grad scale {metrics['grad_scale']:.0f}")
        if metrics["skipped_nonfinite_steps"]:
            parts.append(f"skipped non-finite steps {metrics['skipped_nonfinite_steps']}")
        parts.append(f"elapsed {format_duration(metrics['elapsed_s'])}")
        eta = metrics["eta_s"]
        parts.append(f"ETA {format_duration(eta) if math.isfinite(eta) else '?'}")
        return " | ".join(parts)

    def publish(self, step: int, metrics: dict) -> None:
        self.logger.info(self.line(step, metrics))
        for tracker in self.trackers:
            tracker.log(metrics, step)
