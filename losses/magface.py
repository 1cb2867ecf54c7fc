"""MagFace (Meng, Zhao, Huang, Wang, CVPR 2021): the embedding norm a in [l_a, u_a] sets an
ArcFace margin m(a), and a regulariser g(a) pulls the norm up, so that the norm becomes a
quality score. Reference: IrvingMeng/MagFace, models/magface.py (MagLinear, MagLoss) and
run/trainer.py (loss = CE + lambda_g * loss_g); defaults from run/run.sh (l_a 10, u_a 110,
l_margin 0.45, u_margin 0.8, lambda_g 35, scale 64).

  a      = clamp(||e||, l_a, u_a)                      (NOT detached)
  m(a)   = (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m
  target = cos(theta + m(a)) where cos(theta) > 0, else cos(theta)   (easy_margin=True)
  loss   = CE + lambda_g * mean over the batch of (a / u_a^2 + 1 / a)

The gradient reaches the norm through m(a) and through g (zero outside [l_a, u_a], where
the clamp holds it). cos(theta + m) is computed as cos*cos(m) - sin(theta)*sin(m) with
sin(theta) = sqrt(1 - cos^2), as in the reference, exact at cos = +-1 with a bounded
gradient there. The reference also clamps every cosine to [-1, 1]; here only the target
cosines are (a non-target cosine leaves [-1, 1] only by rounding, a few 1e-8).

Distributed: mean(g) is over the whole global batch; every rank computes it from the
gathered norms and the head divides its gradient by the world size (see
losses/partial_fc.py), so the total equals the single-process gradient.
"""
from __future__ import annotations

import math

import torch

from losses.margin import GlobalBatch, Margin, bounded_sine, target_entries, unit_clamp, write_targets_


class MagFaceMargin(Margin):
    name = "magface"
    needs_norms = True

    def __init__(
        self, s: float = 64.0, l_a: float = 10.0, u_a: float = 110.0, l_m: float = 0.45, u_m: float = 0.8,
        lambda_g: float = 35.0,
    ):
        super().__init__(s)
        if not 0.0 < l_a < u_a:
            raise ValueError(f"the norm bounds must satisfy 0 < l_a < u_a, got l_a={l_a}, u_a={u_a}")
        if not 0.0 <= l_m <= u_m < math.pi / 2:
            raise ValueError(f"the margins must satisfy 0 <= l_m <= u_m < pi/2, got l_m={l_m}, u_m={u_m}")
        if not lambda_g >= 0.0:
            raise ValueError(f"lambda_g must be >= 0, got {lambda_g}")
        self.l_a, self.u_a, self.l_m, self.u_m = float(l_a), float(u_a), float(l_m), float(u_m)
        self.lambda_g = float(lambda_g)

    def clamped_norms(self, batch: GlobalBatch) -> torch.Tensor:
        return batch.norms.clamp(self.l_a, self.u_a)

    def adaptive_margin(self, a: torch.Tensor) -> torch.Tensor:
        """m(a): linear from l_m at a = l_a to u_m at a = u_a."""
        return (self.u_m - self.l_m) / (self.u_a - self.l_a) * (a - self.l_a) + self.l_m

    def margin_(self, logits, targets, batch: GlobalBatch):
        margin = self.adaptive_margin(self.clamped_norms(batch)).to(logits.dtype)
        rows, cols, valid, raw = target_entries(logits, targets)
        cos = unit_clamp(raw)
        with_margin = cos * torch.cos(margin) - bounded_sine(cos) * torch.sin(margin)
        target = torch.where(cos > 0, with_margin, cos)
        logits = write_targets_(logits, rows, cols, valid, target, raw)
        return logits.mul_(self.s)

    def regularizer(self, batch: GlobalBatch) -> torch.Tensor:
        a = self.clamped_norms(batch)
        g = 1 / (self.u_a**2) * a + 1 / a
        return self.lambda_g * g.mean()

    def extra_repr(self) -> str:
        return (
            f"s={self.s}, l_a={self.l_a}, u_a={self.u_a}, l_m={self.l_m}, u_m={self.u_m}, lambda_g={self.lambda_g}"
        )
