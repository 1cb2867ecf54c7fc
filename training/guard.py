"""What keeps a run safe between steps: the non-finite guard and the SIGTERM stop request."""
from __future__ import annotations

import signal

import torch

from training.errors import TrainingInputError
from utils.distributed import DistContext


def all_finite(grads) -> torch.Tensor:
    """A device bool: every value of every gradient is finite, with no host sync.

    One fused norm per tensor list (what clip_grad_norm_ uses), so a NaN or inf anywhere
    makes its tensor's norm non-finite; sparse row gradients are checked by their values.
    """
    tensors = [g._values() if g.is_sparse else g for g in grads if g is not None]
    if not tensors:
        return torch.ones((), dtype=torch.bool)
    by_device: dict = {}
    for t in tensors:
        by_device.setdefault((t.device, t.dtype), []).append(t)
    finite = None
    for group in by_device.values():
        ok = torch.isfinite(torch.stack(torch._foreach_norm(group))).all()
        finite = ok if finite is None else finite & ok.to(finite.device)
    return finite


class NonFiniteGuard:
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

    def step(self, optimizer, grad_norm, unchecked_grads=()) -> None:
        """optimizer.step(), void on the device when the loss, `grad_norm` (the clipped
        parameters' norm) or any of `unchecked_grads` (the gradients it does not cover: the
        head's sparse row gradient, everything when clipping is off) is not finite."""
        finite = self.loss_finite
        if grad_norm is not None:
            finite = finite & torch.isfinite(grad_norm)
        # Gradients an optimizer holds outside `p.grad` (losses.optim: the head's sampled rows as factors).
        held = getattr(optimizer, "deferred_gradient_tensors", list)()
        finite = finite & all_finite([*unchecked_grads, *held])
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
            raise TrainingInputError(
                f"{int(self.longest_run.item())} consecutive steps up to step {step} had a non-finite loss or "
                f"gradient (max_nonfinite_steps={self.max_consecutive}); stopping. The last checkpoint is intact: "
                f"lower lr, check the data, or use precision='fp32'"
            )
        return bool(self.run.item())


class StopRequest:
    """SIGTERM (pre-emption) sets a flag; the loop checkpoints at the next agreed step and exits."""

    def __init__(self):
        self.requested = False
        self._previous = None
        self._pending = None  # (work, device flag, host copy, copy done) of the last step's vote

    def install(self) -> "StopRequest":
        self._previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def restore(self) -> None:
        """Put back the SIGTERM handler that install() replaced."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

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
