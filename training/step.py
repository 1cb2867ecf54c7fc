"""The training step: forward, margin-softmax loss (+ auxiliary terms), backward, optimizer step.

`TrainStep` is what train.py runs for every batch and what bench/bench_train.py times.
Called once per batch, it accumulates gradients over `gradient_acc` batches and takes
the optimizer step on the last of them:

    forward under the run's autocast -> embeddings; auxiliary terms -> weighted scalars
    loss = PartialFC(embeddings, labels) + sum of the terms
    backward of loss / gradient_acc (scaled by the GradScaler when there is one); under
        DDP, gradients are not all-reduced on the batches between optimizer steps (no_sync)
    on the last batch: auxiliary-term gradients averaged over the ranks, unscale, clip the
        gradient norm, the guarded optimizer step (a non-finite loss or gradient updates
        nothing), zero_grad, lr scheduler step

Nothing in the step waits for the device: losses are summed on the device and read only
when the progress line asks for them (`take_losses`).

Auxiliary loss terms (knowledge distillation, regularisers) are modules with a `name`
and `forward(images, embeddings, labels) -> scalar tensor`, already weighted; they run
under the same autocast as the backbone (a term that needs float32 casts itself). Their
parameters are trained with the backbone's: build the optimizer with
`trainable_parameters(backbone, aux_losses)` as its backbone group, e.g.

    build_optimizer(cfg.optimizer, trainable_parameters(backbone, aux), head.parameters(), ...)

and they are clipped together with the backbone's. They are not inside DDP, so the step
gives every rank rank 0's term weights when it is built (as DDP does for the backbone) and
averages their gradients over the ranks itself before the optimizer step. Pass the terms
to `training.state.RunState` too: checkpoints then hold each term's `state_dict()` (keep
a frozen teacher out of it, e.g. by not registering it as a submodule).
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Protocol, Sequence

import torch
from torch import nn

from training.guard import NonFiniteGuard

HEAD_LOSS = "loss"  # the margin-softmax loss's name among the step's losses


class AuxiliaryLoss(Protocol):
    """An extra loss term added to the head's loss (a torch module)."""

    name: str  # its name in the progress line and TensorBoard ("distill")

    def __call__(self, images: torch.Tensor, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The term's weighted scalar value for this batch."""
        ...

    def parameters(self) -> Iterable[nn.Parameter]: ...


def trainable_parameters(backbone: nn.Module, aux_losses: Sequence[nn.Module] = ()) -> list[nn.Parameter]:
    """The backbone's parameters (all, in module order: insightface's optimizer indices), then
    the auxiliary terms' trainable ones (not a frozen teacher's): the optimizer's backbone
    group and what the step clips."""
    params = list(backbone.parameters())
    for term in aux_losses:
        params.extend(p for p in term.parameters() if p.requires_grad)
    return params


class TrainStep:
    """One batch of training; an optimizer step every `gradient_acc` calls.

    model       the backbone as called in training (DDP and/or torch.compile around it)
    backbone    the plain module (its parameters are clipped)
    head        the PartialFC head: head(embeddings, labels) -> loss over the global batch
    guard       the run's NonFiniteGuard
    autocast_dtype  the run's low-precision dtype (utils.amp.resolve_precision), None: fp32
    scaler      torch.amp.GradScaler (fp16) or None
    scheduler   stepped after every optimizer step (None: constant lr)
    distributed whether gradients of the auxiliary terms must be averaged over ranks
    """

    def __init__(
        self,
        model: nn.Module,
        backbone: nn.Module,
        head: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        guard: NonFiniteGuard,
        scheduler=None,
        autocast_dtype: torch.dtype | None = None,
        scaler: torch.amp.GradScaler | None = None,
        gradient_acc: int = 1,
        clip_grad_norm: float = 0.0,
        aux_losses: Sequence[nn.Module] = (),
        channels_last: bool = False,
        distributed: bool = False,
    ):
        names = [term.name for term in aux_losses]
        if HEAD_LOSS in names or len(set(names)) != len(names):
            raise ValueError(f"auxiliary loss names must be unique and not {HEAD_LOSS!r}, got {names}")
        if gradient_acc < 1:
            raise ValueError(f"gradient_acc must be at least 1, got {gradient_acc}")
        self.model, self.head, self.optimizer, self.scheduler = model, head, optimizer, scheduler
        self.guard, self.scaler = guard, scaler
        self.autocast_dtype = autocast_dtype
        self.device_type = next(backbone.parameters()).device.type
        self.gradient_acc = gradient_acc
        self.clip_grad_norm = clip_grad_norm or 0.0
        self.aux_losses = list(aux_losses)
        self.channels_last = channels_last
        self.clip_params = trainable_parameters(backbone, self.aux_losses)
        self.aux_params = self.clip_params[len(list(backbone.parameters())):]
        # What the guard must check itself: with clipping on, the clipped norm covers the
        # backbone's (and the auxiliary terms') gradients; the head's never are.
        clipped = {id(p) for p in self.clip_params} if self.clip_grad_norm > 0 else set()
        self.unclipped_params = [
            p for group in optimizer.param_groups for p in group["params"] if id(p) not in clipped
        ]
        self.distributed = distributed
        if distributed:
            self._broadcast_aux_state()
        self._micro = 0  # batches since the last optimizer step
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0
        self.last_loss: torch.Tensor | None = None  # the head's loss of the latest batch (on the device)
        self.last_lr: float | None = None  # the lr the latest optimizer step used

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.autocast_dtype)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> bool:
        """Train on one batch; True if it completed an optimizer step."""
        self._micro += 1
        optimizer_step = self._micro == self.gradient_acc
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        # Between optimizer steps DDP must not all-reduce: gradients only accumulate.
        no_sync = getattr(self.model, "no_sync", None)
        sync = contextlib.nullcontext() if optimizer_step or no_sync is None else no_sync()
        with sync:
            with self._autocast():
                embeddings = self.model(images)
                terms = [(term.name, term(images, embeddings, labels)) for term in self.aux_losses]
            loss = self.head(embeddings, labels)
            total = loss
            for _, value in terms:
                total = total + value
            # Each batch contributes 1/gradient_acc so that the step sees the mean loss.
            scaled = total / self.gradient_acc
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        self._accumulate(loss, terms)
        self.guard.observe_loss(total)
        if not optimizer_step:
            return False
        self._micro = 0
        self._optimizer_step()
        return True

    def _optimizer_step(self) -> None:
        optimizer, scaler = self.optimizer, self.scaler
        self._average_aux_gradients()
        if scaler is not None:
            scaler.unscale_(optimizer)  # clipping must see the true gradients
            if hasattr(optimizer, "unscale_deferred_"):  # the head's row gradient held as factors
                optimizer.unscale_deferred_(scaler)
        grad_norm = None
        if self.clip_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.clip_params, self.clip_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)  # skips the update when the scaled gradients overflowed
            scaler.update()
            self.guard.count_loss()
        else:
            # Skips the update when the loss or any gradient is not finite.
            self.guard.step(optimizer, grad_norm, [p.grad for p in self.unclipped_params])
        optimizer.zero_grad(set_to_none=True)
        self.last_lr = optimizer.param_groups[0]["lr"]
        if self.scheduler is not None:
            self.scheduler.step()

    def _broadcast_aux_state(self) -> None:
        """Give every rank rank 0's auxiliary-term weights, as DDP does for the backbone: each
        rank initialised them from its own random numbers (or loaded its own checkpoint file)."""
        import torch.distributed as dist

        for term in self.aux_losses:
            for tensor in [*term.parameters(), *term.buffers()]:
                dist.broadcast(tensor.data, src=0)

    def _average_aux_gradients(self) -> None:
        """DDP averages the backbone's gradients; the auxiliary terms' parameters are outside it."""
        if not self.distributed or not self.aux_params:
            return
        import torch.distributed as dist

        world = dist.get_world_size()
        grads = [p.grad for p in self.aux_params if p.grad is not None]
        works = [dist.all_reduce(g, async_op=True) for g in grads]
        for work, grad in zip(works, grads):
            work.wait()
            grad.div_(world)

    def _accumulate(self, loss: torch.Tensor, terms) -> None:
        self.last_loss = loss.detach()
        for name, value in [(HEAD_LOSS, loss), *terms]:
            value = value.detach().float()
            previous = self._sums.get(name)
            self._sums[name] = value if previous is None else previous + value
        self._count += 1

    def take_losses(self) -> dict[str, float]:
        """Mean of each loss over the batches since the last call ("loss" first, then the
        auxiliary terms by name); reads the device, so call it at logging steps only.
        The head's loss is the global batch's; an auxiliary term's is this rank's batches'."""
        if not self._count:
            return {HEAD_LOSS: float("nan"), **{term.name: float("nan") for term in self.aux_losses}}
        means = {name: float(total) / self._count for name, total in self._sums.items()}
        self._sums, self._count = {}, 0
        return means
