"""ElasticFace (Boutros, Damer, Kirchbuchner, Kuijper, CVPRW 2022): ArcFace / CosFace with a
margin drawn afresh for every sample at every step from N(m, std). Reference: fdbtrs/ElasticFace,
utils/losses.py (ElasticArcFace, ElasticCosFace, `plus`); defaults from its config/config.py:
Arc m=0.5 std=0.05 (Arc+ std=0.0175), Cos m=0.35 std=0.05 (Cos+ std=0.02), s=64.

  elasticface_arc:  target = cos(theta + m_i),  m_i ~ N(m, std)
  elasticface_cos:  target = cos(theta) - m_i

As in the reference the draws are not clamped (a margin may be negative), and theta + m_i
may pass pi (cos rises again: no continuation as in `combined`). cos(theta + m_i) is exact
at cos = +-1 with a bounded gradient there.

`plus=True` (ElasticFace+) sorts the margins and the target cosines and hands them out by
that order, *exactly as the reference indexes them*: with `order` the rows sorted by target
cosine, descending, and `ascending` the sorted draws, row i gets ascending[order[i]]. (The
stated intent -- the easiest row gets the smallest margin -- would be the inverse
permutation, ascending[rank of row i]; the two agree only when `order` is its own inverse.
We follow the reference, against whose outputs results are checked.)

The draws come from a CPU generator seeded with the run's seed, one per row of the *global*
batch, the same on every rank; its state is this module's extra state, so a checkpoint
carries it and a resumed run -- on any world size -- draws what the uninterrupted run would
have. Drawing on the CPU makes the margins independent of the device; the [N] draws reach
an accelerator by an asynchronous copy from pinned memory. In eval mode no draw is made:
every row gets the mean margin m.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from losses.margin import GlobalBatch, Margin, bounded_acos, target_entries, unit_clamp, write_targets_


class ElasticFaceMargin(Margin):
    """One margin per sample from N(m, std); `angular` chooses Arc (cos(theta + m)) or Cos (cos - m)."""

    def __init__(self, s: float = 64.0, m: float = 0.5, std: float = 0.05, plus: bool = False, *,
                 angular: bool = True, seed: int = 0):
        super().__init__(s)
        if not std >= 0.0:
            raise ValueError(f"std must be >= 0, got {std}")
        if not isinstance(plus, bool):
            raise ValueError(f"plus must be True or False, got {plus!r}")
        self.m, self.std, self.plus, self.angular = float(m), float(std), plus, angular
        self.name = "elasticface_arc" if angular else "elasticface_cos"
        self.needs_target_cosines = plus
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    # -- the margins of one step

    def draw(self, num_rows: int) -> torch.Tensor:
        """The next num_rows margins of the run (CPU float64), advancing the generator."""
        return torch.normal(self.m, self.std, (num_rows,), generator=self.generator, dtype=torch.float64)

    def margins_for(self, batch_rows: int, batch: GlobalBatch, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if not self.training:
            return torch.full((batch_rows,), self.m, device=device, dtype=dtype)
        margins = self.draw(batch_rows).to(dtype)
        if device.type == "cuda":
            margins = margins.pin_memory().to(device, non_blocking=True)
        else:
            margins = margins.to(device)
        if self.plus:
            margins = self.plus_assignment(margins, batch.target_cosines)
        return margins

    @staticmethod
    def plus_assignment(margins: torch.Tensor, target_cosines: torch.Tensor) -> torch.Tensor:
        """ElasticFace+'s hand-out, indexed as the reference does (see the module docstring)."""
        order = torch.sort(target_cosines.detach(), descending=True, stable=True).indices
        ascending = torch.sort(margins, stable=True).values
        return ascending[order]

    def begin_step(self, batch: GlobalBatch, num_rows, device, dtype) -> GlobalBatch:
        """Draw this step's margin of every row of the global batch."""
        return replace(batch, margins=self.margins_for(num_rows, batch, device, dtype))

    def margin_(self, logits, targets, batch: GlobalBatch):
        rows, cols, valid, raw = target_entries(logits, targets)
        margins = batch.margins.to(logits.dtype)
        if self.angular:
            target = torch.cos(bounded_acos(raw) + margins)
        else:
            target = unit_clamp(raw) - margins
        logits = write_targets_(logits, rows, cols, valid, target, raw)
        return logits.mul_(self.s)

    # -- checkpoints: the generator's state

    def get_extra_state(self) -> dict:
        return {"seed": self.seed, "generator": self.generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self.generator.set_state(state["generator"].to(torch.uint8).cpu())

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}, std={self.std}, plus={self.plus}, seed={self.seed}"
