#!/usr/bin/env python
"""Train an ArcFace face-recognition model.

    torchrun --nproc_per_node=8 train.py configs/ms1mv3_r50 [--key=value ...]
    python train.py configs/demo.py                       # one process

Reads top to bottom as the algorithm: configuration, distributed set-up, the checks that
can refuse the run (margin loss, tracking, distillation teacher, data), data, model,
distillation term and margin-softmax head, optimizer and schedule, resume, the training
loop (training.step.TrainStep, logging, evaluation, checkpoints), then the final weights
and the ONNX export. The run's state and the checkpoint schema live in training.state, the
step in training.step, the non-finite guard and the SIGTERM stop request in
training.guard, the progress line in training.progress; utils.tracking's Tracker owns
TensorBoard and wandb.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
from dataclasses import dataclass

import numpy as np
import torch

from training.errors import TrainingInputError
from utils import checkpoint as ckpt
from utils import run_identity
from utils.amp import Precision, resolve_precision
from utils.config import Config, ConfigError, format_config, load_config, save_config
from utils.distributed import DeviceError, DistContext, any_rank, cleanup_distributed, first_error, init_distributed, wrap_ddp
from utils.errors import EXIT_USER_ERROR, UserError
from utils.log import SpeedMeter, add_file_handler, setup_logging


def parse_args(argv: list[str]) -> tuple[str, list[str]]:
    parser = argparse.ArgumentParser(
        description="Train an ArcFace model. Any config key can be overridden with --key=value.",
        usage="train.py CONFIG [--key=value ...]",
    )
    parser.add_argument("config", help="configs/ms1mv3_r50, configs/ms1mv3_r50.py or a path to a config module")
    args, overrides = parser.parse_known_args(argv)
    return args.config, overrides


def main(argv: list[str] | None = None) -> int:
    from utils.host_memory import enable_huge_pages

    enable_huge_pages()  # before the first large tensor: the allocator reads it once
    config_path, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(config_path, overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR

    try:
        ctx = init_distributed(timeout_minutes=cfg.dist_timeout_minutes, device=cfg.device)
    except DeviceError as exc:
        print(f"error (local rank {os.environ.get('LOCAL_RANK', 0)}): {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        return train(cfg, ctx)
    except UserError as exc:
        print(f"error{f' (rank {ctx.rank})' if ctx.world_size > 1 else ''}: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    finally:
        cleanup_distributed()


class _Warnings:
    """Takes a logger's warnings before the log file exists, to log them once it does."""

    def __init__(self):
        self.messages: list[str] = []

    def warning(self, message: str, *args) -> None:
        self.messages.append(message % args if args else message)


def train(cfg: Config, ctx: DistContext) -> int:
    from utils.tracking import Tracker

    identity = run_identity.of_this_launch(cfg, ctx)
    # An elastic restart of this job (on any node, whatever its local restart count) continues its own run.
    resume = bool(cfg.resume) or run_identity.continues_this_run(cfg.output, identity, ctx)
    logger = setup_logging(ctx.rank)  # console only until every check has passed

    # ---- phase 1: everything that can refuse the run, before anything is written or changed
    early_warnings = _Warnings()  # logged once the log file exists
    checked = _check_run(cfg, ctx, resume, early_warnings)
    _seed_everything(cfg.seed + ctx.rank)
    loader = _build_loader(cfg, ctx, checked.num_classes)
    # model: backbone (data parallel), distillation term, PartialFC head (model parallel), optimizer, schedule
    state, distill = _build_run_state(cfg, ctx, checked)
    notes, skipped_sets, resumed_set = _resume_or_initialise(cfg, ctx, state, resume)

    # ---- phase 2: the run is accepted; create the output folder, the log and the tracker
    _open_output(cfg, ctx, logger, state, checked.precision, notes, early_warnings, skipped_sets, resumed_set, identity)
    tracker = Tracker.create(cfg, ctx, cfg.output, logger, start_step=state.position.global_step)
    try:
        tracker.log_config(cfg)
        _run(cfg, ctx, logger, loader, state, distill, checked.precision, tracker)
    except BaseException:
        tracker.close(exit_code=1)
        raise
    tracker.close()
    return 0


def _run(cfg, ctx, logger, loader, state, distill, precision: Precision, tracker) -> None:
    """Train (from the start or the resumed position), evaluate, and save the final weights."""
    from training.guard import NonFiniteGuard
    from training.progress import ProgressReport, TrackerSink
    from training.step import TrainStep
    from utils.torch_compile import compile_module

    model = compile_module(state.backbone) if cfg.compile else state.backbone
    if ctx.is_distributed:
        # DDP broadcasts rank 0's weights now, so only rank 0 needs to load them on resume.
        model = wrap_ddp(model, ctx)
    verification = _verification(cfg, ctx, logger, precision)
    evaluate = _tracked(verification, tracker)
    guard = NonFiniteGuard(cfg.max_nonfinite_steps, ctx.device, state.backbone.buffers())
    step = TrainStep(
        model, state.backbone, state.head, state.optimizer, guard=guard, scheduler=state.scheduler,
        autocast_dtype=precision.autocast_dtype, scaler=state.scaler, gradient_acc=cfg.gradient_acc,
        clip_grad_norm=cfg.clip_grad_norm, aux_losses=state.aux_losses,
        channels_last=_channels_last(cfg, state.backbone), distributed=ctx.is_distributed,
    )
    first_eval = last_eval = None
    last_eval_step = -1
    if cfg.eval_at_start and state.position.global_step == 0:
        first_eval = evaluate(0, state.backbone)
        last_eval_step = 0

    # After the first evaluation, so that the first line's samples/s and the ETA are the training's.
    meter = SpeedMeter(cfg.batch_size * ctx.world_size * cfg.gradient_acc, state.total_steps,
                       start_step=state.position.global_step)
    progress = ProgressReport(logger, meter, state.total_steps, [TrackerSink(tracker)])

    # ---- the training loop
    stopped, evaluated = _train_loop(cfg, ctx, loader, state, step, progress, evaluate, tracker, logger)
    if evaluated is not None:
        last_eval_step, last_eval = evaluated
    global_step = state.position.global_step
    if stopped:
        logger.info("stopped by SIGTERM at step %d; the checkpoint above continues the run (--resume=True)", global_step)
        return

    # ---- final evaluation (the student, and once the frozen teacher), weights and ONNX
    if last_eval_step != global_step:
        last_eval = evaluate(global_step, state.backbone)
    teacher_eval = _evaluate_teacher(verification, distill, tracker, global_step)
    model_path = _export(cfg, ctx, state.backbone, logger)
    if ctx.is_main:
        tracker.save_model(model_path, final=True)
        _log_summary(logger, first_eval, last_eval, global_step, teacher_eval, cfg.teacher_network)
    ctx.barrier()


def _train_loop(cfg, ctx, loader, state, step, progress, evaluate, tracker, logger):
    """Train until the run's last step or an agreed SIGTERM, logging, evaluating and saving
    on the way. Returns (stopped by SIGTERM, (step, result) of the last evaluation or None)."""
    from training.guard import StopRequest

    stop = StopRequest().install()
    batches_per_epoch = state.plan.steps_per_epoch * cfg.gradient_acc  # whole optimizer steps only
    stopped, evaluated, first_batch = False, None, True
    state.backbone.train()
    state.head.train()
    try:
        for epoch in range(state.position.epoch, cfg.num_epoch):
            if state.finished or stopped:
                break
            loader.set_epoch(epoch, start_batch=state.begin_epoch(epoch))
            for images, labels in loader:
                if state.position.batch_in_epoch >= batches_per_epoch:
                    break
                if first_batch:  # what the network sees after augmentation, once per process
                    tracker.log_images("Train/First Batch", images, state.position.global_step)
                    first_batch = False
                state.count_batch()
                if not step(images, labels):
                    continue  # gradients accumulate until the step's last batch

                epoch_done = state.count_step(batches_per_epoch)  # the position moves to the next epoch
                global_step, finished = state.position.global_step, state.finished
                if global_step % cfg.frequent == 0 or finished:
                    _log_step(progress, step, state, global_step, epoch)
                if stop.agreed(ctx):
                    stopped = True
                if global_step % cfg.verbose == 0 and not finished:
                    evaluated = (global_step, evaluate(global_step, state.backbone))
                    state.backbone.train()
                at_interval = cfg.save_every_steps > 0 and global_step % cfg.save_every_steps == 0
                if at_interval or epoch_done or finished or stopped:
                    # The position saved is where the next run continues: the next batch of this
                    # epoch, or the start of the next epoch.
                    model_path = _save_checkpoint(cfg, ctx, state, step.guard, logger)
                    if model_path is not None and epoch_done:
                        tracker.save_model(model_path, epoch=epoch)
                if finished or stopped:
                    break
    finally:
        stop.restore()
    return stopped, evaluated


def _log_step(progress, step, state, global_step: int, epoch: int) -> None:
    """A logging step on every rank: the means since the last one, the last step's loss, the
    margin's state, to the log line and the tracker. Reads the device: logging steps only."""
    from training.progress import margin_figures

    losses = step.take_losses()
    step.guard.check(global_step)
    metrics = progress.metrics(
        global_step, epoch=epoch, losses=losses, lr=step.last_lr, scaler=state.scaler,
        skipped_nonfinite=step.guard.skipped_total, step_loss=float(step.last_loss),
        figures=margin_figures(state.head),
    )
    progress.publish(global_step, metrics)


# ---- helpers of train(), in the order they are used -------------------------------------

@dataclass
class _Checked:
    """What the checks of phase 1 found out or loaded."""

    precision: Precision
    num_classes: int
    plan: object  # training.state.StepPlan
    margin: torch.nn.Module  # the margin of the loss the config asks for (losses.build_margin)
    teacher: object  # losses.distillation.Teacher (on the CPU), or None without distillation


def _check_run(cfg: Config, ctx: DistContext, resume: bool, warnings: "_Warnings") -> _Checked:
    """Everything that can refuse the run, as a one-line UserError naming what to change;
    nothing is written (the teacher file is read)."""
    from backbones import available_models
    from losses import build_margin
    from losses.distillation import check_distillation
    from training.state import plan_run
    from utils.tracking import Tracker

    _check_output_folder(cfg.output, ctx)
    if not resume and ckpt.has_checkpoints(cfg.output):
        raise TrainingInputError(
            f"output folder {cfg.output} already holds checkpoints of a run; pass --resume=True to "
            f"continue it, or choose another --output"
        )
    if cfg.network not in available_models():
        raise TrainingInputError(
            f"unknown network {cfg.network!r}; valid networks: {', '.join(available_models())}"
        )
    try:
        precision = resolve_precision(cfg.precision, cfg.fp16, ctx.device)
    except ValueError as exc:
        raise TrainingInputError(str(exc)) from None
    margin = build_margin(cfg, where=cfg.config_file)
    Tracker.check(cfg)  # e.g. using_wandb without the wandb package
    teacher = check_distillation(cfg, warn=warnings.warning, where=cfg.config_file)
    _prepare_synthetic_faces(cfg, ctx)
    num_classes, num_image = _check_dataset(cfg)
    plan = plan_run(
        num_image, cfg.batch_size * ctx.world_size, cfg.num_epoch, cfg.warmup_epoch, cfg.gradient_acc, cfg.max_steps
    )
    return _Checked(precision, num_classes, plan, margin, teacher)


def _check_output_folder(output: str, ctx: DistContext) -> None:
    """The output folder must be creatable and writable (checked without leaving anything behind)."""
    if not ctx.is_main:
        return
    existing = output
    while existing and not os.path.exists(existing):
        existing = os.path.dirname(existing) or "."
    if os.path.exists(output) and not os.path.isdir(output):
        raise TrainingInputError(f"output {output} exists and is not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing or "."):
            pass
    except OSError as exc:
        raise TrainingInputError(f"output folder {output} is not writable: {exc.strerror or exc}") from None


def _prepare_synthetic_faces(cfg: Config, ctx: DistContext) -> None:
    """Generate the embedded synthetic-faces data set into `rec` if the config asks for it."""
    if not cfg.synthetic_faces:
        return
    if ctx.is_main:
        from dataset.synthetic_faces import materialize

        materialize(cfg.rec, **cfg.synthetic_faces)
    ctx.barrier()


def _check_dataset(cfg: Config) -> tuple[int, int]:
    """num_classes / num_image from the data set, checked against the config."""
    from dataset import inspect_dataset

    if cfg.rec == "synthetic":
        if cfg.num_classes is None or cfg.num_image is None:
            raise TrainingInputError("rec='synthetic' (random tensors) needs num_classes and num_image in the config")
        return cfg.num_classes, cfg.num_image
    info = inspect_dataset(cfg.rec)
    num_classes = cfg.num_classes if cfg.num_classes is not None else info.num_classes
    num_image = cfg.num_image if cfg.num_image is not None else info.num_images
    if info.num_classes is not None and num_classes < info.num_classes:
        raise TrainingInputError(
            f"num_classes={num_classes} in the config but the data set {cfg.rec} has {info.num_classes} classes"
        )
    if info.num_classes is not None and num_classes != info.num_classes:
        raise TrainingInputError(
            f"num_classes={num_classes} in the config disagrees with the data set {cfg.rec} ({info.num_classes} classes)"
        )
    if info.num_images is not None and num_image != info.num_images:
        raise TrainingInputError(
            f"num_image={num_image} in the config disagrees with the data set {cfg.rec} ({info.num_images} images)"
        )
    return num_classes, num_image


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _build_loader(cfg: Config, ctx: DistContext, num_classes: int):
    from dataset import get_dataloader

    return get_dataloader(
        cfg.rec, ctx.local_rank, cfg.batch_size, dali=cfg.dali, seed=cfg.seed, num_workers=cfg.num_workers,
        rank=ctx.rank, world_size=ctx.world_size, device=ctx.device, num_classes=num_classes,
        skip_bad_images=cfg.skip_bad_images,
    )


def _channels_last(cfg: Config, backbone) -> bool:
    """NHWC when the config allows it and the backbone is one that gains from it (the convolutional ones)."""
    return bool(cfg.channels_last and getattr(backbone, "prefers_channels_last", False))


def _build_run_state(cfg: Config, ctx: DistContext, checked: _Checked):
    """Backbone, distillation term (or None), PartialFC head, optimizer, lr schedule and
    GradScaler of a run at its first step: (RunState, distillation term or None)."""
    from backbones import get_model
    from losses import PartialFC
    from losses.distillation import build_distillation
    from losses.optim import build_optimizer
    from training.state import RunInfo, RunState
    from training.step import trainable_parameters
    from utils.lr_scheduler import PolyScheduler

    device, precision, plan = ctx.device, checked.precision, checked.plan
    if device.type == "cuda":
        # insightface's setting: cuDNN times its convolution algorithms once per input shape and
        # keeps the fastest (the shapes never change in training).
        torch.backends.cudnn.benchmark = bool(cfg.cudnn_benchmark)
    backbone = get_model(
        cfg.network, dropout=cfg.dropout, fp16=False, num_features=cfg.embedding_size,
        **({} if cfg.gradient_checkpointing is None else {"gradient_checkpointing": cfg.gradient_checkpointing}),
    ).to(device)
    memory_format = torch.channels_last if _channels_last(cfg, backbone) else torch.contiguous_format
    backbone = backbone.to(memory_format=memory_format)
    # The teacher takes the student's batch (its memory format) under the run's autocast.
    distill = None if checked.teacher is None else build_distillation(
        cfg, device, memory_format, cfg.embedding_size, teacher=checked.teacher,
        autocast_dtype=precision.autocast_dtype, rank=ctx.rank, world_size=ctx.world_size,
    )
    aux_losses = [distill] if distill is not None else []
    head = PartialFC(
        checked.margin, cfg.embedding_size, checked.num_classes, cfg.sample_rate, num_subcenters=cfg.num_subcenters,
        matmul_dtype=precision.autocast_dtype, logits_chunk_rows=cfg.logits_chunk_rows,
        rank=ctx.rank, world_size=ctx.world_size,
        # On CUDA the per-step label check would stall the host; the data set checks labels there.
        check_labels=device.type != "cuda",
    ).to(device)
    optimizer = build_optimizer(
        cfg.optimizer, trainable_parameters(backbone, aux_losses), head.parameters(),
        lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, device_type=device.type,
        fc_state_dtype=cfg.fc_state_dtype, seed=cfg.seed,  # the seed of the stochastic rounding
    )
    scheduler = PolyScheduler(optimizer, cfg.lr, plan.schedule_steps, plan.warmup_steps)
    scaler = torch.amp.GradScaler(device.type) if precision.use_grad_scaler else None
    info = RunInfo(
        network=cfg.network, embedding_size=cfg.embedding_size, num_classes=checked.num_classes,
        global_batch_size=cfg.batch_size * ctx.world_size, gradient_acc=cfg.gradient_acc,
        total_steps=plan.schedule_steps,
    )
    state = RunState(backbone, head, optimizer, scheduler, scaler, info=info, plan=plan,
                     rank=ctx.rank, world_size=ctx.world_size, device=device, aux_losses=aux_losses)
    return state, distill


class _LoadIntoState:
    """load_newest's check: loads a set's state into the run as part of reading it, so that a
    readable but unusable rank file (a tensor of the wrong shape, a missing key) on any one
    rank is voted on like a corrupt one, and every rank falls back to the same older set.

    A refusal of the run's settings (another network, loss or teacher than the checkpoint's)
    is not a reason to fall back: it is kept and voted on after the sets are read, so every
    rank refuses the run with the same line. A failed load leaves a partly loaded state; the
    set loaded next (or the refusal) replaces all of it.
    """

    def __init__(self, state):
        self.state = state
        self.point = None
        self.refusal: str | None = None

    def __call__(self, checkpoint: dict, cset) -> None:
        self.refusal = None  # only the set that is kept counts
        try:
            self.point = self.state.load_state_dict(checkpoint, source=str(cset.path))
        except (TrainingInputError, ConfigError) as exc:  # this run's settings do not fit the checkpoint
            self.refusal = str(exc)


def _resume_or_initialise(cfg: Config, ctx: DistContext, state, resume: bool):
    """Continue from the newest readable checkpoint set, or start from the pretrained weights.

    Returns (notes for the log, unreadable sets skipped, the set resumed from or None).
    """
    from losses.reshard import load_for_rank  # re-shards a set saved by another world size
    from training.state import load_pretrained

    notes: list[str] = []
    skipped_sets = _Warnings()  # sets that could not be read, logged once the log file exists
    resumed_set = None
    if resume:
        loaded = _LoadIntoState(state)
        checkpoint, cset = ckpt.load_newest(
            cfg.output, ctx, skipped_sets, map_location="cpu", loader=load_for_rank, check=loaded
        )
        refusal = first_error(loaded.refusal, ctx)
        if refusal is not None:  # a user error on any rank stops every rank with the same line
            raise TrainingInputError(refusal)
        if checkpoint is None and ckpt.candidate_sets(cfg.output):
            # Starting anew here would later prune the unreadable sets as "older": refuse instead.
            raise TrainingInputError(
                f"none of the checkpoints in {cfg.output} can be read ({'; '.join(skipped_sets.messages) or 'see rank 0'}); "
                f"move them away to start a new run there"
            )
        if checkpoint is None:
            notes.append(f"resume requested but {cfg.output} holds no complete checkpoint: starting from scratch")
        else:
            notes.extend(loaded.point.notes(str(cset.path)))
            resumed_set = cset
            del checkpoint  # free the memory
    if resumed_set is None:
        notes.extend(load_pretrained(
            state.backbone, state.head, backbone_path=cfg.pretrained, head_path=cfg.pretrained_fc, network=cfg.network
        ))
    return notes, skipped_sets, resumed_set


def _open_output(cfg: Config, ctx: DistContext, logger, state, precision: Precision, notes, warnings, skipped_sets,
                 resumed_set, identity) -> None:
    """Create the output folder; rank 0 writes training.log and config.json (never the wandb key)."""
    from utils.tracking import public_config

    if ctx.is_main:
        os.makedirs(cfg.output, exist_ok=True)
    ctx.barrier()
    if not ctx.is_main:
        return
    add_file_handler(logger, os.path.join(cfg.output, "training.log"))
    shown = Config(public_config(cfg))
    save_config(shown, os.path.join(cfg.output, "config.json"))
    run_identity.record(cfg.output, identity)
    logger.info("config %s\n%s", cfg.config_file, format_config(shown))
    logger.info(
        "world size %d (%s, %s) | global batch %d | %d steps per epoch | total_step %d | warmup_step %d | precision %s",
        ctx.world_size, ctx.backend or "single process", ctx.device, cfg.batch_size * ctx.world_size * cfg.gradient_acc,
        state.plan.steps_per_epoch, state.total_steps, state.plan.warmup_steps, precision.name,
    )
    logger.info("head (rank 0's shard): PartialFC(%s) with %s", state.head.extra_repr(), state.head.margin_loss)
    for term in state.aux_losses:
        logger.info("auxiliary loss term %s: %s", term.name, term.extra_repr())
    for note in notes:
        logger.info(note)
    for message in warnings.messages + skipped_sets.messages:
        logger.warning(message)
    if resumed_set is not None:
        for path in ckpt.set_aside_newer(cfg.output, resumed_set.step):
            logger.warning("unreadable checkpoint set renamed to %s", path)


def _verification(cfg: Config, ctx: DistContext, logger, precision: Precision):
    """The in-training evaluation on `val_targets` (the .bin sets next to the training data)."""
    from eval.eval_callback import VerificationCallback

    val_targets = list(cfg.val_targets)
    if cfg.rec == "synthetic" and val_targets:
        logger.warning("rec='synthetic' (random tensors) has no verification sets: val_targets %s ignored", val_targets)
        val_targets = []
    rec_dir = cfg.rec if os.path.isdir(cfg.rec) else os.path.dirname(os.path.abspath(cfg.rec))
    return VerificationCallback(
        val_targets, rec_dir, ctx, batch_size=min(cfg.batch_size, 256), logger=logger,
        amp_dtype=precision.autocast_dtype,
    )


def _tracked(verification, tracker):
    """The verification callback whose results also go to the tracker (every rank calls it)."""

    def evaluate(step: int, backbone) -> dict:
        results = verification(step, backbone)
        for name, r in results.items():
            tracker.log_eval(step, name, r["acc"], r["acc_best"], {"std": r["std"], "xnorm": r["xnorm"]})
        return results

    return evaluate


def _evaluate_teacher(verification, distill, tracker, step: int) -> dict | None:
    """The frozen teacher's accuracy on the verification sets (once: it never changes)."""
    if distill is None or not verification.sets:
        return None
    results = verification.evaluate(distill.teacher)
    for name, r in results.items():
        tracker.log_eval(step, f"{name} teacher", r["acc"], r["acc"], {"std": r["std"], "xnorm": r["xnorm"]})
    return results


def _save_checkpoint(cfg: Config, ctx: DistContext, state, guard, logger) -> str:
    """Save the run's state as a checkpoint set with rank 0's model.pt (the student alone),
    collective and voted on; returns model.pt's path.

    Also after a skipped (non-finite) step: the guard kept the weights and optimizer state
    unchanged and check() has put back the BatchNorm statistics, so the state at this
    position is the last good one -- exactly what an uninterrupted run continues from,
    since it too moves on past the skipped batch.
    """
    step = state.position.global_step
    if any_rank(guard.check(step), ctx) and ctx.is_main:
        logger.warning("step %d was skipped (non-finite loss or gradient): the checkpoint holds the weights before it", step)
    run_state = state.state_dict()
    path = ckpt.save_set(
        cfg.output, step, run_state, ctx, keep=cfg.keep_checkpoints, mirror_top_level=cfg.save_all_states,
        main_files={"model.pt": run_state["state_dict_backbone"]} if ctx.is_main else None, logger=logger,
    )
    if ctx.is_main:
        logger.info("checkpoint saved: %s", path)
    return os.path.join(cfg.output, "model.pt")


def _export(cfg: Config, ctx: DistContext, backbone, logger) -> str:
    """model.pt (the plain backbone state_dict) and model.onnx, collective and voted on;
    returns model.pt's path."""
    from eval.onnx_export import export_onnx

    final_files = ckpt.save_final(
        cfg.output, ctx, {"model.pt": backbone.state_dict()},
        exports={"model.onnx": lambda path: export_onnx(backbone, path)},
    )
    if ctx.is_main:
        logger.info("saved %s", " and ".join(map(str, final_files)))
    return os.path.join(cfg.output, "model.pt")


def _log_summary(logger, first_eval, last_eval, step, teacher_eval=None, teacher_network=None) -> None:
    """One line per verification set: before / after training, the best, and the teacher's."""
    if not last_eval:
        return
    for name, result in last_eval.items():
        before = first_eval.get(name) if first_eval else None
        line = f"[{name}] verification accuracy "
        if before is not None:
            line += f"before training {100 * before['acc']:.2f}%, "
        line += f"after {step} steps {100 * result['acc']:.2f}% (best {100 * result['acc_best']:.2f}%)"
        teacher = (teacher_eval or {}).get(name)
        if teacher is not None:
            gap = 100 * (result["acc"] - teacher["acc"])
            line += f"; teacher ({teacher_network}) {100 * teacher['acc']:.2f}% (student {gap:+.2f} points)"
        logger.info(line)


if __name__ == "__main__":
    sys.exit(main())
