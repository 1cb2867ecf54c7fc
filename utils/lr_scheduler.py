"""Polynomial learning-rate decay with linear warm-up, stepped once per optimizer step."""
from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LRScheduler


class PolyScheduler(LRScheduler):
    """lr for the update with index s = 0, 1, 2, ... (the scheduler's `last_epoch`):

    warm-up (s < warmup_steps):  base_lr * (s + 1) / warmup_steps
    decay:                        base_lr * (1 - (s - warmup_steps) / (max_steps - warmup_steps)) ** power

    The first update already has a non-zero lr and the last planned one
    (s = max_steps - 1) still has base_lr * (1 / decay_steps) ** power > 0; past
    max_steps the lr stays at 0 instead of rising again (the polynomial would).
    Every parameter group gets the same lr.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        base_lr: float,
        max_steps: int,
        warmup_steps: int,
        last_epoch: int = -1,
        power: float = 2.0,
    ):
        if max_steps <= 0:
            raise ValueError(f"max_steps must be positive, got {max_steps}")
        if not 0 <= warmup_steps < max_steps:
            raise ValueError(f"warmup_steps must be in [0, max_steps={max_steps}), got {warmup_steps}")
        self.base_lr = float(base_lr)
        self.max_steps = int(max_steps)
        self.warmup_steps = int(warmup_steps)
        self.power = float(power)
        if last_epoch != -1:
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", self.base_lr)
        super().__init__(optimizer, last_epoch)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        if step >= self.max_steps:
            return 0.0
        remaining = 1.0 - (step - self.warmup_steps) / (self.max_steps - self.warmup_steps)
        return self.base_lr * remaining**self.power

    def get_lr(self) -> list[float]:
        return [self.lr_at(self.last_epoch) for _ in self.optimizer.param_groups]


def plan_steps(num_image: int, global_batch_size: int, num_epoch: int, warmup_epoch: float, gradient_acc: int = 1) -> tuple[int, int, int]:
    """(steps_per_epoch, total_steps, warmup_steps) in optimizer steps, as insightface computes them.

    steps_per_epoch = num_image // (batch_size * world_size) // gradient_acc: each
    optimizer step consumes `gradient_acc` batches.
    """
    batches_per_epoch = num_image // global_batch_size
    steps_per_epoch = batches_per_epoch // gradient_acc
    if steps_per_epoch <= 0:
        raise ValueError(
            f"num_image={num_image} gives no optimizer step per epoch with a global batch of "
            f"{global_batch_size} and gradient_acc={gradient_acc}"
        )
    total_steps = steps_per_epoch * num_epoch
    warmup_steps = int(steps_per_epoch * max(0.0, warmup_epoch))
    return steps_per_epoch, total_steps, min(warmup_steps, total_steps - 1)
