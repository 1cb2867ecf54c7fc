#!/usr/bin/env python
"""Train an ArcFace face-recognition model.

    torchrun --nproc_per_node=8 train.py configs/ms1mv3_r50 [--key=value ...]
    python train.py configs/demo.py                       # one process

Reads top to bottom as the algorithm: configuration, distributed set-up, data,
model and margin-softmax head, optimizer and schedule, resume, the training
loop (forward, loss, backward, optimizer step, logging, evaluation,
checkpoints), then the final weights and the ONNX export.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import signal
import sys
import tempfile

import numpy as np
import torch

from utils.config import ConfigError, Config, format_config, load_config, save_config
from utils.distributed import DeviceError, DistContext, any_rank, cleanup_distributed, init_distributed, wrap_ddp

# Errors caused by the user's input (config, data, checkpoints): one line, exit code 2.
EXIT_USER_ERROR = 2


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
    except _user_errors() as exc:
        print(f"error{f' (rank {ctx.rank})' if ctx.world_size > 1 else ''}: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    finally:
        cleanup_distributed(ctx)


def _user_errors() -> tuple[type[BaseException], ...]:
    from dataset import DataError
    from utils.checkpoint import CheckpointError

    return (ConfigError, CheckpointError, DataError, UserInputError)


class UserInputError(ValueError):
    """A problem with the run's input found by the training script itself."""


class _Warnings:
    """Takes a logger's warnings before the log file exists, to log them once it does."""

    def __init__(self):
        self.messages: list[str] = []

    def warning(self, message: str, *args) -> None:
        self.messages.append(message % args if args else message)


class _StopRequest:
    """SIGTERM (pre-emption) sets a flag; the loop checkpoints at the next agreed step and exits."""

    def __init__(self):
        self.requested = False
        self._previous = None
        self._pending = None  # (work, device flag, host copy, copy done) of the last step's vote

    def install(self) -> None:
        self._previous = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame) -> None:
        self.requested = True

    def agreed(self, ctx: DistContext) -> bool:
        """True on every rank, at the same step, once any rank was asked to stop.

        Collective, called after every optimizer step. The ranks' flags are combined by a
        non-blocking all_reduce whose result is read one step later: the host waits only
        for the previous step to finish (the current one is already queued), so the GPU
        never idles for this check, and every rank reads the same votes in the same order.
        """
        if not ctx.is_distributed:
            return self.requested
        if self._pending is not None:
            work, _, host, copied = self._pending
            work.wait()
            if copied is not None:
                copied.synchronize()
            self._pending = None
            if int(host.item()):
                return True  # no new vote: every rank returns here at the same step
        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32, device=ctx.device)
        work = torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, async_op=True)
        host, copied = flag, None
        if flag.is_cuda:
            work.wait()  # on CUDA: orders the copy after the all_reduce without blocking the host
            host = torch.empty(1, dtype=torch.int32, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
        self._pending = (work, flag, host, copied)
        return False


def train(cfg: Config, ctx: DistContext) -> int:
    # Imported here so that `--help` and config errors answer without loading the heavy modules.
    from backbones import available_models, get_model
    from dataset import get_dataloader, inspect_dataset
    from losses import CombinedMarginLoss, PartialFC
    from utils import checkpoint as ckpt
    from utils.amp import resolve_precision
    from eval.eval_callback import VerificationCallback
    from utils.log import SpeedMeter, add_file_handler, format_duration, setup_logging
    from utils.lr_scheduler import PolyScheduler, plan_steps
    from eval.onnx_export import export_onnx
    from losses.optim import build_optimizer
    from utils import run_identity

    device = ctx.device
    identity = run_identity.of_this_launch(cfg, ctx)
    # An elastic restart of this job (on any node) continues its own run.
    resume = bool(cfg.resume) or run_identity.continues_this_run(cfg.output, identity, ctx)
    logger = setup_logging(None, ctx.rank)  # console only until every check has passed
    notes: list[str] = []  # said once the log file exists

    # ---- phase 1: everything that can refuse the run, before anything is written or changed
    _check_output_folder(cfg.output, ctx)
    if not resume and ckpt.has_checkpoints(cfg.output):
        raise UserInputError(
            f"output folder {cfg.output} already holds checkpoints of a run; pass --resume=True to "
            f"continue it, or choose another --output"
        )
    if cfg.network not in available_models():
        raise UserInputError(
            f"unknown network {cfg.network!r}; valid networks: {', '.join(available_models())}"
        )
    try:
        precision = resolve_precision(cfg.precision, cfg.fp16, device)
    except ValueError as exc:
        raise UserInputError(str(exc)) from None
    _prepare_synthetic_faces(cfg, ctx)
    num_classes, num_image = _check_dataset(cfg, inspect_dataset)

    global_batch = cfg.batch_size * ctx.world_size
    try:
        steps_per_epoch, total_steps, warmup_steps = plan_steps(
            num_image, global_batch, cfg.num_epoch, cfg.warmup_epoch, cfg.gradient_acc
        )
    except ValueError as exc:
        raise UserInputError(str(exc)) from None
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
        warmup_steps = min(warmup_steps, total_steps - 1)
    # The lr schedule spans the planned steps; `schedule_step` is the data position in that
    # plan and `total_steps` the step count at which this run ends. They differ from
    # global_step only after a resume with another global batch size (see below).
    schedule_steps, schedule_step = total_steps, 0

    _seed_everything(cfg.seed + ctx.rank)

    # data
    loader = get_dataloader(
        cfg.rec, ctx.local_rank, cfg.batch_size, dali=cfg.dali, seed=cfg.seed, num_workers=cfg.num_workers,
        rank=ctx.rank, world_size=ctx.world_size, device=device, num_classes=num_classes,
        skip_bad_images=cfg.skip_bad_images,
    )

    # model: backbone (data parallel) and PartialFC head (model parallel)
    backbone = get_model(
        cfg.network, dropout=cfg.dropout, fp16=False, num_features=cfg.embedding_size,
        **({} if cfg.gradient_checkpointing is None else {"gradient_checkpointing": cfg.gradient_checkpointing}),
    ).to(device)
    use_channels_last = cfg.channels_last and not cfg.network.startswith("vit")
    if use_channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)

    margin = CombinedMarginLoss(
        cfg.margin_scale, *cfg.margin_list, interclass_filtering_threshold=cfg.interclass_filtering_threshold
    )
    partial_fc = PartialFC(
        margin, cfg.embedding_size, num_classes, cfg.sample_rate, matmul_dtype=precision.autocast_dtype,
        rank=ctx.rank, world_size=ctx.world_size,
        # On CUDA the per-step label check would stall the host; the data set checks labels there.
        check_labels=device.type != "cuda",
    ).to(device)

    # resume, or start from pretrained weights
    start_epoch, start_batch, global_step = 0, 0, 0
    resume_state = resumed_set = None
    skipped_sets = _Warnings()  # sets that could not be read, logged once the log file exists
    if resume:
        resume_state, cset = ckpt.load_newest(cfg.output, ctx, skipped_sets, map_location="cpu", loader=_resume_loader())
        if resume_state is None and ckpt.candidate_sets(cfg.output):
            # Starting anew here would later prune the unreadable sets as "older": refuse instead.
            raise UserInputError(
                f"none of the checkpoints in {cfg.output} can be read ({'; '.join(skipped_sets.messages) or 'see rank 0'}); "
                f"move them away to start a new run there"
            )
        if resume_state is None:
            notes.append(f"resume requested but {cfg.output} holds no complete checkpoint: starting from scratch")
        else:
            resumed_set = cset
            _check_compatible(resume_state, cfg, num_classes, cset)
            if "state_dict_backbone" in resume_state:
                backbone.load_state_dict(resume_state["state_dict_backbone"], strict=True)
            partial_fc.load_state_dict(resume_state["state_dict_softmax_fc"], strict=True)
            start_epoch = int(resume_state["epoch"])
            start_batch = int(resume_state.get("batch_in_epoch", 0))
            global_step = int(resume_state["global_step"])
            notes.append(f"resumed from {cset.path}: epoch {start_epoch}, batch {start_batch}, global step {global_step}")
            start_epoch, start_batch = _continue_position(
                resume_state, cfg, ctx, start_epoch, start_batch, global_batch, steps_per_epoch, notes
            )
            # global_step keeps counting the steps taken, so checkpoint names never go backwards;
            # the schedule continues from the position in this run's plan.
            schedule_step = start_epoch * steps_per_epoch + start_batch // cfg.gradient_acc
            total_steps = global_step + max(0, schedule_steps - schedule_step)
            if schedule_step != global_step:
                notes.append(
                    f"step {global_step} continues at step {schedule_step} of the {schedule_steps}-step learning-rate "
                    f"schedule: the run ends at step {total_steps} ({total_steps - global_step} remaining)"
                )
    if resume_state is None:
        notes.extend(_load_pretrained(cfg, backbone, partial_fc))

    # ---- phase 2: the run is accepted; create the output folder and the log
    if ctx.is_main:
        os.makedirs(cfg.output, exist_ok=True)
    ctx.barrier()
    if ctx.is_main:
        add_file_handler(logger, os.path.join(cfg.output, "training.log"))
        save_config(cfg, os.path.join(cfg.output, "config.json"))
        run_identity.record(cfg.output, identity)
        logger.info("config %s\n%s", cfg.config_file, format_config(cfg))
        logger.info(
            "world size %d (%s, %s) | global batch %d | %d steps per epoch | total_step %d | warmup_step %d | precision %s",
            ctx.world_size, ctx.backend or "single process", device, global_batch * cfg.gradient_acc,
            steps_per_epoch, total_steps, warmup_steps, precision.name,
        )
        if cfg.using_wandb:
            logger.warning("using_wandb is set but wandb is not supported; metrics go to TensorBoard in %s/tensorboard", cfg.output)
        for note in notes:
            logger.info(note)
        for message in skipped_sets.messages:
            logger.warning(message)
        if resumed_set is not None:
            for path in ckpt.set_aside_newer(cfg.output, resumed_set.step):
                logger.warning("unreadable checkpoint set renamed to %s", path)

    backbone_module = backbone  # the plain module: what is saved, evaluated and exported
    model = torch.compile(backbone) if cfg.compile else backbone
    if ctx.is_distributed:
        # DDP broadcasts rank 0's weights now, so only rank 0 needs to load them on resume.
        model = wrap_ddp(model, ctx)

    optimizer = build_optimizer(
        cfg.optimizer, backbone_module.parameters(), partial_fc.parameters(),
        lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, device_type=device.type,
    )
    scheduler = PolyScheduler(optimizer, cfg.lr, schedule_steps, warmup_steps)
    scaler = torch.amp.GradScaler(device.type) if precision.use_grad_scaler else None
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["state_optimizer"])
        # The schedule follows this run's plan (its length may differ from the saved run's:
        # another world size or num_epoch); only the position comes from the checkpoint.
        scheduler.last_epoch = schedule_step
        for group in optimizer.param_groups:  # the scheduler's lr for the next step
            group["lr"] = scheduler.lr_at(scheduler.last_epoch)
        if scaler is not None and resume_state.get("state_scaler"):
            scaler.load_state_dict(resume_state["state_scaler"])
        if "rng" in resume_state:
            ckpt.restore_rng_state(resume_state["rng"], device)
        resume_state = None  # free the memory

    # ---- evaluation and TensorBoard
    writer = None
    if ctx.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=os.path.join(cfg.output, "tensorboard"))
    val_targets = list(cfg.val_targets)
    if cfg.rec == "synthetic" and val_targets:
        logger.warning("rec='synthetic' (random tensors) has no verification sets: val_targets %s ignored", val_targets)
        val_targets = []
    rec_dir = cfg.rec if os.path.isdir(cfg.rec) else os.path.dirname(os.path.abspath(cfg.rec))
    verification = VerificationCallback(
        val_targets, rec_dir, ctx, summary_writer=writer, batch_size=min(cfg.batch_size, 256),
        logger=logger, amp_dtype=precision.autocast_dtype,
    )

    autocast = (
        (lambda: torch.autocast(device_type=device.type, dtype=precision.autocast_dtype))
        if precision.low_precision else contextlib.nullcontext
    )
    stop = _StopRequest()
    stop.install()
    meter = SpeedMeter(global_batch * cfg.gradient_acc, total_steps, start_step=global_step)
    nonfinite = _NonFiniteGuard(cfg.max_nonfinite_steps, device, backbone_module.buffers())
    first_eval = last_eval = None
    last_eval_step = -1

    def save_checkpoint(epoch: int, batch_in_epoch: int) -> None:
        if any_rank(nonfinite.check(global_step), ctx):
            if ctx.is_main:
                logger.warning("step %d was skipped (non-finite loss or gradient): no checkpoint written, the previous one is kept", global_step)
            return
        state = {
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "global_step": global_step,
            "world_size": ctx.world_size,
            "rank": ctx.rank,
            "state_dict_softmax_fc": partial_fc.state_dict(),
            "partial_fc": {
                "class_start": partial_fc.class_start, "num_local": partial_fc.num_local,
                "num_classes": num_classes, "embedding_size": cfg.embedding_size,
            },
            "state_optimizer": optimizer.state_dict(),
            "state_lr_scheduler": scheduler.state_dict(),
            "state_scaler": scaler.state_dict() if scaler is not None else None,
            "rng": ckpt.capture_rng_state(device),
            "run": {
                "network": cfg.network, "embedding_size": cfg.embedding_size, "num_classes": num_classes,
                "global_batch_size": global_batch, "gradient_acc": cfg.gradient_acc,
                "total_steps": total_steps,
            },
        }
        if ctx.is_main:
            state["state_dict_backbone"] = backbone_module.state_dict()
        path = ckpt.save_set(
            cfg.output, global_step, state, ctx, keep=cfg.keep_checkpoints, mirror_top_level=cfg.save_all_states,
            main_files={"model.pt": state["state_dict_backbone"]} if ctx.is_main else None, logger=logger,
        )
        if ctx.is_main:
            logger.info("checkpoint saved: %s", path)

    if cfg.eval_at_start and global_step == 0:
        first_eval = verification(0, backbone_module)
        last_eval_step = 0

    # ---- the training loop
    backbone.train()
    partial_fc.train()
    finished = global_step >= total_steps
    stopped_early = False
    epoch = start_epoch
    batches_per_epoch = steps_per_epoch * cfg.gradient_acc  # whole optimizer steps only
    for epoch in range(start_epoch, cfg.num_epoch):
        if finished or stopped_early:
            break
        first_batch = start_batch if epoch == start_epoch else 0
        loader.set_epoch(epoch, start_batch=first_batch)
        batch_in_epoch = first_batch
        for images, labels in loader:
            if batch_in_epoch >= batches_per_epoch:
                break
            batch_in_epoch += 1
            optimizer_step = batch_in_epoch % cfg.gradient_acc == 0
            if use_channels_last:
                images = images.contiguous(memory_format=torch.channels_last)

            # Between optimizer steps DDP must not all-reduce: gradients only accumulate.
            sync = contextlib.nullcontext() if optimizer_step or not ctx.is_distributed else model.no_sync()
            with sync:
                with autocast():
                    embeddings = model(images)
                loss = partial_fc(embeddings, labels)
                # Each batch contributes 1/gradient_acc so that the step sees the mean loss.
                scaled = loss / cfg.gradient_acc
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            meter.add_loss(loss)
            nonfinite.observe_loss(loss)
            if not optimizer_step:
                continue

            if scaler is not None:
                scaler.unscale_(optimizer)
            grad_norm = None
            if cfg.clip_grad_norm and cfg.clip_grad_norm > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(backbone_module.parameters(), cfg.clip_grad_norm)
            if scaler is not None:
                scaler.step(optimizer)  # skips the update when the scaled gradients overflowed
                scaler.update()
                nonfinite.count_loss()
            else:
                nonfinite.step(optimizer, grad_norm)  # skips the update when loss or gradients are not finite
            optimizer.zero_grad(set_to_none=True)
            step_lr = optimizer.param_groups[0]["lr"]  # the lr this step used, for the log
            scheduler.step()
            global_step += 1
            epoch_done = batch_in_epoch >= batches_per_epoch
            finished = global_step >= total_steps

            if global_step % cfg.frequent == 0 or finished:
                report = meter.report(global_step)
                nonfinite.check(global_step)
                if ctx.is_main:
                    _log_progress(logger, writer, report, global_step, total_steps, epoch, step_lr, scaler, nonfinite, format_duration)
            if stop.agreed(ctx):
                stopped_early = True
            if global_step % cfg.verbose == 0 and not finished:
                last_eval = verification(global_step, backbone_module)
                last_eval_step = global_step
                backbone.train()
            at_interval = cfg.save_every_steps > 0 and global_step % cfg.save_every_steps == 0
            if at_interval or epoch_done or finished or stopped_early:
                # The position saved is where the next run continues: the next batch of this
                # epoch, or the start of the next epoch.
                save_checkpoint(epoch + 1, 0) if epoch_done else save_checkpoint(epoch, batch_in_epoch)
            if finished or stopped_early:
                break

    if stopped_early:
        logger.info("stopped by SIGTERM at step %d; the checkpoint above continues the run (--resume=True)", global_step)
        if writer is not None:
            writer.close()
        return 0

    # ---- final evaluation, weights and ONNX
    if last_eval_step != global_step:
        last_eval = verification(global_step, backbone_module)
    final_files = ckpt.save_final(
        cfg.output, ctx, {"model.pt": backbone_module.state_dict()},
        exports={"model.onnx": lambda path: export_onnx(backbone_module, path)},
    )
    if ctx.is_main:
        logger.info("saved %s", " and ".join(map(str, final_files)))
        _log_summary(logger, first_eval, last_eval, global_step)
    if writer is not None:
        writer.close()
    ctx.barrier()
    return 0


# ---- helpers of train(), in the order they are used -------------------------------------

def _check_output_folder(output: str, ctx: DistContext) -> None:
    """The output folder must be creatable and writable (checked without leaving anything behind)."""
    if not ctx.is_main:
        return
    existing = output
    while existing and not os.path.exists(existing):
        existing = os.path.dirname(existing) or "."
    if os.path.exists(output) and not os.path.isdir(output):
        raise UserInputError(f"output {output} exists and is not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing or "."):
            pass
    except OSError as exc:
        raise UserInputError(f"output folder {output} is not writable: {exc.strerror or exc}") from None


def _prepare_synthetic_faces(cfg: Config, ctx: DistContext) -> None:
    """Generate the embedded synthetic-faces data set into `rec` if the config asks for it."""
    if not cfg.synthetic_faces:
        return
    if ctx.is_main:
        from dataset.synthetic_faces import materialize

        materialize(cfg.rec, **cfg.synthetic_faces)
    ctx.barrier()


def _check_dataset(cfg: Config, inspect_dataset) -> tuple[int, int]:
    """num_classes / num_image from the data set, checked against the config."""
    if cfg.rec == "synthetic":
        if cfg.num_classes is None or cfg.num_image is None:
            raise UserInputError("rec='synthetic' (random tensors) needs num_classes and num_image in the config")
        return cfg.num_classes, cfg.num_image
    info = inspect_dataset(cfg.rec)
    num_classes = cfg.num_classes if cfg.num_classes is not None else info.num_classes
    num_image = cfg.num_image if cfg.num_image is not None else info.num_images
    if info.num_classes is not None and num_classes < info.num_classes:
        raise UserInputError(
            f"num_classes={num_classes} in the config but the data set {cfg.rec} has {info.num_classes} classes"
        )
    if info.num_classes is not None and num_classes != info.num_classes:
        raise UserInputError(
            f"num_classes={num_classes} in the config disagrees with the data set {cfg.rec} ({info.num_classes} classes)"
        )
    if info.num_images is not None and num_image != info.num_images:
        raise UserInputError(
            f"num_image={num_image} in the config disagrees with the data set {cfg.rec} ({info.num_images} images)"
        )
    return num_classes, num_image


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _resume_loader():
    """How each rank reads its part of a checkpoint set (re-sharding when the world size changed)."""
    try:
        from losses.reshard import load_for_rank
    except ImportError:
        return None
    return load_for_rank


def _continue_position(state, cfg, ctx, epoch, batch, global_batch, steps_per_epoch, notes) -> tuple[int, int]:
    """The saved (epoch, batch), mapped onto this run's global batch when that changed (losses.reshard)."""
    from losses.reshard import translate_position

    run = state.get("run") or {}
    saved_world = int(state.get("resharded_from_world_size", ctx.world_size))
    saved_batch = int(run.get("global_batch_size", cfg.batch_size * saved_world))
    saved_acc = int(run.get("gradient_acc", cfg.gradient_acc))
    if (saved_batch, saved_acc) == (global_batch, cfg.gradient_acc):
        return epoch, batch
    pos = translate_position(epoch, batch, saved_batch, global_batch, cfg.gradient_acc, steps_per_epoch)
    notes.append(
        f"the checkpoint was saved by {_ranks(saved_world)} with a global batch of {saved_batch} x {saved_acc} "
        f"accumulation, this run has {_ranks(ctx.world_size)} and {global_batch} x {cfg.gradient_acc}: "
        f"{batch * saved_batch} samples of epoch {epoch} were seen, continuing at batch {pos.batch_in_epoch} of "
        f"epoch {pos.epoch} ({pos.batch_in_epoch * global_batch} samples)"
    )
    return pos.epoch, pos.batch_in_epoch


def _ranks(n: int) -> str:
    return f"{n} rank{'' if n == 1 else 's'}"


def _check_compatible(state: dict, cfg: Config, num_classes: int, cset) -> None:
    run = state.get("run")
    where = f"checkpoint {cset.path}"
    if run is not None:
        if run.get("network") != cfg.network:
            raise UserInputError(f"{where} was trained with network={run.get('network')!r}, the config has {cfg.network!r}")
        if run.get("embedding_size") != cfg.embedding_size:
            raise UserInputError(
                f"{where} has embedding_size={run.get('embedding_size')}, the config has {cfg.embedding_size}"
            )
    saved_classes = state.get("partial_fc", {}).get("num_classes")
    if saved_classes is not None and saved_classes != num_classes:
        raise UserInputError(f"{where} has num_classes={saved_classes}, this run has {num_classes}")


def _strip_module_prefix(state_dict: dict) -> dict:
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state_dict.items()}


def _load_pretrained(cfg: Config, backbone, partial_fc) -> list[str]:
    """Initialise from `pretrained` / `pretrained_fc`; returns what was done, for the log."""
    from utils.checkpoint import CheckpointError

    notes = []
    if cfg.pretrained:
        try:
            state = torch.load(cfg.pretrained, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"cannot read pretrained weights {cfg.pretrained}: {type(exc).__name__}: {exc}") from None
        if isinstance(state, dict) and "state_dict_backbone" in state:
            state = state["state_dict_backbone"]
        try:
            backbone.load_state_dict(_strip_module_prefix(state), strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            raise UserInputError(
                f"pretrained weights {cfg.pretrained} do not fit network={cfg.network!r} "
                f"embedding_size={cfg.embedding_size}: {' '.join(first[:3])[:300]}"
            ) from None
        notes.append(f"backbone initialised from {cfg.pretrained}")
    if cfg.pretrained_fc:
        try:
            state = torch.load(cfg.pretrained_fc, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"cannot read pretrained class centres {cfg.pretrained_fc}: {type(exc).__name__}: {exc}") from None
        if isinstance(state, dict) and "state_dict_softmax_fc" in state:  # tools/partial_fc_shards.py merge
            state = state["state_dict_softmax_fc"]
        weight = state.get("weight") if isinstance(state, dict) else state
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise UserInputError(f"{cfg.pretrained_fc} holds no [num_classes, embedding_size] 'weight' tensor")
        if tuple(weight.shape) != (partial_fc.num_classes, partial_fc.embedding_size):
            raise UserInputError(
                f"{cfg.pretrained_fc} has class centres of shape {tuple(weight.shape)}, this run needs "
                f"({partial_fc.num_classes}, {partial_fc.embedding_size})"
            )
        with torch.no_grad():
            shard = weight[partial_fc.class_start : partial_fc.class_start + partial_fc.num_local]
            partial_fc.weight.copy_(shard.to(partial_fc.weight.dtype))
        notes.append(f"class centres initialised from {cfg.pretrained_fc}")
    return notes


class _NonFiniteGuard:
    """A non-finite loss or gradient never updates the weights.

    The decision stays on the device (the fused optimizers skip the update when
    told `found_inf`), so steps that do not log never wait for it; the counters
    are read by check(), at log and checkpoint steps. The forward pass of a
    skipped step has already written its (typically NaN) batch statistics into the
    BatchNorm running averages; check() puts back their copy from the last check
    with no skipped step since, so neither the model nor a checkpoint keeps them.
    """

    def __init__(self, max_consecutive: int, device: torch.device, buffers):
        self.max_consecutive = max_consecutive
        self.loss_finite = torch.ones((), dtype=torch.bool, device=device)
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)
        self.run = torch.zeros((), dtype=torch.int64, device=device)
        self.longest_run = torch.zeros((), dtype=torch.int64, device=device)
        self.skipped_total = 0
        self.buffers = list(buffers)  # running mean/var and num_batches_tracked
        self.good_buffers = [b.detach().clone() for b in self.buffers]

    def observe_loss(self, loss: torch.Tensor) -> None:
        self.loss_finite = self.loss_finite & torch.isfinite(loss.detach())

    def _count(self, finite: torch.Tensor) -> None:
        bad = (~finite).to(torch.int64)
        self.skipped += bad
        self.run = (self.run + 1) * bad
        self.longest_run = torch.maximum(self.longest_run, self.run)
        self.loss_finite = torch.ones_like(self.loss_finite)

    def step(self, optimizer, grad_norm) -> None:
        finite = self.loss_finite
        if grad_norm is not None:
            finite = finite & torch.isfinite(grad_norm)
        self._count(finite)
        optimizer.found_inf = (~finite).to(torch.float32)
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf

    def count_loss(self) -> None:
        """With a GradScaler (which skips overflowing updates itself): count a non-finite
        loss, an overflow in the forward pass that no loss scale can fix."""
        self._count(self.loss_finite)

    def check(self, step: int) -> bool:
        """Read the counters and repair the BatchNorm statistics; True if the latest step was skipped.

        Raises after max_consecutive skipped steps in a row.
        """
        skipped = int(self.skipped.item())
        with torch.no_grad():
            if skipped > self.skipped_total:
                for buffer, good in zip(self.buffers, self.good_buffers):
                    buffer.copy_(good)
            else:
                for buffer, good in zip(self.buffers, self.good_buffers):
                    good.copy_(buffer)
        self.skipped_total = skipped
        if self.max_consecutive > 0 and int(self.longest_run.item()) >= self.max_consecutive:
            raise UserInputError(
                f"{int(self.longest_run.item())} consecutive steps up to step {step} had a non-finite loss or "
                f"gradient (max_nonfinite_steps={self.max_consecutive}); stopping. The last checkpoint is intact: "
                f"lower lr, check the data, or use precision='fp32'"
            )
        return bool(self.run.item())


def _log_progress(logger, writer, report, step, total, epoch, lr, scaler, nonfinite, format_duration) -> None:
    parts = [
        f"step {step}/{total} ({100.0 * step / total:.1f}%)",
        f"epoch {epoch}",
        f"loss {report['loss']:.4f}",
        f"lr {lr:.6f}",
        f"{report['samples_per_sec']:.1f} samples/s",
    ]
    if scaler is not None:
        parts.append(f"grad scale {scaler.get_scale():.0f}")
    if nonfinite.skipped_total:
        parts.append(f"skipped non-finite steps {nonfinite.skipped_total}")
    parts.append(f"elapsed {format_duration(report['elapsed'])}")
    parts.append(f"ETA {format_duration(report['eta_seconds']) if math.isfinite(report['eta_seconds']) else '?'}")
    logger.info(" | ".join(parts))
    if writer is not None:
        writer.add_scalar("train/loss", report["loss"], step)
        writer.add_scalar("train/lr", lr, step)
        writer.add_scalar("train/samples_per_sec", report["samples_per_sec"], step)


def _log_summary(logger, first_eval, last_eval, step) -> None:
    if not last_eval:
        return
    for name, result in last_eval.items():
        before = first_eval.get(name) if first_eval else None
        if before is not None:
            logger.info(
                "[%s] verification accuracy before training %.2f%%, after %d steps %.2f%% (best %.2f%%)",
                name, 100 * before["acc"], step, 100 * result["acc"], 100 * result["acc_best"],
            )
        else:
            logger.info("[%s] verification accuracy after %d steps %.2f%% (best %.2f%%)", name, step, 100 * result["acc"], 100 * result["acc_best"])


if __name__ == "__main__":
    sys.exit(main())
