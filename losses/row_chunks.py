"""Splitting row-wise work on a large [rows x D] matrix into pieces.

Element-wise work on a [k x D] matrix of sampled class centres (k up to hundreds of
thousands) would allocate [k x D] temporaries for every intermediate result. Done
piece by piece, the temporaries are bounded by one piece. The pieces are not made
small: on a CPU every operation is a parallel region whose threads must all arrive,
which costs most when other processes share the cores, and on an accelerator every
operation is a kernel launch.
"""
from __future__ import annotations

import torch

CPU_CHUNK_BYTES = 32 * 1024 * 1024
ACCELERATOR_CHUNK_BYTES = 1024 * 1024 * 1024
# Where memory is the point (the class centres' bfloat16 state, whose gradient is never a
# [k x D] matrix: losses.row_gradient), pieces are smaller: a piece's few float32
# temporaries are then small against the [batch x k] logits.
LEAN_CPU_CHUNK_BYTES = 4 * 1024 * 1024
LEAN_ACCELERATOR_CHUNK_BYTES = 64 * 1024 * 1024


def row_slices(num_rows: int, row_bytes: int, device: torch.device, lean: bool = False) -> list[slice]:
    """Consecutive slices covering range(num_rows), each about one chunk's worth of bytes
    (a lean chunk's with `lean`)."""
    if lean:
        budget = LEAN_CPU_CHUNK_BYTES if device.type == "cpu" else LEAN_ACCELERATOR_CHUNK_BYTES
    else:
        budget = CPU_CHUNK_BYTES if device.type == "cpu" else ACCELERATOR_CHUNK_BYTES
    step = max(1, budget // max(1, row_bytes))
    return [slice(i, min(i + step, num_rows)) for i in range(0, num_rows, step)]


# F.normalize's eps: a centre of norm below it is divided by eps instead.
NORM_EPS = 1e-12


def normalised_rows(weight: torch.Tensor, index: torch.Tensor | None, dtype: torch.dtype):
    """(centres [k x D] in `dtype`, inv_norm [k x 1] in the weight's dtype): the rows `index`
    of `weight` (all of it when None) divided by their norms, and 1 / those norms.

    Gathered, normed and scaled (and cast) piece by piece: the float32 rows of a piece are
    the only copy of the centres besides the result.
    """
    k = weight.shape[0] if index is None else index.numel()
    centres_n = torch.empty((k, weight.shape[1]), dtype=dtype, device=weight.device)
    inv_norm = torch.empty((k, 1), dtype=weight.dtype, device=weight.device)
    for part in row_slices(k, weight[0].numel() * weight.element_size(), weight.device):
        rows = weight[part] if index is None else weight.index_select(0, index[part])
        torch.linalg.vector_norm(rows, dim=1, keepdim=True, out=inv_norm[part])
        inv_norm[part].clamp_min_(NORM_EPS).reciprocal_()
        torch.mul(rows, inv_norm[part], out=centres_n[part])
    return centres_n, inv_norm
