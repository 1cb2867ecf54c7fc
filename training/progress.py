"""The one place where a logging step becomes metrics, and the metrics go out.

`ProgressReport` builds one dict per logging step (loss, each auxiliary term, the last
step's loss, lr, samples/s, grad scale, epoch, skipped steps, elapsed time, ETA, and
figures such as the margin's state) and hands it to the progress line in training.log
and to every tracker: an object with `log(metrics: dict, step: int)` passed in
`trackers`. `TrackerSink` is the one train.py passes: utils.tracking.Tracker, which
owns TensorBoard and wandb and names the metrics as insightface does.

Call `publish` on every rank: the log line is rank 0's (other ranks' loggers drop INFO),
and the tracker decides what each rank records (wandb_log_all).
"""
from __future__ import annotations

import math

from utils.log import format_duration

# Metrics that are not losses; every other key of the dict is a loss ("loss" first), except
# figures, whose names hold a "/" ("Margin/t").
_NOT_LOSSES = ("step_loss", "lr", "samples_per_sec", "grad_scale", "epoch", "skipped_nonfinite_steps",
               "elapsed_s", "eta_s")
# What the log line shows but a tracker does not take as a figure (it gets the epoch apart).
_LINE_ONLY = ("epoch", "elapsed_s", "eta_s", "skipped_nonfinite_steps")
SKIPPED_STEPS_NAME = "Process/Skipped Non-finite Steps"


def _is_loss(name: str) -> bool:
    return name not in _NOT_LOSSES and "/" not in name


def margin_figures(head) -> dict[str, float]:
    """The margin's scalar state as `Margin/<name>` figures: AdaFace's batch_mean and
    batch_std, CurricularFace's t (nothing for the stateless margins). Reads the device:
    call it at logging steps only."""
    margin = getattr(head, "margin_loss", None)
    if margin is None:
        return {}
    return {f"Margin/{name}": float(buffer) for name, buffer in margin.named_buffers() if buffer.numel() == 1}


class TrackerSink:
    """A logging step's metrics to a utils.tracking.Tracker (TensorBoard, wandb): `loss`,
    `step_loss`, lr, samples/s and grad scale under insightface's names, every auxiliary term
    under Train/<name>, figures ("Margin/t") as they are, and the skipped steps."""

    def __init__(self, tracker):
        self.tracker = tracker

    def log(self, metrics: dict, step: int) -> None:
        row = {name: value for name, value in metrics.items() if name not in _LINE_ONLY}
        row[SKIPPED_STEPS_NAME] = metrics["skipped_nonfinite_steps"]
        self.tracker.log_train(step, row, metrics["epoch"])


class ProgressReport:
    """Metrics of a logging step -> the log line (rank 0) and every tracker."""

    def __init__(self, logger, meter, total_steps: int, trackers=()):
        self.logger, self.meter, self.total_steps = logger, meter, total_steps
        self.trackers = list(trackers)

    def metrics(self, step: int, *, epoch: int, losses: dict[str, float], lr: float, scaler=None,
                skipped_nonfinite: int = 0, step_loss: float | None = None,
                figures: dict[str, float] | None = None) -> dict:
        """The step's metrics; reads the speed meter (so call it once per logging step).

        `losses` are the means since the last logging step ("loss", then the auxiliary terms),
        `step_loss` the loss of the step being logged, `figures` further values whose names
        hold a "/" (not shown in the log line)."""
        timing = self.meter.report(step)
        metrics = dict(losses)
        if step_loss is not None:
            metrics["step_loss"] = step_loss
        metrics.update(lr=lr, samples_per_sec=timing["samples_per_sec"], epoch=epoch,
                       skipped_nonfinite_steps=skipped_nonfinite,
                       elapsed_s=timing["elapsed"], eta_s=timing["eta_seconds"])
        if scaler is not None:
            metrics["grad_scale"] = scaler.get_scale()
        for name, value in (figures or {}).items():
            if "/" not in name:
                raise ValueError(f"figure names hold a '/' (e.g. 'Margin/t'), got {name!r}")
            metrics[name] = value
        return metrics

    def line(self, step: int, metrics: dict) -> str:
        parts = [f"step {step}/{self.total_steps} ({100.0 * step / self.total_steps:.1f}%)", f"epoch {metrics['epoch']}"]
        parts += [f"{name} {value:.4f}" for name, value in metrics.items() if _is_loss(name)]
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
