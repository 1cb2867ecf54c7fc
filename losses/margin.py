"""Additive/multiplicative angular margins on cosine logits.

The combined margin of the ArcFace paper changes the target logit cos(theta) to
cos(m1 * theta + m2) - m3 and leaves the other logits alone; every logit is then
scaled by s. ArcFace is (1, 0.5, 0), CosFace (1, 0, 0.4), SphereFace-like
margins use m1 > 1.
"""
from __future__ import annotations

import math

import torch
from torch import nn

# acos has an infinite derivative at +-1; keeping the argument strictly inside
# (-1, 1) keeps the exact gradient finite for targets that are already aligned.
_ACOS_EPS = 1e-6


class CombinedMarginLoss(nn.Module):
    """Apply cos(m1*theta + m2) - m3 to the target logits and scale all logits by s.

    forward(logits, labels): `logits` [N, C] are cosines (they are modified in place
    and returned, to avoid copying a [batch x classes] matrix); `labels` [N] hold the
    target column of each row, or -1 where the row's class is not among these columns
    (PartialFC shards classes across ranks).

    With interclass_filtering_threshold > 0, negative logits above the threshold are
    set to 0 (the Partial FC paper's inter-class conflict filtering); a row's own
    class is never filtered.
    """

    def __init__(self, s: float, m1: float, m2: float, m3: float, interclass_filtering_threshold: float = 0.0):
        super().__init__()
        if s <= 0:
            raise ValueError(f"margin scale s must be positive, got {s}")
        if m1 <= 0:
            raise ValueError(f"m1 (multiplicative angular margin) must be positive, got {m1}")
        self.s = float(s)
        self.m1 = float(m1)
        self.m2 = float(m2)
        self.m3 = float(m3)
        self.interclass_filtering_threshold = float(interclass_filtering_threshold)
        # Beyond theta_max = (pi - m2) / m1 the angle m1*theta + m2 would pass pi and
        # cos() would start to rise again, rewarding a *worse* embedding. There the
        # target logit continues linearly in cos(theta) from its value at theta_max,
        # which keeps it continuous and monotonic.
        self.theta_max = min(math.pi, (math.pi - self.m2) / self.m1)
        self.cos_theta_max = math.cos(self.theta_max)
        self.target_at_theta_max = math.cos(self.m1 * self.theta_max + self.m2) - self.m3

    @property
    def is_plain_softmax(self) -> bool:
        return self.m1 == 1.0 and self.m2 == 0.0 and self.m3 == 0.0

    def target_logit(self, cos_theta: torch.Tensor) -> torch.Tensor:
        """The margin-adjusted (unscaled) target logit for target cosines."""
        if self.m1 == 1.0 and self.m2 == 0.0:
            return cos_theta - self.m3  # CosFace: no angle needed, exact gradient 1
        x = cos_theta.clamp(-1.0 + _ACOS_EPS, 1.0 - _ACOS_EPS)
        theta = torch.acos(x)
        with_margin = torch.cos(self.m1 * theta + self.m2) - self.m3
        continuation = self.target_at_theta_max + (cos_theta - self.cos_theta_max)
        return torch.where(theta <= self.theta_max, with_margin, continuation)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # Every row's target column is gathered and written back, rows without one (-1)
        # masked out: selecting those rows instead would make the host wait for the
        # device (nonzero) on every step.
        valid = labels != -1
        rows = torch.arange(labels.shape[0], device=labels.device)
        cols = labels.clamp_min(0)

        if self.interclass_filtering_threshold > 0:
            with torch.no_grad():
                dirty = logits > self.interclass_filtering_threshold
                dirty[rows, cols] &= ~valid  # never a row's own class
            logits = logits.masked_fill_(dirty, 0.0)

        if not self.is_plain_softmax:
            cos_theta = logits[rows, cols]
            logits = logits.index_put_((rows, cols), torch.where(valid, self.target_logit(cos_theta), cos_theta))
        return logits.mul_(self.s)

    def extra_repr(self) -> str:
        return (
            f"s={self.s}, m1={self.m1}, m2={self.m2}, m3={self.m3}, "
            f"interclass_filtering_threshold={self.interclass_filtering_threshold}"
        )
