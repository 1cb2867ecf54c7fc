"""Experiment tracking: TensorBoard always (rank 0), Weights & Biases when `using_wandb`.

The training script talks to one `Tracker` and never to TensorBoard or wandb itself:

    Tracker.check(cfg)                      # "can refuse the run" phase: nothing written yet
    tracker = Tracker.create(cfg, ctx, cfg.output, logger, start_step=global_step)
    tracker.log_config(cfg)
    tracker.log_images("Train/First Batch", images, step)    # once, the first batch
    tracker.log_train(step, {"loss": ..., "step_loss": ..., "lr": ..., ...}, epoch)  # at `frequent` steps
    tracker.log_eval(step, "lfw", accuracy, best_accuracy, {"std": ..., "xnorm": ...})
    tracker.save_model(model_path, epoch=epoch)   /   tracker.save_model(model_path, final=True)
    tracker.close()

Every method may be called on every rank: what a rank has no sink for is a no-op
(TensorBoard lives on rank 0; wandb on rank 0, or on every rank with `wandb_log_all`).
Values are host floats: the caller reads them at log steps only, so other steps never
wait for the device.

Metric names are insightface's (`Loss/Step Loss`, `Loss/Train Loss`, `Process/Step`,
`Process/Epoch`, `Acc/val-Acc2 <set>`) so existing wandb dashboards keep working, plus
the learning rate, samples/s, the fp16 grad scale and the best accuracy per set.
TensorBoard receives exactly the same names and values.

wandb runs are logged with `step=global_step` and `sync_tensorboard=False`, unlike
insightface's `sync_tensorboard=True`. With wandb 0.31 syncing TensorBoard and calling
`wandb.log` together records every metric twice on two different x-axes: the synced
TensorBoard rows get their own `_step` after the explicit ones, and the `step=` of
`wandb.log` is ignored while syncing is on. Syncing alone cannot serve `wandb_log_all`
(only rank 0 writes TensorBoard) and only reads the event files when the run finishes.
Logging both sinks from the same dict gives the same scalars in each, once.

Offline (WANDB_MODE=offline) nothing leaves the machine; the run, its media and staged
artifacts are files under <output>/wandb for `wandb sync` to upload later.

Tracking never stops training: a missing wandb package is refused by `check()` before
anything is written, but a failing login, an unreachable server or an error while
logging is a warning, after which wandb is dropped and TensorBoard keeps everything.
"""
from __future__ import annotations

import datetime
import importlib
import json
import logging
import math
import os
import re
from typing import Any, Mapping

import torch

from utils.atomic_file import atomic_write
from utils.distributed import DistContext
from utils.errors import UserError

# insightface's metric names (its train.py and utils_callbacks.py), then this project's.
TRAIN_METRIC_NAMES = {
    "step_loss": "Loss/Step Loss",  # the loss of the step that is logged
    "loss": "Loss/Train Loss",  # the mean loss since the previous log line
    "lr": "Process/Learning Rate",
    "samples_per_sec": "Process/Samples per Second",  # over all ranks
    "grad_scale": "Process/Grad Scale",  # fp16 GradScaler only
}
STEP_NAME, EPOCH_NAME = "Process/Step", "Process/Epoch"
EXTRA_PREFIX = "Train/"  # other terms passed to log_train without a "/" (e.g. "distill")


def eval_metric_name(set_name: str, key: str) -> str:
    """`Acc/val-Acc2 lfw` is insightface's name for the flip accuracy it logs per set."""
    names = {"accuracy": "Acc2", "best_accuracy": "Highest", "std": "Std2", "xnorm": "XNorm"}
    return f"Acc/val-{names.get(key, key)} {set_name}"


RUN_ID_FILE = "wandb_run_id.json"  # rank 0's run; other ranks (wandb_log_all) add _gpu{rank}
WANDB_KEY_PLACEHOLDER = "X" * 40  # configs/base.py (as insightface's): "no key given"
SECRET_KEYS = ("wandb_key",)  # never put into a run's config, TensorBoard or a log


class TrackingError(UserError, RuntimeError):
    """The config asks for tracking this installation cannot do (e.g. wandb is not installed)."""


def public_config(cfg: Mapping[str, Any]) -> dict:
    """The config without secrets (the wandb API key), as it is shown in a run or a log."""
    return {k: v for k, v in cfg.items() if k not in SECRET_KEYS}


def api_key(cfg: Mapping[str, Any]) -> str | None:
    """`wandb_key` when one is given; None for the placeholder, so that WANDB_API_KEY or
    `wandb login`'s stored key apply."""
    key = (cfg.get("wandb_key") or "").strip()
    if not key or set(key) == {"X"}:
        return None
    return key


def run_name(cfg: Mapping[str, Any], rank: int, now: datetime.datetime | None = None) -> str:
    """insightface's run name: `%y%m%d_%H%M_GPU{rank}` plus `_{suffix_run_name}`."""
    name = (now or datetime.datetime.now()).strftime("%y%m%d_%H%M") + f"_GPU{rank}"
    suffix = cfg.get("suffix_run_name")
    return f"{name}_{suffix}" if suffix else name


def run_id_path(output_dir: str, rank: int) -> str:
    return os.path.join(output_dir, RUN_ID_FILE if rank == 0 else f"wandb_run_id_gpu{rank}.json")


def image_grid(images: torch.Tensor, max_images: int = 32, columns: int = 8, padding: int = 2) -> torch.Tensor:
    """The first `max_images` of an N x 3 x H x W batch as one 3 x H' x W' uint8 picture.

    uint8 batches are shown as they are; float batches are the training input,
    (x / 255 - 0.5) / 0.5, and are mapped back with x * 0.5 + 0.5. Hand-written because
    torchvision (make_grid) is not a dependency of this project; a dozen lines.
    """
    x = images[:max_images].detach().to("cpu").contiguous()
    if x.dtype != torch.uint8:
        x = (x.float() * 0.5 + 0.5).clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)
    n, c, h, w = x.shape
    cols = max(1, min(columns, n))
    rows = math.ceil(n / cols)
    grid = torch.zeros((c, rows * (h + padding) + padding, cols * (w + padding) + padding), dtype=torch.uint8)
    for i in range(n):
        top = padding + (i // cols) * (h + padding)
        left = padding + (i % cols) * (w + padding)
        grid[:, top:top + h, left:left + w] = x[i]
    return grid


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


def _config_markdown(cfg: Mapping[str, Any]) -> str:
    # Indented lines are a code block in TensorBoard's markdown: one key per line, aligned.
    items = public_config(cfg)
    width = max((len(k) for k in items), default=0)
    return "\n".join(f"    {k.ljust(width)} = {items[k]!r}" for k in sorted(items))


class Tracker:
    """One run's metrics, config, first-batch picture and model artifacts, to TensorBoard
    and (optionally) wandb. Create it with `Tracker.create`."""

    def __init__(self, ctx: DistContext, output_dir: str, logger: logging.Logger, writer=None, run=None,
                 name: str | None = None, save_artifacts: bool = False):
        self.ctx = ctx
        self.output_dir = output_dir
        self.logger = logger
        self.writer = writer  # torch SummaryWriter or None
        self.run = run  # wandb Run or None
        self.run_name = name
        self.save_artifacts = save_artifacts
        self._closed = False

    # ---- set-up ---------------------------------------------------------------------

    @staticmethod
    def check(cfg: Mapping[str, Any]) -> None:
        """Refuse a config whose tracking cannot work here; writes nothing.

        Called in the phase where the training script may still refuse the run, on
        every rank (they share the installation, so all refuse with the same message).
        """
        if not cfg.get("using_wandb"):
            return
        try:
            importlib.import_module("wandb")
        except ImportError as exc:
            raise TrackingError(
                f"using_wandb=True needs the wandb package, which cannot be imported ({exc}): "
                "pip install -r requirements.txt (it pins wandb), or set using_wandb=False"
            ) from None
        if not str(cfg.get("wandb_project") or "").strip():
            raise TrackingError("using_wandb=True needs a wandb_project name, got an empty one")

    @classmethod
    def create(cls, cfg: Mapping[str, Any], ctx: DistContext, output_dir: str, logger: logging.Logger | None = None,
               start_step: int = 0) -> "Tracker":
        """TensorBoard on rank 0 in `<output_dir>/tensorboard`, and a wandb run where the
        config asks for one. `output_dir` must exist. `start_step` is the step a resumed
        run continues from: TensorBoard hides the events the interrupted run wrote after it."""
        logger = logger or logging.getLogger("arcface")
        writer = None
        if ctx.is_main:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(
                log_dir=os.path.join(output_dir, "tensorboard"), purge_step=start_step if start_step > 0 else None
            )
        tracker = cls(ctx, output_dir, logger, writer=writer, save_artifacts=bool(cfg.get("save_artifacts")))
        wants_run = cfg.get("using_wandb") and (ctx.is_main or cfg.get("wandb_log_all"))
        if wants_run:
            tracker.run, tracker.run_name = _start_wandb_run(cfg, ctx, output_dir, logger)
        elif cfg.get("save_artifacts") and not cfg.get("using_wandb") and ctx.is_main:
            logger.warning("save_artifacts=True has no effect without using_wandb=True")
        return tracker

    # ---- logging --------------------------------------------------------------------

    def log_config(self, cfg: Mapping[str, Any], step: int = 0) -> None:
        """The effective config (without the API key): wandb's run config, TensorBoard text."""
        if self.writer is not None:
            self.writer.add_text("config", _config_markdown(cfg), step)
        if self.run is not None:
            config = json.loads(json.dumps(public_config(cfg), default=str))  # tuples -> lists, as config.json
            self._wandb("config update", lambda: self.run.config.update(config, allow_val_change=True))

    def log_train(self, step: int, metrics: Mapping[str, float], epoch: int) -> None:
        """A log step's figures: loss (interval mean), step_loss, lr, samples_per_sec,
        grad_scale and any extra terms (a name with "/" is kept, others go under Train/)."""
        row = {STEP_NAME: step, EPOCH_NAME: epoch}
        for key, value in metrics.items():
            if value is None:
                continue
            name = TRAIN_METRIC_NAMES.get(key) or (key if "/" in key else EXTRA_PREFIX + key)
            row[name] = float(value)
        self._log_scalars(row, step)

    def log_eval(self, step: int, name: str, accuracy: float, best_accuracy: float,
                 extra: Mapping[str, float] | None = None) -> None:
        """One verification set's result: accuracy (image + flip), the best so far, and
        e.g. its std over the folds and XNorm."""
        row = {eval_metric_name(name, "accuracy"): float(accuracy),
               eval_metric_name(name, "best_accuracy"): float(best_accuracy)}
        for key, value in (extra or {}).items():
            row[eval_metric_name(name, key)] = float(value)
        self._log_scalars(row, step)

    def log_images(self, tag: str, images: torch.Tensor, step: int) -> None:
        """A grid of a batch as the network sees it (after augmentation). Call it once:
        it copies the images to the host."""
        if self.writer is None and self.run is None:
            return
        grid = image_grid(images)
        if self.writer is not None:
            self.writer.add_image(tag, grid, step, dataformats="CHW")
        if self.run is not None:
            import wandb

            picture = grid.permute(1, 2, 0).numpy()
            self._wandb("image log", lambda: self.run.log({tag: wandb.Image(picture)}, step=step))

    def save_model(self, path: str, epoch: int | None = None, final: bool = False) -> None:
        """With save_artifacts: `path` (model.pt, written by rank 0) as the wandb model artifact
        `{run_name}_E{epoch}` after an epoch, `{run_name}_Final` at the end. wandb copies the
        file when it is added, so overwriting model.pt later does not change the artifact."""
        if not (self.save_artifacts and self.run is not None and self.ctx.is_main):
            return
        import wandb

        label = "Final" if final else f"E{epoch}"
        # Artifact names allow letters, digits, '-', '_' and '.'; a suffix_run_name may hold more.
        name = re.sub(r"[^\w.-]", "_", f"{self.run_name}_{label}")

        def upload():
            artifact = wandb.Artifact(name, type="model", metadata={"epoch": epoch, "final": final})
            artifact.add_file(path, name=os.path.basename(path))
            self.run.log_artifact(artifact)

        self._wandb("artifact upload", upload)

    def close(self, exit_code: int = 0) -> None:
        """Flush TensorBoard and finish the wandb run (exit_code != 0 marks it failed). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.writer is not None:
            self.writer.close()
        if self.run is not None:
            run, self.run = self.run, None
            try:
                run.finish(exit_code=exit_code)
            except Exception as exc:  # tracking never fails the run
                self.logger.warning(
                    "wandb could not finish the run (%s); `wandb sync` can upload what is on disk", _one_line(exc)
                )

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(exit_code=0 if exc_type is None else 1)

    # ---- internals ------------------------------------------------------------------

    def _log_scalars(self, row: Mapping[str, float], step: int) -> None:
        if self.writer is not None:
            for name, value in row.items():
                self.writer.add_scalar(name, value, step)
        if self.run is not None:
            self._wandb("log", lambda: self.run.log(dict(row), step=step))

    def _wandb(self, what: str, call) -> None:
        """Run a wandb call; on any error warn once and stop using wandb (training goes on)."""
        try:
            call()
        except Exception as exc:
            self.logger.warning(
                "wandb %s failed (%s): wandb logging stops for this run; TensorBoard in %s keeps every metric",
                what, _one_line(exc), os.path.join(self.output_dir, "tensorboard"),
            )
            self.run = None  # not finished here: a broken connection could block; wandb's exit hook does it


def _start_wandb_run(cfg: Mapping[str, Any], ctx: DistContext, output_dir: str, logger: logging.Logger):
    """(run, name), or (None, name) with a warning when wandb cannot start a run."""
    import wandb

    id_file = run_id_path(output_dir, ctx.rank)
    previous = _read_run_id(id_file, logger) if cfg.get("wandb_resume") else None
    name = previous["run_name"] if previous else run_name(cfg, ctx.rank)
    run_id = previous["run_id"] if previous else None  # None: wandb draws a new id
    _stage_artifacts_in(os.path.join(output_dir, "wandb"))
    key = api_key(cfg)
    try:
        run = wandb.init(
            entity=cfg.get("wandb_entity") or None,
            project=cfg.get("wandb_project"),
            name=name,
            notes=cfg.get("notes"),
            id=run_id,
            resume="allow" if cfg.get("wandb_resume") else None,
            dir=output_dir,  # the run's files go to <output>/wandb/
            sync_tensorboard=False,  # see the module docstring
            # The key goes to this run only; wandb.login(key=) would also write it to ~/.netrc.
            settings=wandb.Settings(api_key=key) if key else None,
        )
    except Exception as exc:  # login refused, server unreachable, bad WANDB_* setting
        logger.warning(
            "wandb could not start a run (%s): training continues without wandb; TensorBoard in %s keeps every metric",
            _one_line(exc), os.path.join(output_dir, "tensorboard"),
        )
        return None, name
    _write_run_id(id_file, {"run_id": run.id, "run_name": name, "entity": run.entity, "project": run.project})
    resumed = " (continued)" if previous else ""
    if run.offline:
        logger.info("wandb run %s%s (id %s) offline in %s; upload it later with: wandb sync %s",
                    name, resumed, run.id, run.dir, os.path.dirname(run.dir))
    else:
        logger.info("wandb run %s%s (id %s): %s", name, resumed, run.id, run.url)
    return run, name


_staging_dir_set_here: str | None = None


def _stage_artifacts_in(folder: str) -> None:
    """wandb copies an artifact's files into WANDB_DATA_DIR (default ~/.local/share/wandb) until
    they are uploaded. Unless the user chose that folder, use the run's own: an offline run
    synced from another machine then has its model files, and models do not fill a home quota.
    The only environment variable the tracker sets."""
    global _staging_dir_set_here
    current = os.environ.get("WANDB_DATA_DIR")
    if current is None or current == _staging_dir_set_here:
        os.environ["WANDB_DATA_DIR"] = _staging_dir_set_here = folder


def _read_run_id(path: str, logger: logging.Logger) -> dict | None:
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
        if isinstance(record.get("run_id"), str) and isinstance(record.get("run_name"), str):
            return record
        raise ValueError("run_id or run_name missing")
    except (OSError, ValueError) as exc:
        logger.warning("cannot read %s (%s): starting a new wandb run", path, _one_line(exc))
        return None


def _write_run_id(path: str, record: dict) -> None:
    with atomic_write(path) as f:
        f.write((json.dumps(record, indent=2) + "\n").encode())
