"""AdaFace (Kim, Jain, Liu, CVPR 2022): a margin that adapts to image quality, read from the
embedding norm. Reference: mk-minchul/AdaFace, head.py (class AdaFace); defaults from its
README / main.py (m=0.4, h=0.333, s=64, t_alpha=0.01).

For a row with embedding norm n and target angle theta:

  scaler = clip(h * (n - mean) / (std + 1e-3), -1, 1)
  target = cos(clip(theta - m * scaler, 1e-3, pi - 1e-3)) - (m + m * scaler)

(high-quality, large-norm rows get an ArcFace-like angular margin, low-quality ones a
CosFace-like additive one). As in the reference:
  - every cosine, not only the target, is clamped to [-1 + 1e-3, 1 - 1e-3] first;
  - the norms are clipped to [0.001, 100] and detached (no gradient through the margin);
  - `batch_mean` / `batch_std` (the *unbiased* std of the clipped norms) follow an EMA with
    weight t_alpha, updated *before* use; they start at 20 and 100.
Distributed: mean and std are taken over the norms of the whole global batch (the head
gathers the embeddings), so every rank holds the same statistics. They advance only in
training mode (the reference has no eval mode: it updates on every call).
"""
from __future__ import annotations

import math

import torch

from losses.margin import GlobalBatch, Margin, bounded_acos, clamp_cosines_, target_entries, write_targets_

_EPS = 1e-3  # the reference's one epsilon: cosine clamp, std offset, angle clip
_NORM_MIN, _NORM_MAX = 0.001, 100.0


class AdaFaceMargin(Margin):
    name = "adaface"
    needs_norms = True

    def __init__(self, s: float = 64.0, m: float = 0.4, h: float = 0.333, t_alpha: float = 0.01):
        super().__init__(s)
        if not 0.0 <= m < math.pi:
            raise ValueError(f"m must be in [0, pi), got {m}")
        if not h >= 0.0:
            raise ValueError(f"h must be >= 0, got {h}")
        if not 0.0 < t_alpha <= 1.0:
            raise ValueError(f"t_alpha must be in (0, 1], got {t_alpha}")
        self.m, self.h, self.t_alpha = float(m), float(h), float(t_alpha)
        self.register_buffer("batch_mean", torch.tensor(20.0))
        self.register_buffer("batch_std", torch.tensor(100.0))

    def update_statistics(self, norms: torch.Tensor) -> None:
        """EMA of the batch's mean and unbiased std of the clipped norms (a whole global batch)."""
        with torch.no_grad():
            safe = norms.detach().to(self.batch_mean.dtype).clamp(_NORM_MIN, _NORM_MAX)
            mean, std = safe.mean(), safe.std()
            self.batch_mean.copy_(mean * self.t_alpha + (1 - self.t_alpha) * self.batch_mean)
            self.batch_std.copy_(std * self.t_alpha + (1 - self.t_alpha) * self.batch_std)

    def begin_step(self, batch: GlobalBatch, num_rows, device, dtype) -> GlobalBatch:
        if self.training:
            self.update_statistics(batch.norms)
        return batch

    def margin_(self, logits, targets, batch: GlobalBatch):
        logits = clamp_cosines_(logits, -1 + _EPS, 1 - _EPS)
        safe = batch.norms.detach().to(logits.dtype).clamp(_NORM_MIN, _NORM_MAX)
        mean, std = self.batch_mean.to(logits.dtype), self.batch_std.to(logits.dtype)
        scaler = ((safe - mean) / (std + _EPS) * self.h).clamp(-1.0, 1.0)

        rows, cols, valid, cos = target_entries(logits, targets)
        theta = (bounded_acos(cos) - self.m * scaler).clamp(_EPS, math.pi - _EPS)
        target = torch.cos(theta) - (self.m + self.m * scaler)
        logits = write_targets_(logits, rows, cols, valid, target, cos)
        return logits.mul_(self.s)

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}, h={self.h}, t_alpha={self.t_alpha}"
