"""The run's state and the one owner of the checkpoint schema.

`RunState` holds what a checkpoint restores: the backbone (the plain module, not its DDP or
compiled wrapper), the PartialFC head, the optimizer, the lr scheduler, the GradScaler and
the position in the data. `RunState.state_dict()` is the dict each rank writes
(utils.checkpoint stores it, losses.reshard re-shards it); `load_state_dict()` reads it
back, also from files written by insightface or by earlier versions of this code.

Keys, in the order they are written (rank 0 adds `state_dict_backbone`):

    epoch, batch_in_epoch    where the next run continues: `batch_in_epoch` batches of
                             `epoch` are consumed (insightface's files: batch 0)
    global_step              optimizer steps taken (checkpoint names never go backwards)
    world_size, rank
    state_dict_softmax_fc    this rank's class centres (and the margin's state: margin_loss.*)
    partial_fc               PartialFC.shard_metadata(): class_start, num_local, num_classes,
                             embedding_size, num_subcenters, loss (losses/reshard.py reads it)
    state_optimizer, state_lr_scheduler, state_scaler (None without GradScaler)
    rng                      python / numpy / torch (/ cuda) generator states of this rank
    run                      network, embedding_size, num_classes, global_batch_size,
                             gradient_acc, total_steps
    state_dict_aux           only in runs with auxiliary loss terms (training.step): each
                             term's state_dict by its name (every rank: no DDP syncs them)
    state_dict_backbone      rank 0 only: DDP gives the other ranks rank 0's weights

The position arithmetic (the step plan, where a resumed run continues, possibly on another
global batch, and where its lr schedule and its end are) is plain functions below.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from training.errors import TrainingInputError
from utils import checkpoint as ckpt
from utils.lr_scheduler import plan_steps


# --- the plan and the position ----------------------------------------------------------

@dataclass(frozen=True)
class StepPlan:
    """The run's optimizer steps as planned from the data set and the config."""

    steps_per_epoch: int
    schedule_steps: int  # length of the lr schedule: num_epoch epochs, capped by max_steps
    warmup_steps: int


def plan_run(
    num_image: int, global_batch: int, num_epoch: int, warmup_epoch: float, gradient_acc: int,
    max_steps: int | None = None,
) -> StepPlan:
    """insightface's step arithmetic (utils.lr_scheduler.plan_steps), capped by `max_steps`.

    Raises TrainingInputError when an epoch holds no whole optimizer step.
    """
    try:
        steps_per_epoch, total, warmup = plan_steps(num_image, global_batch, num_epoch, warmup_epoch, gradient_acc)
    except ValueError as exc:
        raise TrainingInputError(str(exc)) from None
    if max_steps is not None:
        total = min(total, max_steps)
        warmup = min(warmup, total - 1)
    return StepPlan(steps_per_epoch, total, warmup)


@dataclass
class Position:
    """Where the run is: `batch_in_epoch` batches of `epoch` consumed, `global_step` steps taken."""

    epoch: int = 0
    batch_in_epoch: int = 0
    global_step: int = 0


@dataclass(frozen=True)
class ResumePoint:
    """Where a run resumed from a checkpoint continues.

    `saved` is the checkpoint's position; `position` the one this run continues at (the
    same unless the global batch or the accumulation changed). `schedule_step` is that
    position's step in this run's lr schedule and `total_steps` the global step at which
    this run ends; both differ from `global_step` only after such a change.
    """

    saved: Position
    position: Position
    schedule_step: int
    total_steps: int
    saved_world_size: int
    saved_global_batch: int
    saved_gradient_acc: int
    global_batch: int
    gradient_acc: int
    world_size: int
    schedule_steps: int

    @property
    def batch_changed(self) -> bool:
        return (self.saved_global_batch, self.saved_gradient_acc) != (self.global_batch, self.gradient_acc)

    def notes(self, source: str) -> list[str]:
        """The log lines that say where the run continues."""
        saved = self.saved
        notes = [f"resumed from {source}: epoch {saved.epoch}, batch {saved.batch_in_epoch}, global step {saved.global_step}"]
        if self.batch_changed:
            pos = self.position
            notes.append(
                f"the checkpoint was saved by {_ranks(self.saved_world_size)} with a global batch of "
                f"{self.saved_global_batch} x {self.saved_gradient_acc} accumulation, this run has "
                f"{_ranks(self.world_size)} and {self.global_batch} x {self.gradient_acc}: "
                f"{saved.batch_in_epoch * self.saved_global_batch} samples of epoch {saved.epoch} were seen, continuing "
                f"at batch {pos.batch_in_epoch} of epoch {pos.epoch} ({pos.batch_in_epoch * self.global_batch} samples)"
            )
        if self.schedule_step != saved.global_step:
            notes.append(
                f"step {saved.global_step} continues at step {self.schedule_step} of the {self.schedule_steps}-step "
                f"learning-rate schedule: the run ends at step {self.total_steps} "
                f"({self.total_steps - saved.global_step} remaining)"
            )
        return notes


def _ranks(n: int) -> str:
    return f"{n} rank{'' if n == 1 else 's'}"


def steps_after_resume(global_step: int, schedule_step: int, schedule_steps: int) -> int:
    """The global step at which a resumed run ends: what is left of its schedule, after the steps taken."""
    return global_step + max(0, schedule_steps - schedule_step)


def resume_point(checkpoint: dict, plan: StepPlan, *, global_batch: int, gradient_acc: int, world_size: int) -> ResumePoint:
    """Where this run continues from `checkpoint` (a rank state as `RunState.state_dict` writes it).

    The saved (epoch, batch) is mapped onto this run's global batch by
    `losses.reshard.translate_position` (the identity when nothing changed), which also
    gives the step of this run's plan at that position: the lr schedule continues there,
    while `global_step` keeps counting the steps taken. Files without a `run` entry
    (insightface's) are taken to have had this run's batch per rank and accumulation.
    """
    from losses.reshard import translate_position

    saved = Position(
        int(checkpoint["epoch"]), int(checkpoint.get("batch_in_epoch", 0)), int(checkpoint["global_step"])
    )
    run = checkpoint.get("run") or {}
    saved_world = int(checkpoint.get("resharded_from_world_size", world_size))
    saved_batch = int(run.get("global_batch_size", global_batch // world_size * saved_world))
    saved_acc = int(run.get("gradient_acc", gradient_acc))
    pos = translate_position(
        saved.epoch, saved.batch_in_epoch, saved_batch, global_batch, gradient_acc, plan.steps_per_epoch
    )
    return ResumePoint(
        saved=saved,
        position=Position(pos.epoch, pos.batch_in_epoch, saved.global_step),
        schedule_step=pos.schedule_step,
        total_steps=steps_after_resume(saved.global_step, pos.schedule_step, plan.schedule_steps),
        saved_world_size=saved_world, saved_global_batch=saved_batch, saved_gradient_acc=saved_acc,
        global_batch=global_batch, gradient_acc=gradient_acc, world_size=world_size,
        schedule_steps=plan.schedule_steps,
    )


# --- what describes the run ---------------------------------------------------------------

@dataclass(frozen=True)
class RunInfo:
    """What a checkpoint records about the run that wrote it (its `run` entry)."""

    network: str
    embedding_size: int
    num_classes: int
    global_batch_size: int  # per batch: batch_size * world_size
    gradient_acc: int
    total_steps: int

    def as_dict(self) -> dict:
        return {
            "network": self.network, "embedding_size": self.embedding_size, "num_classes": self.num_classes,
            "global_batch_size": self.global_batch_size, "gradient_acc": self.gradient_acc,
            "total_steps": self.total_steps,
        }


def check_compatible(checkpoint: dict, info: RunInfo, source: str, head=None) -> None:
    """Refuse a checkpoint of another network, embedding size or number of classes, or (with
    `head`, the run's PartialFC) of another margin loss or number of sub-centres."""
    run = checkpoint.get("run")
    where = f"checkpoint {source}"
    if run is not None:
        if run.get("network") != info.network:
            raise TrainingInputError(f"{where} was trained with network={run.get('network')!r}, the config has {info.network!r}")
        if run.get("embedding_size") != info.embedding_size:
            raise TrainingInputError(
                f"{where} has embedding_size={run.get('embedding_size')}, the config has {info.embedding_size}"
            )
    saved = checkpoint.get("partial_fc") or {}
    saved_classes = saved.get("num_classes")
    if saved_classes is not None and saved_classes != info.num_classes:
        raise TrainingInputError(f"{where} has num_classes={saved_classes}, this run has {info.num_classes}")
    if head is not None:
        _check_head_compatible(saved, head.shard_metadata(), where)


def _check_head_compatible(saved: dict, ours: dict, where: str) -> None:
    """The saved loss and sub-centres against the run's (files from before they were recorded
    have neither: the head's strict load_state_dict still refuses a margin state that does not fit)."""
    loss = saved.get("loss")
    if loss is not None and loss != ours["loss"]:
        raise TrainingInputError(
            f"{where} was trained with loss={loss!r}, the config has loss={ours['loss']!r}: resume with "
            f"--loss={loss}, or start a new run from pretrained / pretrained_fc"
        )
    subcenters = saved.get("num_subcenters", 1)
    if subcenters != ours["num_subcenters"]:
        raise TrainingInputError(
            f"{where} has num_subcenters={subcenters}, the config has {ours['num_subcenters']}: resume with "
            f"--num_subcenters={subcenters}"
        )


# --- the state ------------------------------------------------------------------------------

class RunState:
    """Backbone, head, optimizer, scheduler, scaler and position of a run, saved and restored as one.

    `scheduler.last_epoch` is the schedule step (the index of the next update in the lr
    schedule); `total_steps` is the global step at which the run ends.
    """

    def __init__(self, backbone, head, optimizer, scheduler, scaler, *, info: RunInfo, plan: StepPlan,
                 rank: int, world_size: int, device: torch.device, aux_losses=()):
        self.backbone, self.head = backbone, head
        self.aux_losses = list(aux_losses)  # training.step auxiliary terms (their trained weights)
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.info, self.plan = info, plan
        self.rank, self.world_size, self.device = rank, world_size, device
        self.position = Position()

    @property
    def schedule_step(self) -> int:
        return self.scheduler.last_epoch

    @property
    def total_steps(self) -> int:
        return self.info.total_steps

    @property
    def finished(self) -> bool:
        return self.position.global_step >= self.total_steps

    # -- moving on
    def begin_epoch(self, epoch: int) -> int:
        """The first batch of `epoch` to train on (not 0 only in the epoch a resumed run continues)."""
        if epoch != self.position.epoch:
            self.position.epoch, self.position.batch_in_epoch = epoch, 0
        return self.position.batch_in_epoch

    def count_batch(self) -> None:
        self.position.batch_in_epoch += 1

    def count_step(self, batches_per_epoch: int) -> bool:
        """One optimizer step taken; True if it ended the epoch (the position moves to the next one)."""
        self.position.global_step += 1
        if self.position.batch_in_epoch >= batches_per_epoch:
            self.position.epoch += 1
            self.position.batch_in_epoch = 0
            return True
        return False

    # -- the checkpoint schema
    def state_dict(self) -> dict:
        """This rank's checkpoint (see the module docstring); the backbone on rank 0 only."""
        head = self.head
        state = {
            "epoch": self.position.epoch,
            "batch_in_epoch": self.position.batch_in_epoch,
            "global_step": self.position.global_step,
            "world_size": self.world_size,
            "rank": self.rank,
            "state_dict_softmax_fc": head.state_dict(),
            "partial_fc": head.shard_metadata(),
            "state_optimizer": self.optimizer.state_dict(),
            "state_lr_scheduler": self.scheduler.state_dict(),
            "state_scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": ckpt.capture_rng_state(self.device),
            "run": self.info.as_dict(),
        }
        if self.aux_losses:
            state["state_dict_aux"] = {term.name: term.state_dict() for term in self.aux_losses}
        if self.rank == 0:
            state["state_dict_backbone"] = self.backbone.state_dict()
        return state

    def load_state_dict(self, checkpoint: dict, source: str = "checkpoint") -> ResumePoint:
        """Continue from `checkpoint`; returns where (and why there) for the log.

        Checked first (network, embedding size, classes, loss, sub-centres), then loaded: the
        backbone (rank 0's file), the class centres and the margin's state, the auxiliary terms'
        state (a distillation term refuses another teacher), the optimizer and scaler state,
        the random-number states.
        The lr schedule follows this run's plan (its length may differ from the saved run's:
        another world size or num_epoch); only the position comes from the checkpoint.
        """
        from backbones.weights import load_state_dict_into

        check_compatible(checkpoint, self.info, source, head=self.head)
        point = resume_point(
            checkpoint, self.plan, global_batch=self.info.global_batch_size, gradient_acc=self.info.gradient_acc,
            world_size=self.world_size,
        )
        if "state_dict_backbone" in checkpoint:
            load_state_dict_into(self.backbone, checkpoint["state_dict_backbone"], source, self.info.network)
        self.head.load_state_dict(checkpoint["state_dict_softmax_fc"], strict=True)
        saved_aux = checkpoint.get("state_dict_aux") or {}
        for term in self.aux_losses:
            if term.name in saved_aux:
                term.load_state_dict(saved_aux[term.name], strict=True)
        self.optimizer.load_state_dict(checkpoint["state_optimizer"])
        self.set_schedule_step(point.schedule_step)
        if self.scaler is not None and checkpoint.get("state_scaler"):
            self.scaler.load_state_dict(checkpoint["state_scaler"])
        if "rng" in checkpoint:
            ckpt.restore_rng_state(checkpoint["rng"], self.device)
        self.position = Position(point.position.epoch, point.position.batch_in_epoch, point.position.global_step)
        self.info = replace(self.info, total_steps=point.total_steps)
        return point

    def set_schedule_step(self, step: int) -> None:
        """Put the lr schedule at `step`: the optimizer gets that step's lr for its next update."""
        self.scheduler.last_epoch = step
        for group in self.optimizer.param_groups:
            group["lr"] = self.scheduler.lr_at(step)


def load_pretrained(backbone, head, *, backbone_path: str | None, head_path: str | None, network: str) -> list[str]:
    """Initialise from `pretrained` (any backbone weights file) / `pretrained_fc` (merged class
    centres [num_classes * num_subcenters, D], e.g. tools/partial_fc_shards.py merge); returns
    what was done, for the log."""
    from backbones.weights import load_state_dict_into, read_backbone_state_dict

    notes = []
    if backbone_path:
        load_state_dict_into(backbone, read_backbone_state_dict(backbone_path), f"pretrained weights {backbone_path}", network)
        notes.append(f"backbone initialised from {backbone_path}")
    if head_path:
        try:
            state = torch.load(head_path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ckpt.CheckpointError(f"cannot read pretrained class centres {head_path}: {type(exc).__name__}: {exc}") from None
        if isinstance(state, dict) and "state_dict_softmax_fc" in state:  # a merged checkpoint
            state = state["state_dict_softmax_fc"]
        weight = state.get("weight") if isinstance(state, dict) else state
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise TrainingInputError(f"{head_path} holds no [num_classes, embedding_size] 'weight' tensor")
        k = head.num_subcenters  # K rows per class, class-major (losses/subcenter.py)
        if tuple(weight.shape) != (head.num_classes * k, head.embedding_size):
            layout = f" (num_classes={head.num_classes} x num_subcenters={k})" if k > 1 else ""
            raise TrainingInputError(
                f"{head_path} has class centres of shape {tuple(weight.shape)}, this run needs "
                f"({head.num_classes * k}, {head.embedding_size}){layout}"
            )
        with torch.no_grad():
            shard = weight[head.class_start * k : (head.class_start + head.num_local) * k]
            head.weight.copy_(shard.to(head.weight.dtype))
        notes.append(f"class centres initialised from {head_path}")
    return notes
