"""Margins on cosine logits: the interface every margin implements, the pieces they share,
and the combined margin of ArcFace / CosFace.

A margin turns the cosines between the embeddings of the global batch and this rank's
class centres into the logits of the softmax: it changes each row's *target* logit
(the cosine to the row's own class) and may change the other logits, then scales
everything by s. PartialFC (losses/partial_fc.py) hands it

  logits   [N, k] cosines of the N rows of the global batch against this rank's k
           (sampled) classes, modified in place and returned: no second [N, k] matrix;
  targets  [N] the column of each row's class among these k, or -1 where the class
           lives on another rank (or was not sampled -- it always is when positive);
  batch    a `GlobalBatch`: what the margin may know about the *whole* global batch
           beyond these columns (the embedding norms, every row's target cosine).

Margins never call torch.distributed themselves: what a rule takes over "the batch"
(AdaFace's norm statistics, CurricularFace's mean target cosine, ElasticFace+'s order
of target cosines) comes from `batch`, which the head has made equal on every rank, so
every rank holds the same margin state and the loss is the single-process loss of the
global batch. A term of the loss that every rank computes identically from the whole
batch (MagFace's regulariser) is returned by `regularizer()`; the head adds it with its
gradient divided by the world size, because the all-gather's backward sums what every
rank computes for the same embedding.

The exact-forward rule: for ArcFace-style targets the forward value is exact for every
cosine in [-1, 1] (cos = 1 gives s * cos(m)); only the *gradient* of arccos (and of
sqrt(1 - cos^2)) is bounded near +-1, where the true one is infinite.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

# Beyond |cos| = 1 - 1e-6 the derivative of arccos, -1/sqrt(1 - cos^2), is held at its
# value there (about -707): finite and never zero, so an aligned target still learns.
ACOS_GRAD_EDGE = 1.0 - 1e-6
_MIN_ONE_MINUS_SQUARE = 1.0 - ACOS_GRAD_EDGE**2


class _BoundedAcos(torch.autograd.Function):
    """arccos of cos clamped to [-1, 1] (exact); the derivative bounded near +-1."""

    @staticmethod
    def forward(ctx, x):
        x = x.clamp(-1.0, 1.0)
        ctx.save_for_backward(x)
        return torch.acos(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return -grad * torch.rsqrt((1.0 - x * x).clamp_min(_MIN_ONE_MINUS_SQUARE))


class _BoundedSine(torch.autograd.Function):
    """sin(theta) = sqrt(1 - cos^2) of cos clamped to [-1, 1] (exact); the derivative
    -cos / sqrt(1 - cos^2) bounded near +-1 like arccos'."""

    @staticmethod
    def forward(ctx, x):
        x = x.clamp(-1.0, 1.0)
        ctx.save_for_backward(x)
        return torch.sqrt((1.0 - x * x).clamp_min(0.0))

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return -grad * x * torch.rsqrt((1.0 - x * x).clamp_min(_MIN_ONE_MINUS_SQUARE))


class _UnitClamp(torch.autograd.Function):
    """clamp(cos, -1, 1) with gradient 1 everywhere: a cosine outside [-1, 1] is rounding
    (a float32 matmul of unit vectors returns 1 + 1e-7), not a reason to stop learning."""

    @staticmethod
    def forward(ctx, x):
        return x.clamp(-1.0, 1.0)

    @staticmethod
    def backward(ctx, grad):
        return grad


def unit_clamp(cos: torch.Tensor) -> torch.Tensor:
    """cos clamped to [-1, 1], the gradient passed through unchanged."""
    return _UnitClamp.apply(cos)


def bounded_acos(cos: torch.Tensor) -> torch.Tensor:
    """theta = arccos(cos), exact for cos in [-1, 1] (values outside are rounding: clamped)."""
    return _BoundedAcos.apply(cos)


def bounded_sine(cos: torch.Tensor) -> torch.Tensor:
    """sin(theta) = sqrt(1 - cos^2), exact for cos in [-1, 1]."""
    return _BoundedSine.apply(cos)


class _ClampInPlace(torch.autograd.Function):
    """logits.clamp_(lo, hi) whose backward keeps a bool mask of the clamped entries.

    torch's own in-place clamp saves a float copy of the whole input for its backward;
    the mask is a quarter of that, and the gradient is the same (zero where clamped).
    """

    @staticmethod
    def forward(ctx, logits, lo, hi):
        outside = (logits < lo) | (logits > hi)
        logits.clamp_(lo, hi)
        ctx.mark_dirty(logits)
        ctx.save_for_backward(outside)
        return logits

    @staticmethod
    def backward(ctx, grad):
        (outside,) = ctx.saved_tensors
        return grad.masked_fill(outside, 0.0), None, None


def clamp_cosines_(logits: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Clamp every cosine into [lo, hi] in place (AdaFace's rule), zero gradient outside."""
    return _ClampInPlace.apply(logits, lo, hi)


@dataclass
class GlobalBatch:
    """What a margin may know about the whole global batch of N rows besides its cosine columns.

    norms           [N] float32 norms of the *un-normalised* embeddings, differentiable
                    (None unless the margin sets `needs_norms`);
    target_cosines  [N] each row's cosine to its own class (the max over sub-centres),
                    detached, equal on every rank (None unless `needs_target_cosines`);
    margins         [N] per-row margins a margin drew for this step in `begin_step`
                    (ElasticFace), None otherwise;
    world_size      ranks the batch is spread over.
    """

    norms: torch.Tensor | None = None
    target_cosines: torch.Tensor | None = None
    margins: torch.Tensor | None = None
    world_size: int = 1

    def rows(self, part: slice) -> "GlobalBatch":
        """The same batch restricted to the rows `part` (for a head that computes its logits
        a block of rows at a time: losses/chunked_logits.py)."""
        def cut(t):
            return None if t is None else t[part]

        return replace(self, norms=cut(self.norms), target_cosines=cut(self.target_cosines),
                       margins=cut(self.margins))

    @staticmethod
    def local_target_cosines(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Each row's cosine in its target column, 0 where the target is not among the columns."""
        with torch.no_grad():
            valid = targets >= 0
            return logits.gather(1, targets.clamp_min(0).unsqueeze(1)).squeeze(1).masked_fill_(~valid, 0.0)


class Margin(nn.Module):
    """Base of every margin: forward(logits, targets, batch=None) -> logits (in place).

    Subclasses implement `margin_(logits, targets, batch)`; they say what they need from
    the global batch with `needs_norms` / `needs_target_cosines`, and may add a term to
    the loss with `regularizer(batch)`. State that changes with training (running
    statistics, random draws) advances only in training mode, once per step, in
    `begin_step(batch)`, and lives in buffers or `get_extra_state`, so checkpoints carry
    it. `margin_` itself is a rule per row given the batch `begin_step` returned, so a head
    may apply it to the rows of the global batch a block at a time (`GlobalBatch.rows`).
    """

    name = "margin"
    needs_norms = False
    needs_target_cosines = False

    def __init__(self, s: float):
        super().__init__()
        if not s > 0:
            raise ValueError(f"s (the logit scale) must be positive, got {s}")
        self.s = float(s)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, batch: GlobalBatch | None = None) -> torch.Tensor:
        batch = batch if batch is not None else GlobalBatch()
        if self.needs_norms and batch.norms is None:
            raise ValueError(f"the {self.name} margin needs the embedding norms: pass GlobalBatch(norms=...)")
        if self.needs_target_cosines and batch.target_cosines is None:
            if batch.world_size > 1:
                raise ValueError(f"the {self.name} margin needs every row's target cosine of the global batch")
            batch = replace(batch, target_cosines=GlobalBatch.local_target_cosines(logits, targets))
        batch = self.begin_step(batch, targets.shape[0], logits.device, logits.dtype)
        return self.margin_(logits, targets, batch)

    def begin_step(self, batch: GlobalBatch, num_rows: int, device: torch.device, dtype: torch.dtype) -> GlobalBatch:
        """Advance the margin's state from the whole global batch of `num_rows` rows (training
        mode only) and return the batch that `margin_` reads: called once per step, before
        the margin is applied to any row."""
        return batch

    def margin_(self, logits: torch.Tensor, targets: torch.Tensor, batch: GlobalBatch) -> torch.Tensor:
        """The margin of these rows, in place; no state changes here (see `begin_step`)."""
        raise NotImplementedError

    def regularizer(self, batch: GlobalBatch) -> torch.Tensor | None:
        """A term added to the mean cross-entropy (computed from the whole global batch), or None."""
        return None


def target_entries(logits: torch.Tensor, targets: torch.Tensor):
    """(rows, cols, valid, target cosines [N]) of each row's target column.

    Every row's entry is gathered and later written back with rows without a target here
    (-1) masked: selecting those rows instead would make the host wait for the device.
    """
    valid = targets >= 0
    rows = torch.arange(targets.shape[0], device=targets.device)
    cols = targets.clamp_min(0)
    return rows, cols, valid, logits[rows, cols]


def write_targets_(logits, rows, cols, valid, new_target, old_target) -> torch.Tensor:
    """Write the new target logits where a row has its target here; the others keep theirs."""
    return logits.index_put_((rows, cols), torch.where(valid, new_target, old_target))


class CombinedMarginLoss(Margin):
    """Apply cos(m1*theta + m2) - m3 to the target logits and scale all logits by s.

    ArcFace is (1, 0.5, 0), CosFace (1, 0, 0.4), SphereFace-like margins use m1 > 1.

    With interclass_filtering_threshold > 0, negative logits above the threshold are
    set to 0 (the Partial FC paper's inter-class conflict filtering); a row's own
    class is never filtered.

    Beyond theta_max = (pi - m2) / m1 the angle m1*theta + m2 would pass pi and cos()
    would rise again, rewarding a *worse* embedding. There the target logit continues
    linearly in cos(theta) from its value at theta_max, which keeps it continuous and
    monotonic. (insightface lets it rise; CurricularFace and MagFace switch to
    cos - m*sin(m); ElasticFace lets it rise: the references disagree, and this choice
    is kept for `combined`.)

    The forward is exact for every cosine in [-1, 1]; only the gradient of arccos is
    bounded near +-1 (see `bounded_acos`).
    """

    name = "combined"

    def __init__(self, s: float, m1: float, m2: float, m3: float, interclass_filtering_threshold: float = 0.0):
        super().__init__(s)
        if not m1 > 0:
            raise ValueError(f"m1 (multiplicative angular margin) must be positive, got {m1}")
        self.m1 = float(m1)
        self.m2 = float(m2)
        self.m3 = float(m3)
        self.interclass_filtering_threshold = float(interclass_filtering_threshold)
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
        theta = bounded_acos(cos_theta)
        with_margin = torch.cos(self.m1 * theta + self.m2) - self.m3
        continuation = self.target_at_theta_max + (cos_theta - self.cos_theta_max)
        return torch.where(theta <= self.theta_max, with_margin, continuation)

    def margin_(self, logits, targets, batch):
        valid = targets >= 0
        if self.interclass_filtering_threshold > 0:
            rows, cols = torch.arange(targets.shape[0], device=targets.device), targets.clamp_min(0)
            with torch.no_grad():
                dirty = logits > self.interclass_filtering_threshold
                dirty[rows, cols] &= ~valid  # never a row's own class
            logits = logits.masked_fill_(dirty, 0.0)
        if not self.is_plain_softmax:
            rows, cols, valid, cos_theta = target_entries(logits, targets)
            logits = write_targets_(logits, rows, cols, valid, self.target_logit(cos_theta), cos_theta)
        return logits.mul_(self.s)

    def extra_repr(self) -> str:
        return (
            f"s={self.s}, m1={self.m1}, m2={self.m2}, m3={self.m3}, "
            f"interclass_filtering_threshold={self.interclass_filtering_threshold}"
        )
