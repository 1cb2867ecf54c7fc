"""Sub-center ArcFace (Deng, Guo, Liu, Zafeiriou, ECCV 2020): K centres per class.

Layout (as insightface's mxnet `subcenter_arcface` and pytorch-metric-learning's
SubCenterArcFaceLoss): the centre matrix has K rows per class, class-major, so sub-centre
k of (local) class c is row c*K + k. A sample's cosine to a class is the largest of its
cosines to the class's K sub-centres, and only that arg-max sub-centre gets a gradient.
Every margin then works on these per-class cosines unchanged.

The paper's second step -- find the samples far from their class's *dominant* sub-centre
(the one most of the class's samples are closest to), which are likely label noise --
is `dominant_subcentres` + `angles_to_dominant` here, and tools/subcenter_noise.py on a
checkpoint and its data set.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Sub-centre arg-max indices are kept as uint8 between forward and backward (an int64
# index would take 8x the memory of the [batch x classes] it belongs to).
MAX_SUBCENTERS = 255


class _SubcenterMax(torch.autograd.Function):
    """[N, k*K] cosines against the sub-centres -> [N, k] per-class maxima; the backward
    routes each gradient to its arg-max sub-centre only."""

    @staticmethod
    def forward(ctx, cosines, num_subcenters):
        n = cosines.shape[0]
        values, index = cosines.view(n, -1, num_subcenters).max(dim=2)
        ctx.save_for_backward(index.to(torch.uint8))
        ctx.num_subcenters = num_subcenters
        return values

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        n, k = grad.shape
        full = grad.new_zeros((n, k, ctx.num_subcenters))
        full.scatter_(2, index.long().unsqueeze(2), grad.unsqueeze(2))
        return full.view(n, k * ctx.num_subcenters), None


def class_cosines(cosines: torch.Tensor, num_subcenters: int) -> torch.Tensor:
    """Per-class cosines from sub-centre cosines [N, k*K] (class-major columns)."""
    if num_subcenters == 1:
        return cosines
    return _SubcenterMax.apply(cosines, num_subcenters)


def subcenter_rows(class_index: torch.Tensor, num_subcenters: int) -> torch.Tensor:
    """The centre rows (sorted) of the classes `class_index` (sorted): c*K + k for k < K."""
    if num_subcenters == 1:
        return class_index
    offsets = torch.arange(num_subcenters, device=class_index.device, dtype=class_index.dtype)
    return (class_index.unsqueeze(1) * num_subcenters + offsets).reshape(-1)


# --- the noise-cleaning step -------------------------------------------------------------

def own_class_cosines(
    embeddings: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, num_subcenters: int
) -> torch.Tensor:
    """[B, K] cosines of each embedding to the K sub-centres of its own class.

    `weight` is the merged centre matrix [num_classes * K, D] (class-major).
    """
    centres = F.normalize(weight.float(), dim=1).view(-1, num_subcenters, weight.shape[1])[labels]
    return torch.bmm(centres, F.normalize(embeddings.float(), dim=1).unsqueeze(2)).squeeze(2)


def dominant_subcentres(
    nearest: torch.Tensor, labels: torch.Tensor, num_classes: int, num_subcenters: int
) -> torch.Tensor:
    """[num_classes] the sub-centre that most of each class's samples are nearest to (ties:
    the lowest index; a class without samples: 0)."""
    counts = torch.zeros(num_classes * num_subcenters, dtype=torch.int64)
    counts.index_add_(0, labels * num_subcenters + nearest, torch.ones_like(labels))
    return counts.view(num_classes, num_subcenters).argmax(dim=1)


def angles_to_dominant(cosines: torch.Tensor, labels: torch.Tensor, dominant: torch.Tensor) -> torch.Tensor:
    """[B] angle in degrees between each sample and its class's dominant sub-centre."""
    cos = cosines.gather(1, dominant[labels].unsqueeze(1)).squeeze(1).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.acos(cos))


PAPER_NOISE_ANGLE = 75.0  # degrees: the paper drops samples farther than this from the dominant sub-centre
