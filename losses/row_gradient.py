"""The sampled class centres' gradient kept as its factors until the optimizer step.

For the k sampled centres w_i (rows `index` of the shard), the gradient of the loss is

    G_i = g_i - c_i <g_i, c_i>,   g_i = sum_n S[n, i] e_n,   c_i = w_i / |w_i|

with S = d loss / d cosines scaled by 1/|w_i| ([batch x k]) and e_n the normalised
embeddings ([batch x D]). Materialised, G is a float32 [k x D] matrix: at a million
classes and sample rate 0.1 it is the largest buffer of the step (0.2 GB), and it would
exist beside the logits, their gradient and the normalised centres. Kept as S, the
embeddings and the projections <g_i, c_i> it costs [batch x k] values (a batch is
smaller than D), and the optimizer materialises it piece by piece while it updates the
rows (losses.optim): no [k x D] gradient ever exists.

The optimizer step stays where it is (after every backward of a gradient accumulation,
after the non-finite guard and GradScaler have decided), so their semantics hold:
accumulation sums the factors (G is linear in S and in the projections, for the same
centres: the weights do not change between accumulated batches), the guard checks the
factors for finiteness (`tensors()`), and GradScaler's unscale multiplies the
materialised pieces (`scale_`), as it would multiply a materialised gradient.

Only an optimizer that reads these factors may ask for them: `RowGradientSink.attach`
(losses.optim does, for centres whose state is bfloat16); PartialFC defers the gradient
when its weight carries a sink that its optimizer still owns, and gives every other
weight an ordinary sparse gradient.
"""
from __future__ import annotations

import weakref

import torch

from losses.row_chunks import row_slices

SINK_ATTRIBUTE = "_row_gradient_sink"


class DeferredRowGradient:
    """The gradient of the rows `index` (sorted, unique) of a [C x D] float32 weight, as factors.

    scaled [N, k] (the matmul dtype), embeddings [N, D] (the matmul dtype), inv_norm [k, 1]
    (1/|w_i| as the forward computed it), projections [k, 1] float32 or None (then computed
    from the materialised rows).
    """

    def __init__(self, index, scaled, embeddings, inv_norm, projections):
        self.index, self.scaled, self.embeddings = index, scaled, embeddings
        self.inv_norm, self.projections = inv_norm, projections
        self.factor = None  # a pending multiplier of the gradient (GradScaler's 1/scale)

    @property
    def shape(self) -> tuple[int, int]:
        return self.index.numel(), self.embeddings.shape[1]

    def tensors(self) -> list[torch.Tensor]:
        """What is finite exactly when the materialised rows are (short of an overflow of
        sums of finite float32 products, which no gradient of a cosine reaches)."""
        out = [self.scaled, self.embeddings]
        return out + ([self.projections] if self.projections is not None else [])

    def scale_(self, factor) -> None:
        self.factor = factor if self.factor is None else self.factor * factor

    def merge(self, other: "DeferredRowGradient") -> "DeferredRowGradient":
        """The sum of two gradients of the same weights (gradient accumulation): the union of
        their rows, S of both batches side by side (zero where a batch did not sample a row)."""
        if self.factor is not None or other.factor is not None:
            raise RuntimeError("a deferred row gradient cannot accumulate after it was unscaled")
        union = torch.unique(torch.cat([self.index, other.index]), sorted=True)
        n1, n2 = self.scaled.shape[0], other.scaled.shape[0]
        scaled = self.scaled.new_zeros((n1 + n2, union.numel()))
        inv_norm = self.inv_norm.new_empty((union.numel(), 1))
        projections = None
        if self.projections is not None and other.projections is not None:
            projections = self.projections.new_zeros((union.numel(), 1))
        for part, rows, grad in ((slice(0, n1), self.index, self), (slice(n1, n1 + n2), other.index, other)):
            where = torch.searchsorted(union, rows)
            scaled[part].index_copy_(1, where, grad.scaled)
            inv_norm.index_copy_(0, where, grad.inv_norm)  # equal where both have a row: same weights
            if projections is not None:
                projections.index_add_(0, where, grad.projections)
        embeddings = torch.cat([self.embeddings, other.embeddings.to(self.embeddings.dtype)])
        return DeferredRowGradient(union, scaled, embeddings, inv_norm, projections)

    def rows(self, weight: torch.Tensor, part: slice) -> torch.Tensor:
        """Rows `part` (positions in `index`) of the gradient of `weight`, float32 [n x D].

        The same operations, in the same precision, as _CosineLogits.backward's materialised
        gradient: c from the weights and the forward's 1/|w| (the weights have not changed
        since), g = S^T e in the matmul dtype, the projection in float32.
        """
        return self.rows_and_weights(weight, part)[0]

    def rows_and_weights(self, weight: torch.Tensor, part: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows `part` of the gradient, a copy of those rows of `weight`): the optimizer
        updates the copy it would otherwise gather again."""
        with torch.no_grad():
            return self._rows(weight, part)

    def _rows(self, weight: torch.Tensor, part: slice) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = self.embeddings.dtype
        w = weight.index_select(0, self.index[part])
        inv_norm = self.inv_norm[part]
        centres_n = torch.empty(w.shape, dtype=dtype, device=w.device)
        torch.mul(w, inv_norm, out=centres_n)
        g = torch.mm(self.scaled[:, part].t(), self.embeddings)
        if g.dtype != weight.dtype:
            g = g.to(weight.dtype)
        if self.projections is not None:
            dot = self.projections[part]
        else:
            dot = (g * centres_n).sum(dim=1, keepdim=True)
        g.addcmul_(centres_n, dot, value=-1.0)
        if self.factor is not None:
            g.mul_(self.factor)
        return g, w


class RowGradientSink:
    """Where PartialFC puts the deferred gradient of one weight; owned by one optimizer.

    Held as an attribute of the weight (SINK_ATTRIBUTE) with weak references to the weight
    and to the optimizer: a copy of the weight (copy.deepcopy of the head) or a weight whose
    optimizer is gone gets ordinary gradients again.
    """

    def __init__(self, weight: torch.Tensor, owner) -> None:
        self._weight = weakref.ref(weight)
        self._owner = weakref.ref(owner)
        self.enabled = True
        self.gradient: DeferredRowGradient | None = None

    @classmethod
    def attach(cls, weight: torch.Tensor, owner) -> "RowGradientSink":
        sink = cls(weight, owner)
        setattr(weight, SINK_ATTRIBUTE, sink)
        return sink

    @staticmethod
    def of(weight: torch.Tensor) -> "RowGradientSink | None":
        """The sink that takes `weight`'s sampled-row gradient, or None (an ordinary gradient)."""
        sink = getattr(weight, SINK_ATTRIBUTE, None)
        if sink is None or not sink.enabled or sink._weight() is not weight or sink._owner() is None:
            return None
        return sink

    def add(self, gradient: DeferredRowGradient) -> None:
        self.gradient = gradient if self.gradient is None else self.gradient.merge(gradient)

    def take(self) -> DeferredRowGradient | None:
        gradient, self.gradient = self.gradient, None
        return gradient


def embedding_gradient(scaled: torch.Tensor, weight: torch.Tensor, index: torch.Tensor, out_dtype) -> torch.Tensor:
    """d loss / d normalised embeddings = S (weight[index] rows), S already holding 1/|w|:
    sum_i S[n, i] w_i = sum_i (d loss / d cos[n, i]) c_i. Gathered and cast piece by piece
    (no [k x D] copy of the rows), summed in float32."""
    n, k = scaled.shape
    dtype = scaled.dtype
    total = torch.zeros((n, weight.shape[1]), dtype=torch.float32, device=weight.device)
    for part in row_slices(k, weight[0].numel() * weight.element_size(), weight.device, lean=True):
        rows = weight.index_select(0, index[part])
        if dtype == torch.float32:
            total.addmm_(scaled[:, part], rows)
        else:
            total += torch.mm(scaled[:, part], rows.to(dtype))
    return total.to(out_dtype)
