"""The margin softmax of PartialFC computed a block of rows of the global batch at a time.

Every rank sees every embedding of the global batch, so the logits of a rank are
[N x k]: the global batch (batch per GPU x GPUs) against its k sampled centres. At 64
GPUs that is 8,192 rows; against 1.56M sampled centres per rank (1B identities, sample
rate 0.1) the logits with their gradient are 128 GB, more than the GPU holds, while the
centres and their optimizer state would fit (docs/memory.md).

A row's softmax needs only that row's logits (and the row's max and sum over the other
ranks' columns: losses/sharded_softmax.py), so the rows are taken `chunk_rows` at a time.
For each block the forward computes the cosines, the margin, the softmax, the loss and
the gradient of the loss with respect to the block's cosines, and turns that at once into
the block's share of the two gradients that are kept:

    embeddings  G_e[rows] = S_rows c            [N x D], filled block by block
    centres     G_c += S_rows^T e_rows / |w|    [k x D] float32, summed over blocks

(S the gradient of the sum of the block's row losses with respect to its cosines, c the
normalised centres). The backward only multiplies them by the incoming gradient over N (the
mean; GradScaler's scale is in the incoming gradient): the step's largest buffers are one
block's [chunk_rows x k] logits and the [k x D]
gradient, never [N x k]. The normalisation's projection of the centres' gradient,
(g - c <g, c>) / |w|, is linear in g, so it is applied once, to the sum.

The margin's state advances once per step, from the whole global batch, before the first
block (`Margin.begin_step`), and `margin_` is a rule per row (`GlobalBatch.rows`), so every
margin loss gives the loss of the unchunked head. The target cosines that CurricularFace
and ElasticFace+ read for every row are computed first, as each row's dot product with its
target centre(s), the same operands in the same precision as the matmul.

The cost: the matmuls are the same; on top, one small all-reduce of the row maxima, the
targets and the sums per block, and autograd run on each block inside the forward.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist

from losses.margin import GlobalBatch, Margin
from losses.row_chunks import normalised_rows, row_slices
from losses.sharded_softmax import is_distributed, softmax_cross_entropy_, softmax_gradient_
from losses.subcenter import class_cosines


def row_blocks(num_rows: int, chunk_rows: int) -> list[slice]:
    return [slice(i, min(i + chunk_rows, num_rows)) for i in range(0, num_rows, chunk_rows)]


def target_cosines(embeddings: torch.Tensor, centres_n: torch.Tensor, targets: torch.Tensor,
                   num_subcenters: int, distributed: bool) -> torch.Tensor:
    """[N] every row's cosine to its own class (the max over its sub-centres), float32, equal
    on every rank: each row's dot product with the centres of its target column here (0 for
    a row whose class lives on another rank), all-reduced."""
    valid = targets >= 0
    first = targets.clamp_min(0) * num_subcenters
    rows = first.unsqueeze(1) + torch.arange(num_subcenters, device=targets.device)
    centres = centres_n[rows.view(-1)].view(targets.shape[0], num_subcenters, -1).float()
    cos = torch.bmm(centres, embeddings.float().unsqueeze(2)).squeeze(2).amax(dim=1)
    # Rounded as the matmul's output is (the unchunked head reads the targets from it).
    cos = cos.to(centres_n.dtype).float().masked_fill_(~valid, 0.0)
    if distributed:
        dist.all_reduce(cos)
    return cos


class ChunkedMarginSoftmax(torch.autograd.Function):
    """Mean margin-softmax cross-entropy of the global batch, `chunk_rows` rows at a time.

    embeddings_n [N, D] normalised; weight [C, D] the shard's centres (rows `index`, or all
    with index None); norms [N] the un-normalised embeddings' norms (differentiable; None
    unless the margin needs them); targets [N] each row's column among the k classes or -1;
    batch the GlobalBatch of the margin (its norms are `norms`).
    """

    @staticmethod
    def forward(ctx, embeddings_n, weight, norms, index, targets, margin: Margin, batch: GlobalBatch,
                num_subcenters: int, low_precision, world_size: int, chunk_rows: int):
        # The matmul precision is chosen by `low_precision`, not by a caller's autocast.
        with torch.autocast(device_type=weight.device.type, enabled=False):
            grads = _forward_and_gradients(
                embeddings_n, weight, norms, index, targets, margin, batch, num_subcenters, low_precision,
                world_size, chunk_rows, need=ctx.needs_input_grad[:3],
            )
        loss, grad_emb, grad_weight, grad_norms = grads
        ctx.save_for_backward(grad_emb, grad_weight, grad_norms, index)
        ctx.weight_shape, ctx.embeddings_dtype = weight.shape, embeddings_n.dtype
        ctx.num_rows = embeddings_n.shape[0]
        ctx.used = False
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.used:
            # The kept gradients are scaled in place: a second backward would scale them twice.
            raise RuntimeError("the chunked PartialFC loss can be differentiated once per forward")
        ctx.used = True
        grad_emb, grad_weight, grad_norms, index = ctx.saved_tensors
        # The kept gradients are of the *sum* of the rows' losses (see _forward_and_gradients).
        factor = grad_output / ctx.num_rows
        out_emb = out_weight = out_norms = None
        if grad_emb is not None:
            out_emb = grad_emb.mul_(factor).to(ctx.embeddings_dtype)
        if grad_weight is not None:
            grad_weight.mul_(factor)
            out_weight = grad_weight if index is None else torch.sparse_coo_tensor(
                index.unsqueeze(0), grad_weight, ctx.weight_shape, is_coalesced=True, check_invariants=False
            )
        if grad_norms is not None:
            out_norms = grad_norms.mul_(factor)
        return out_emb, out_weight, out_norms, None, None, None, None, None, None, None, None


def _forward_and_gradients(embeddings_n, weight, norms, index, targets, margin, batch, num_subcenters,
                           low_precision, world_size, chunk_rows, need):
    """(mean loss, G_e [N x D] float32, G_c [k x D] weight dtype, G_norms [N]) with None for
    a gradient not asked for (`need`: embeddings, weight, norms).

    The gradients are those of the *sum* of the rows' losses: the mean's 1/N is applied to
    them in float32 in the backward. A block's gradient in the matmul dtype is then of a row's
    own size (|d loss_n / d logit| <= 1, times s) whatever the batch: with float16 a gradient
    divided by N = 8,192 would lose the small softmax probabilities below its range (the
    unchunked head has GradScaler's scale in that gradient; here the scale comes after).
    """
    distributed = is_distributed(world_size)
    dtype = low_precision or weight.dtype
    logits_dtype = weight.dtype if low_precision is None else torch.float32
    centres_n, inv_norm = normalised_rows(weight, index, dtype)
    emb = embeddings_n.detach().to(dtype)
    n = emb.shape[0]
    if margin.needs_target_cosines:
        batch = replace(batch, target_cosines=target_cosines(emb, centres_n, targets, num_subcenters, distributed))
    batch = margin.begin_step(batch, n, weight.device, logits_dtype)

    # (every row of the embeddings' gradient is written by its block: no zeros needed)
    grad_emb = torch.empty(emb.shape, dtype=torch.float32, device=emb.device) if need[0] else None
    grad_centres = torch.zeros(centres_n.shape, dtype=weight.dtype, device=weight.device) if need[1] else None
    want_norms = need[2] and norms is not None
    grad_norms = torch.zeros_like(norms, dtype=torch.float32) if want_norms else None
    loss_rows = torch.empty(n, dtype=logits_dtype, device=emb.device)
    # Lean pieces (losses.row_chunks): in low precision a piece's product and its float32
    # widening, which adding it to the float32 sum makes, are the accumulation's temporaries.
    pieces = row_slices(centres_n.shape[0], centres_n[0].numel() * 4, centres_n.device, lean=True)
    inv_t = inv_norm.view(1, -1)  # float32: the product is rounded once, into the gradient's dtype
    for part in row_blocks(n, chunk_rows):
        with torch.no_grad():
            raw = torch.mm(emb[part], centres_n.t())  # [rows x k] in the matmul dtype
        with torch.enable_grad():
            leaf = raw.requires_grad_()
            # The margin works in place: on a float32 copy of the low-precision matmul (as the
            # unchunked head does), on a clone of a float32 leaf.
            cos = leaf.to(logits_dtype) if leaf.dtype != logits_dtype else leaf.clone()
            cos = class_cosines(cos, num_subcenters)
            rows = batch.rows(part)
            norm_leaf = None
            if want_norms:
                norm_leaf = norms[part].detach().requires_grad_()
                rows = replace(rows, norms=norm_leaf)
            logits = margin.margin_(cos, targets[part], rows)
            softmax = logits.detach()  # the same buffer: nothing in the margin's graph keeps it
            loss, cols, valid = softmax_cross_entropy_(softmax, targets[part], distributed)
            loss_rows[part] = loss
            grad_logits = softmax_gradient_(softmax, cols, valid, 1.0)
            inputs = [leaf] + ([norm_leaf] if norm_leaf is not None else [])
            grads = torch.autograd.grad(logits, inputs, grad_logits, allow_unused=True)
        del logits, softmax, grad_logits, cos
        grad_cos = grads[0]  # [rows x k] in the matmul dtype
        if grad_norms is not None and grads[1] is not None:
            grad_norms[part] = grads[1]
        if grad_emb is not None:
            if grad_cos.dtype == grad_emb.dtype:
                torch.mm(grad_cos, centres_n, out=grad_emb[part])
            else:
                grad_emb[part] = torch.mm(grad_cos, centres_n)
        if grad_centres is not None:
            scaled = grad_cos.mul_(inv_t)  # 1/|w| on the columns: a [rows x k] pass, not [k x D]
            if scaled.dtype == grad_centres.dtype:  # the matmul accumulates into the sum itself
                grad_centres.addmm_(scaled.t(), emb[part])
            else:
                for piece in pieces:
                    grad_centres[piece].add_(torch.mm(scaled[:, piece].t(), emb[part]))
        del grad_cos, grads, raw, leaf
    if grad_centres is not None:
        # (g - c <g, c>) / |w|: the 1/|w| is already in; the projection once, on the sum, in
        # lean pieces (a piece's widened centres are its only temporary).
        for piece in pieces:
            g, c = grad_centres[piece], centres_n[piece].to(grad_centres.dtype)
            dots = torch.bmm(g.unsqueeze(1), c.unsqueeze(2)).squeeze(2)  # <g_i, c_i> without a g * c temporary
            g.addcmul_(c, dots, value=-1.0)
    return loss_rows.mean(), grad_emb, grad_centres, grad_norms
