"""PartialFC: a margin-softmax classification head whose class centres are sharded across ranks.

Each rank holds the centres of a contiguous class range (the same split as
insightface, so its per-rank `weight` shards are interchangeable with ours). The
embeddings and labels of the whole global batch are all-gathered, every rank
computes the cosine logits against its own centres, and the softmax
cross-entropy is computed across shards with an all_reduce of the row maxima and
of the exponential sums. Nothing of size [batch x all classes] ever exists on
one rank.

With sample_rate < 1 each rank keeps every class that occurs in the global batch
plus random negatives, up to sample_rate * num_local centres (Partial FC, An et
al.). Only those rows are gathered, they receive a *sparse* row gradient, and the
optimizer (losses.optim) updates only them -- no dense gradient or optimizer work
over the whole shard.

With sample_rate = 1 a step never waits for the device (no data-dependent shapes);
sampling must read the number of distinct positive classes, one device-to-host read.

The margin (losses.margin.Margin: combined/ArcFace/CosFace, AdaFace, MagFace,
CurricularFace, ElasticFace) is applied to this rank's cosine columns in place. This
module is the one place of collective communication for the loss, so it also hands the
margin what the margin's rule takes over the whole global batch (`GlobalBatch`): the
norms of the gathered, un-normalised embeddings, and every row's target cosine, one
all_reduce of N values (each row's target lives on exactly one rank). Both are equal on
every rank, so margin state (AdaFace's norm statistics, CurricularFace's t, ElasticFace's
draws) stays equal on every rank and the loss is the single-process loss of the global
batch. A regulariser every rank computes from the whole batch (MagFace's) gets its
gradient divided by the world size: the all-gather's backward sums the ranks' gradients.

With logits_chunk_rows = c (0 < c < N) the cosines, margin, softmax and both gradients are
computed c rows of the global batch at a time in the forward (losses/chunked_logits.py): the
[N x k] logits never exist, which at 64 GPUs is what decides how many identities fit.

With num_subcenters = K (sub-center ArcFace) `weight` holds K rows per class, row c*K + k
for sub-centre k of local class c; a class's cosine is the max over its sub-centres
(losses.subcenter), and sampling keeps or drops a class's K rows together.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from losses.chunked_logits import ChunkedMarginSoftmax
from losses.margin import GlobalBatch, Margin
from losses.row_chunks import NORM_EPS, normalised_rows, row_slices
from losses.row_gradient import DeferredRowGradient, RowGradientSink, embedding_gradient
from losses.sharded_softmax import is_distributed, softmax_cross_entropy_, softmax_gradient_
from losses.subcenter import MAX_SUBCENTERS, class_cosines, subcenter_rows


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """(class_start, num_local) of `rank`: the first C % W ranks get one extra class."""
    num_local = num_classes // world_size + int(rank < num_classes % world_size)
    class_start = num_classes // world_size * rank + min(rank, num_classes % world_size)
    return class_start, num_local


_distributed = is_distributed


class _GatherEmbeddings(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums the gradients of all ranks and
    returns this rank's slice multiplied by the world size.

    The multiplication is what makes DDP's *averaging* of the backbone gradients
    come out as the gradient of the mean loss over the global batch: every rank's
    backbone only sees its own samples, so their gradients must be summed, not
    averaged.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, world_size: int, rank: int) -> torch.Tensor:
        ctx.world_size, ctx.rank, ctx.local_batch = world_size, rank, tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        b = ctx.local_batch
        if dist.get_backend() == "nccl":
            out = torch.empty((b, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(out, grad)
        else:  # gloo has no reduce_scatter: reduce everything, keep our slice
            dist.all_reduce(grad)
            out = grad[ctx.rank * b : (ctx.rank + 1) * b]
        return out * ctx.world_size, None, None


def _gather_labels(labels: torch.Tensor, world_size: int) -> torch.Tensor:
    parts = [torch.empty_like(labels) for _ in range(world_size)]
    dist.all_gather(parts, labels.contiguous())
    return torch.cat(parts, dim=0)


class _ShardedSoftmaxCrossEntropy(torch.autograd.Function):
    """Mean softmax cross-entropy over a batch whose classes are split across ranks.

    `logits` [N, k] are this rank's columns; `labels` [N] the target column on this
    rank or -1. The logits buffer is turned into the softmax in place and reused
    for the gradient, so the step holds one [N, k] matrix instead of three.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, world_size: int) -> torch.Tensor:
        loss, cols, valid = softmax_cross_entropy_(logits, labels, _distributed(world_size))
        # autograd requires a tensor modified in place to be returned; the softmax is
        # returned as a second, non-differentiable output.
        ctx.mark_dirty(logits)
        ctx.mark_non_differentiable(logits)
        # The softmax gets no gradient: no [N, k] zeros are made for it in the backward.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(logits, cols, valid)
        return loss.mean(), logits

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor, _grad_softmax: torch.Tensor | None = None):
        softmax, cols, valid = ctx.saved_tensors
        # reuse the buffer: d loss / d logits = (softmax - onehot) / N
        grad = softmax_gradient_(softmax, cols, valid, grad_output / softmax.shape[0])
        return grad, None, None


class _CosineLogits(torch.autograd.Function):
    """cos(embedding, centre) for every embedding and the centres `weight[index]`
    (all of `weight` when index is None), with a lean backward.

    Autograd through F.normalize + F.linear would keep the gathered rows, their norms
    and the normalised copy, and its division backward makes several [k x D] temporaries.
    Here the step holds one normalised [k x D] copy of the centres (in the matmul
    precision) and one float32 [k x D] gradient, projected in place:
    d/dw (w/|w|) applied to g is (g - w_n <g, w_n>) / |w|.

    With `index`, the centre gradient is returned as a coalesced sparse row tensor over
    exactly those rows (the index is sorted and unique), so the optimizer updates only
    them and nothing of the size of the whole shard is allocated.
    """

    @staticmethod
    def forward(ctx, embeddings_n, weight, index, low_precision, sink=None):
        # The matmul precision is chosen by `low_precision`, not by a caller's autocast.
        with torch.autocast(device_type=weight.device.type, enabled=False):
            return _CosineLogits._forward(ctx, embeddings_n, weight, index, low_precision, sink)

    @staticmethod
    def _forward(ctx, embeddings_n, weight, index, low_precision, sink):
        if sink is not None:
            return _CosineLogits._lean_forward(ctx, embeddings_n, weight, index, low_precision, sink)
        dtype = low_precision or weight.dtype
        centres_n, inv_norm = normalised_rows(weight, index, dtype)
        emb = embeddings_n.to(dtype)
        cosines = torch.mm(emb, centres_n.t())
        # In low precision, for a batch smaller than the embedding size, the matmul's own
        # output is kept: it gives the backward <g, w_n> from the [batch x k] matrices,
        # less to read than the [k x D] ones (see backward).
        keep = low_precision is not None and emb.shape[0] < emb.shape[1]
        saved_cosines = cosines if keep else None
        ctx.sink = None
        ctx.save_for_backward(emb, centres_n, inv_norm, index, saved_cosines)
        ctx.weight_shape, ctx.weight_dtype = weight.shape, weight.dtype
        ctx.embeddings_dtype = embeddings_n.dtype
        return cosines if low_precision is None else cosines.float()

    @staticmethod
    def _lean_forward(ctx, embeddings_n, weight, index, low_precision, sink):
        """The forward for a gradient taken as factors (see _deferred_backward): the same
        cosines, bit for bit, computed piece by piece (lean pieces, losses.row_chunks), so that
        no normalised copy of all sampled centres exists; the backward and the optimizer take
        the rows from the weight again."""
        dtype = low_precision or weight.dtype
        k = index.numel()
        emb = embeddings_n.to(dtype)
        cosines = torch.empty((emb.shape[0], k), dtype=dtype, device=weight.device)
        inv_norm = torch.empty((k, 1), dtype=weight.dtype, device=weight.device)
        for part in row_slices(k, weight[0].numel() * weight.element_size(), weight.device, lean=True):
            rows = weight.index_select(0, index[part])
            torch.linalg.vector_norm(rows, dim=1, keepdim=True, out=inv_norm[part])
            inv_norm[part].clamp_min_(NORM_EPS).reciprocal_()
            centres_n = torch.empty(rows.shape, dtype=dtype, device=rows.device)
            torch.mul(rows, inv_norm[part], out=centres_n)
            del rows
            cosines[:, part] = torch.mm(emb, centres_n.t())
        keep = low_precision is not None and emb.shape[0] < emb.shape[1]
        ctx.sink = sink
        ctx.save_for_backward(emb, weight, inv_norm, index, cosines if keep else None)
        ctx.weight_shape, ctx.weight_dtype = weight.shape, weight.dtype
        ctx.embeddings_dtype = embeddings_n.dtype
        return cosines if low_precision is None else cosines.float()

    @staticmethod
    def backward(ctx, grad_logits):
        if ctx.sink is not None:
            return _CosineLogits._deferred_backward(ctx, grad_logits)
        emb, centres_n, inv_norm, index, cosines = ctx.saved_tensors
        grad_emb = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_emb = torch.mm(grad_logits.to(centres_n.dtype), centres_n).to(ctx.embeddings_dtype)
        if ctx.needs_input_grad[1]:
            # The centres' gradient (g - w_n <g, w_n>) / |w| with g = grad^T e, built piece by
            # piece in one buffer of the weight's dtype. 1/|w| is applied to grad's columns
            # before the matmul (a [batch x k] pass instead of one over [k x D]).
            inv_t = inv_norm.view(1, -1)
            scaled = torch.empty(grad_logits.shape, dtype=centres_n.dtype, device=grad_logits.device)
            torch.mul(grad_logits, inv_t, out=scaled)
            grad = torch.empty(centres_n.shape, dtype=ctx.weight_dtype, device=centres_n.device)
            for part in row_slices(grad.shape[0], grad[0].numel() * grad.element_size(), grad.device):
                g, c = grad[part], centres_n[part]
                if c.dtype == g.dtype:
                    torch.mm(scaled[:, part].t(), emb, out=g)
                else:
                    g.copy_(torch.mm(scaled[:, part].t(), emb))
                if cosines is not None:
                    # <g_i, w_n,i> = sum_n grad[n, i] <e_n, w_n,i> = sum_n grad[n, i] cos[n, i]
                    dot = torch.mul(grad_logits[:, part], cosines[:, part]).sum(dim=0).unsqueeze(1)
                    dot = dot.to(g.dtype).mul_(inv_norm[part])
                else:
                    dot = (g * c).sum(dim=1, keepdim=True)
                g.addcmul_(c, dot, value=-1.0)
            if index is None:
                grad_weight = grad
            else:
                grad_weight = torch.sparse_coo_tensor(
                    index.unsqueeze(0), grad, ctx.weight_shape, is_coalesced=True, check_invariants=False
                )
        return grad_emb, grad_weight, None, None, None

    @staticmethod
    def _deferred_backward(ctx, grad_logits):
        """The backward for a weight whose optimizer takes the sampled rows' gradient as
        factors (losses.row_gradient): no [k x D] buffer besides one piece of rows.

        Same products as the materialised backward, with 1/|w| applied to the logits'
        gradient before either matmul: the embeddings' gradient is S w (S = grad / |w|),
        summed over pieces of rows in float32.
        """
        emb, weight, inv_norm, index, cosines = ctx.saved_tensors
        scaled = torch.empty(grad_logits.shape, dtype=emb.dtype, device=grad_logits.device)
        inv_t = inv_norm.view(1, -1)
        columns = row_slices(index.numel(), grad_logits.shape[0] * grad_logits.element_size(), grad_logits.device,
                             lean=True)
        for part in columns:  # (a cast into `out` goes through a temporary of the product's size)
            torch.mul(grad_logits[:, part], inv_t[:, part], out=scaled[:, part])
        grad_emb = None
        if ctx.needs_input_grad[0]:
            grad_emb = embedding_gradient(scaled, weight, index, ctx.embeddings_dtype)
        if ctx.needs_input_grad[1]:
            projections = None
            if cosines is not None:
                # <g_i, w_n,i> from the [batch x k] matrices, as the materialised backward does.
                projections = torch.empty_like(inv_norm)
                for part in columns:
                    dot = torch.mul(grad_logits[:, part], cosines[:, part]).sum(dim=0).unsqueeze(1)
                    torch.mul(dot.to(inv_norm.dtype), inv_norm[part], out=projections[part])
            ctx.sink.add(DeferredRowGradient(index, scaled, emb, inv_norm, projections))
        return grad_emb, None, None, None, None


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by `factor`."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


class PartialFC(nn.Module):
    """Model-parallel margin-softmax head.

    forward(local_embeddings [B, D], local_labels [B]) -> scalar loss, the mean over
    the global batch of B * world_size samples (equal on every rank), plus the
    margin's regulariser if it has one. The embeddings are not normalised.

    `weight` [num_local * num_subcenters, D] holds this rank's centres, classes
    [class_start, class_start + num_local). rank/world_size default to the
    initialised process group (or 0/1 without one). The margin's state is part of
    this module's state_dict (`margin_loss.*`).
    """

    def __init__(
        self,
        margin_loss: Margin,
        embedding_size: int,
        num_classes: int,
        sample_rate: float = 1.0,
        *,
        num_subcenters: int = 1,
        matmul_dtype: torch.dtype | None = None,
        logits_chunk_rows: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        check_labels: bool = True,
    ):
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if world_size is None:
            world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if world_size > 1 else 0
        if num_classes < world_size:
            raise ValueError(f"num_classes ({num_classes}) must be at least the world size ({world_size})")
        integer = isinstance(num_subcenters, int) and not isinstance(num_subcenters, bool)
        if not integer or not 1 <= num_subcenters <= MAX_SUBCENTERS:
            raise ValueError(f"num_subcenters must be an integer in [1, {MAX_SUBCENTERS}], got {num_subcenters!r}")
        self.margin_loss = margin_loss
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.sample_rate = float(sample_rate)
        # The precision of the cosine matmul: the run's autocast dtype (utils.amp decides it),
        # None for the centres' own float32. The margin and the softmax always run in float32.
        self.matmul_dtype = matmul_dtype
        self.rank, self.world_size = rank, world_size
        integer = isinstance(logits_chunk_rows, int) and not isinstance(logits_chunk_rows, bool)
        if not integer or logits_chunk_rows < 0:
            raise ValueError(f"logits_chunk_rows must be an integer >= 0 (0: all rows at once), got {logits_chunk_rows!r}")
        # Rows of the global batch whose logits exist at once; 0: all of them.
        self.logits_chunk_rows = logits_chunk_rows
        self.check_labels = check_labels
        self.class_start, self.num_local = shard_range(num_classes, rank, world_size)
        self.num_subcenters = num_subcenters
        self.num_sample = max(1, int(self.sample_rate * self.num_local))  # classes (each with its K rows)
        self.weight = nn.Parameter(torch.normal(0.0, 0.01, (self.num_local * num_subcenters, embedding_size)))

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, rank={self.rank}, "
            f"world_size={self.world_size}, class_start={self.class_start}, num_local={self.num_local}, "
            f"sample_rate={self.sample_rate}, num_subcenters={self.num_subcenters}"
            + (f", logits_chunk_rows={self.logits_chunk_rows}" if self.logits_chunk_rows else "")
        )

    def shard_metadata(self) -> dict:
        """What a checkpoint records beside this rank's state_dict (its `partial_fc` entry,
        read by losses/reshard.py to move rows between world sizes)."""
        return {
            "class_start": self.class_start, "num_local": self.num_local, "num_classes": self.num_classes,
            "embedding_size": self.embedding_size, "num_subcenters": self.num_subcenters,
            "loss": self.margin_loss.name,
        }

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """nn.Module.load_state_dict; with strict=True a head that does not fit (another
        loss's margin state, another number of sub-centres) is a one-line CheckpointError."""
        if strict:
            problem = self._mismatch(state_dict)
            if problem:
                from utils.checkpoint import CheckpointError

                raise CheckpointError(f"the checkpoint's PartialFC head does not fit this run: {problem}")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _mismatch(self, state_dict) -> str | None:
        expected = self.state_dict(keep_vars=True)
        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in state_dict if k not in expected]
        if missing or unexpected:
            margin_only = all(k.startswith("margin_loss.") for k in missing + unexpected)
            why = (
                f": it was saved with another loss than this run's {self.margin_loss.name!r} (margin state lives "
                f"under margin_loss.*); resume with the loss it was trained with, or start a new run from "
                f"pretrained / pretrained_fc" if margin_only else ""
            )
            return f"missing {missing or 'nothing'}, unexpected {unexpected or 'nothing'}{why}"
        weight = state_dict.get("weight")
        if isinstance(weight, torch.Tensor) and tuple(weight.shape) != tuple(self.weight.shape):
            rows = weight.shape[0]
            per_class = f"{rows // self.num_local} sub-centres per class" if rows % self.num_local == 0 else f"{rows} rows"
            return (
                f"weight {tuple(weight.shape)} ({per_class}), this run expects {tuple(self.weight.shape)} "
                f"({self.num_local} classes x num_subcenters={self.num_subcenters}, embedding_size={self.embedding_size})"
            )
        return None

    def _validate_labels(self, labels: torch.Tensor) -> None:
        bad = (labels < 0) | (labels >= self.num_classes)
        if bool(bad.any()):
            value = int(labels[bad][0])
            raise ValueError(
                f"label {value} is outside [0, num_classes={self.num_classes}): the data set has more "
                f"classes than the config's num_classes, or a corrupt label"
            )

    def sample(self, local_targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Choose the centres to use this step: all positives plus random negatives.

        local_targets [N]: shard-local class index or -1. Returns (sorted local class
        indices, targets remapped to positions in that index, -1 kept); with sub-centres
        the rows of `weight` are those classes' K rows each (losses.subcenter.subcenter_rows).
        """
        positive = torch.unique(local_targets[local_targets >= 0], sorted=True)
        if positive.numel() >= self.num_sample:
            index = positive
        else:
            scores = torch.rand(self.num_local, device=local_targets.device)
            scores[positive] = 2.0  # above any random score: positives are always kept
            chosen = torch.topk(scores, k=self.num_sample, sorted=False).indices
            # Sorted through a mask: much cheaper than sorting 10^5 indices on a CPU.
            mask = torch.zeros(self.num_local, dtype=torch.bool, device=local_targets.device)
            index = mask.index_fill_(0, chosen, True).nonzero().squeeze(1)
        hit = local_targets >= 0
        remapped = torch.where(hit, torch.searchsorted(index, local_targets.clamp_min(0)), local_targets)
        return index, remapped

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        local_labels = local_labels.view(-1).long()
        if local_embeddings.shape[0] != local_labels.shape[0]:
            raise ValueError(
                f"got {local_embeddings.shape[0]} embeddings but {local_labels.shape[0]} labels"
            )
        if _distributed(self.world_size):
            embeddings = _GatherEmbeddings.apply(local_embeddings, self.world_size, self.rank)
            labels = _gather_labels(local_labels, self.world_size)
        else:
            embeddings, labels = local_embeddings, local_labels
        if self.check_labels:
            self._validate_labels(labels)

        local_targets = labels - self.class_start
        on_this_rank = (local_targets >= 0) & (local_targets < self.num_local)
        local_targets = torch.where(on_this_rank, local_targets, torch.full_like(local_targets, -1))

        rows = None
        if self.sample_rate < 1.0:
            index, local_targets = self.sample(local_targets)
            rows = subcenter_rows(index, self.num_subcenters)

        if self.logits_chunk_rows and embeddings.shape[0] > self.logits_chunk_rows:
            # A block of rows at a time (losses/chunked_logits.py): no [N x k] logits.
            batch = self._global_batch(embeddings, None, local_targets)
            loss = ChunkedMarginSoftmax.apply(
                F.normalize(embeddings), self.weight, batch.norms, rows, local_targets, self.margin_loss, batch,
                self.num_subcenters, self.matmul_dtype, self.world_size, self.logits_chunk_rows,
            )
        else:
            # An optimizer that materialises the sampled rows' gradient itself (losses.optim, with
            # bfloat16 state) takes it as factors: the step then holds no [k x D] gradient.
            sink = RowGradientSink.of(self.weight) if rows is not None else None
            cosines = _CosineLogits.apply(F.normalize(embeddings), self.weight, rows, self.matmul_dtype, sink)
            cosines = class_cosines(cosines, self.num_subcenters)
            batch = self._global_batch(embeddings, cosines, local_targets)
            logits = self.margin_loss(cosines, local_targets, batch)
            loss, _softmax = _ShardedSoftmaxCrossEntropy.apply(logits, local_targets, self.world_size)
        regularizer = self.margin_loss.regularizer(batch)
        if regularizer is not None:
            if _distributed(self.world_size):
                regularizer = _ScaleGradient.apply(regularizer, 1.0 / self.world_size)
            loss = loss + regularizer
        return loss

    def _global_batch(self, embeddings: torch.Tensor, cosines: torch.Tensor | None,
                      local_targets: torch.Tensor) -> GlobalBatch:
        """What the margin needs to know about the whole global batch (nothing is computed
        that it does not ask for: the combined margin costs nothing extra)."""
        batch = GlobalBatch(world_size=self.world_size if _distributed(self.world_size) else 1)
        if self.margin_loss.needs_norms:
            # Differentiable: MagFace's margin and regulariser depend on the norm.
            # (at least float32: embeddings from an autocast backbone are half precision).
            wide = embeddings if embeddings.dtype == torch.float64 else embeddings.float()
            batch.norms = torch.linalg.vector_norm(wide, dim=1)
        if self.margin_loss.needs_target_cosines and cosines is not None:  # (the chunked head computes them)
            target = GlobalBatch.local_target_cosines(cosines, local_targets)
            if _distributed(self.world_size):
                dist.all_reduce(target)  # each row's target lives on exactly one rank
            batch.target_cosines = target
        return batch
