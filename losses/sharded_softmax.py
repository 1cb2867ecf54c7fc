"""The softmax cross-entropy of rows whose classes are split across ranks, in place.

A rank holds the logits of its own columns (classes) for every row of the global batch;
a row's softmax needs its maximum and its sum of exponentials over *all* columns, so both
are all-reduced (the maximum first, for a stable exp). Each row's target logit lives on
exactly one rank (-1 elsewhere), and one all_reduce gives every rank every row's target.

Used by PartialFC on its whole [N x k] logits at once (losses/partial_fc.py) and by the
head that computes them a block of rows at a time (losses/chunked_logits.py): the
collectives are per row, so blocks of rows give the same result.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed(world_size: int) -> bool:
    return world_size > 1 and dist.is_available() and dist.is_initialized()


def softmax_cross_entropy_(logits: torch.Tensor, labels: torch.Tensor, distributed: bool):
    """Turn `logits` [n, k] into the rows' softmax over all ranks' columns, in place.

    labels [n]: the target column on this rank or -1. Returns (loss [n], cols, valid):
    each row's -log softmax(target), and what `softmax_gradient_` needs.
    """
    # Masked gather rather than selecting the rows that have a target here: no host sync.
    valid = labels >= 0
    cols = labels.clamp_min(0).unsqueeze(1)
    target = logits.gather(1, cols).squeeze(1).masked_fill_(~valid, 0.0)

    row_max = logits.max(dim=1, keepdim=True).values
    if distributed:
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX)
        dist.all_reduce(target)  # each row's target lives on exactly one rank
    logits.sub_(row_max).exp_()
    sum_exp = logits.sum(dim=1, keepdim=True)
    if distributed:
        dist.all_reduce(sum_exp)
    logits.div_(sum_exp)
    # -log softmax(target) = log(sum exp) + max - target: exact, no clamping of tiny
    # probabilities (which is where insightface's loss of 69.0776 comes from).
    loss = (sum_exp.log() + row_max).squeeze(1) - target
    return loss, cols, valid


def softmax_gradient_(softmax: torch.Tensor, cols: torch.Tensor, valid: torch.Tensor, scale) -> torch.Tensor:
    """d (scale * sum of the rows' losses) / d logits = scale * (softmax - onehot), in the
    softmax's buffer."""
    softmax.scatter_add_(1, cols, valid.to(softmax.dtype).unsqueeze(1).neg_())
    return softmax.mul_(scale)
