"""CurricularFace (Huang et al., CVPR 2020): an ArcFace target whose hard negatives gain
weight as training progresses. Reference: HuangYG123/CurricularFace, head/metrics.py (class
CurricularFace); defaults m=0.5, s=64.

For a row with target cosine c = cos(theta) (clamped to [-1, 1]):

  target   = cos(theta + m)       where c > cos(pi - m), else c - m*sin(m)
  t        = 0.01 * mean over the batch of c + 0.99 * t    (before use; starts at 0)
  negative = x * (t + x)          where x > cos(theta + m) of the row (a "hard" negative)

cos(theta + m) = c*cos(m) - sqrt(1 - c^2)*sin(m) as in the reference, exact at c = +-1 with a
bounded gradient there; t is not differentiated (the reference updates it under no_grad).
The hard-negative test uses cos(theta + m) even where the target takes the other branch,
as the reference does. The reference clamps every cosine to [-1, 1]; here only the target
cosines are (a non-target cosine leaves [-1, 1] only by rounding).

Distributed: a rank holds only some rows' targets, but every row's negatives need the
row's cos(theta + m), and t needs the mean over the whole global batch: both come from
the head's all-reduced target cosines (`GlobalBatch.target_cosines`), so t is the same on
every rank. t advances only in training mode.
"""
from __future__ import annotations

import math

import torch

from losses.margin import GlobalBatch, Margin, bounded_sine, target_entries, unit_clamp, write_targets_
from losses.row_chunks import row_slices

_T_MOMENTUM = 0.01  # the reference's fixed EMA weight of t


class _EmphasiseHardNegatives(torch.autograd.Function):
    """In place: x -> x * (t + x) where x > threshold[row]; the backward keeps only the
    derivative (t + 2x there, 1 elsewhere), one [N, k] buffer."""

    @staticmethod
    def forward(ctx, logits, threshold, t):
        factor = torch.empty_like(logits)
        for part in row_slices(logits.shape[0], logits[0].numel() * logits.element_size(), logits.device):
            x = logits[part]
            easy = x <= threshold[part].unsqueeze(1)
            torch.mul(x, 2.0, out=factor[part]).add_(t).masked_fill_(easy, 1.0)
            x.mul_((x + t).masked_fill_(easy, 1.0))
        ctx.mark_dirty(logits)
        ctx.save_for_backward(factor)
        return logits

    @staticmethod
    def backward(ctx, grad):
        (factor,) = ctx.saved_tensors
        return grad * factor, None, None


class CurricularFaceMargin(Margin):
    name = "curricularface"
    needs_target_cosines = True

    def __init__(self, s: float = 64.0, m: float = 0.5):
        super().__init__(s)
        if not 0.0 <= m < math.pi:
            raise ValueError(f"m must be in [0, pi), got {m}")
        self.m = float(m)
        self.cos_m, self.sin_m = math.cos(m), math.sin(m)
        self.threshold = math.cos(math.pi - m)
        self.mm = math.sin(math.pi - m) * m
        self.register_buffer("t", torch.tensor(0.0))

    def cos_theta_plus_m(self, cos: torch.Tensor) -> torch.Tensor:
        return cos * self.cos_m - bounded_sine(cos) * self.sin_m

    def begin_step(self, batch: GlobalBatch, num_rows, device, dtype) -> GlobalBatch:
        if self.training:
            with torch.no_grad():
                every_target = batch.target_cosines.detach().to(dtype).clamp(-1.0, 1.0)
                self.t.copy_(every_target.mean() * _T_MOMENTUM + (1 - _T_MOMENTUM) * self.t)
        return batch

    def margin_(self, logits, targets, batch: GlobalBatch):
        every_target = batch.target_cosines.detach().to(logits.dtype).clamp(-1.0, 1.0)
        rows, cols, valid, raw = target_entries(logits, targets)
        cos = unit_clamp(raw)
        target = torch.where(cos > self.threshold, self.cos_theta_plus_m(cos), cos - self.mm)
        with torch.no_grad():
            hard_above = self.cos_theta_plus_m(every_target)
        logits = _EmphasiseHardNegatives.apply(logits, hard_above, self.t.to(logits.dtype))
        # Rows without their target here keep the entry as emphasised (read again, not `raw`).
        logits = write_targets_(logits, rows, cols, valid, target, logits[rows, cols])
        return logits.mul_(self.s)

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}"
