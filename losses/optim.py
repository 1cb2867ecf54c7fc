"""Optimizers whose update of a row-sparse gradient touches only the sampled rows.

PartialFC with sample_rate < 1 gives its class-centre matrix a sparse COO
gradient holding the rows used in this step. `torch.optim.SGD`/`AdamW` cannot
apply momentum or weight decay to such gradients, and densifying them would
bring back the cost that sampling is meant to remove. The classes below are
the stock optimizers (fused/foreach kernels for every dense parameter) plus an
exact per-row update for sparse ones, as the Partial FC paper describes:
momentum, weight decay and Adam moments change for exactly the sampled rows;
unsampled rows and their optimizer state are left untouched.
"""
from __future__ import annotations

from typing import Iterable

import torch

from losses.row_chunks import row_slices


def _unique_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row indices, row values) of a sparse row gradient, each row once.

    PartialFC's gradient already has sorted, unique rows, but autograd drops the
    `is_coalesced` flag when it stores a sparse gradient; checking the order costs far
    less than coalescing (a sort and a copy of every value) again.
    """
    if not grad.is_coalesced():
        rows = grad._indices()[0]
        if rows.numel() < 2 or bool((rows[1:] > rows[:-1]).all()):
            return rows, grad._values()
        grad = grad.coalesce()
    return grad.indices()[0], grad.values()


class _RowSparseMixin:
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # With every group fused, GradScaler hands step() its scale and inf flag as device
        # tensors (`grad_scale`, `found_inf`) instead of reading the flag on the host: the
        # fused kernels and the row update both take them. Other kernels need the host.
        self._step_supports_amp_scaling = all(group.get("fused") for group in self.param_groups)
        self._row_grad_scale = None

    def _pop_sparse_grads(self) -> list[tuple[dict, torch.Tensor, torch.Tensor]]:
        hidden = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    hidden.append((group, p, p.grad))
                    p.grad = None  # the stock step() skips parameters without a gradient
        return hidden

    def step(self, closure=None):
        # `found_inf` (set by the training loop, or by GradScaler on fused optimizers): a
        # float tensor, non-zero when this step must not change anything. The fused
        # kernels and the row update skip on the device; other kernels need the host.
        # A CPU tensor is read at once: there is no queue of device work to wait for.
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and (
            found_inf.device.type == "cpu" or not all(group.get("fused") for group in self.param_groups)
        ):
            if bool(found_inf):
                return None
            found_inf = None
        hidden = self._pop_sparse_grads()
        # Decided here already: the stock kernels must not see it (the unfused ones refuse it).
        caller_found_inf = self.__dict__.pop("found_inf", None) if found_inf is None else None
        try:
            self._before_dense_step()
            loss = super().step(closure)
        finally:
            for _, p, grad in hidden:
                p.grad = grad
            if caller_found_inf is not None:
                self.found_inf = caller_found_inf
        with torch.no_grad():
            skip = None if found_inf is None else found_inf.reshape(()) > 0
            self._row_grad_scale = getattr(self, "grad_scale", None)
            try:
                for group, p, grad in hidden:
                    rows, values = _unique_rows(grad)
                    if rows.numel():
                        self._row_update(group, p, rows, values, skip)
            finally:
                self._row_grad_scale = None
        return loss

    def _grad_piece(self, grad_rows: torch.Tensor, part: slice, dtype: torch.dtype) -> torch.Tensor:
        """Rows `part` of the gradient in the parameter's dtype, unscaled if GradScaler asked."""
        grad = grad_rows[part].to(dtype)
        if self._row_grad_scale is not None:
            grad = grad / self._row_grad_scale
        return grad

    @staticmethod
    def _write_rows(target: torch.Tensor, rows: torch.Tensor, new: torch.Tensor, skip) -> None:
        """target[rows] = new, unless `skip` (a device bool) says the step is void."""
        if skip is not None:
            new = torch.where(skip, target.index_select(0, rows), new)
        target.index_copy_(0, rows, new)

    def _before_dense_step(self) -> None:
        pass


class SampledRowSGD(_RowSparseMixin, torch.optim.SGD):
    """torch.optim.SGD; a parameter with a sparse row gradient gets, for its rows r only:
    g = grad[r] + wd * w[r];  buf[r] = momentum * buf[r] + g;  w[r] -= lr * buf[r]."""

    def _before_dense_step(self) -> None:
        # torch's fused SGD gives a parameter without a momentum buffer an *uninitialised*
        # one (empty_like) and fills it in the kernel, which a device-side `found_inf`
        # skips: a skipped first step (GradScaler's usual start with fp16) then leaves
        # garbage that the next step turns into NaN weights. A zero buffer is the same
        # first step (buf = 0 * momentum + g = g, no dampening) and survives a skip.
        if getattr(self, "found_inf", None) is None:
            return
        for group in self.param_groups:
            if group["momentum"] == 0 or group["dampening"] != 0:
                continue
            for p in group["params"]:
                if p.grad is not None and self.state[p].get("momentum_buffer") is None:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _row_update(self, group: dict, p: torch.Tensor, rows: torch.Tensor, grad_rows: torch.Tensor, skip=None) -> None:
        if group["nesterov"] or group["maximize"] or group["dampening"] != 0:
            raise ValueError("sampled-row SGD supports plain momentum only (no nesterov, maximize or dampening)")
        lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
        buf = None
        if momentum != 0:
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        for part in row_slices(rows.numel(), p[0].numel() * p.element_size(), p.device):
            chunk, grad = rows[part], self._grad_piece(grad_rows, part, p.dtype)
            weights = p.index_select(0, chunk)
            if skip is None and buf is not None:
                # The common case, on one gathered copy of each: buf = g + momentum * buf +
                # wd * w (a never-updated row has buf = 0, so its first step is buf = g, as
                # in torch); w -= lr * buf, added in place (index_add_ is several times
                # faster than gather, subtract, scatter).
                update = buf.index_select(0, chunk)
                torch.add(grad, update, alpha=momentum, out=update)
                if wd != 0:
                    update.add_(weights, alpha=wd)
                buf.index_copy_(0, chunk, update)
                p.index_add_(0, chunk, update, alpha=-lr)
                continue
            update = grad.add(weights, alpha=wd) if wd != 0 else grad
            if buf is not None:
                update = buf.index_select(0, chunk).mul_(momentum).add_(update)
                self._write_rows(buf, chunk, update, skip)
            self._write_rows(p, chunk, weights.sub_(update, alpha=lr), skip)


class SampledRowAdamW(_RowSparseMixin, torch.optim.AdamW):
    """torch.optim.AdamW; a parameter with a sparse row gradient keeps per-row step
    counts, and for its rows r only: decoupled decay w[r] *= 1 - lr*wd, then the Adam
    step from its moments m[r], v[r] with bias correction by the row's own count."""

    def _before_dense_step(self) -> None:
        # A shard trained with sampling and continued without it: torch's AdamW needs a
        # scalar step; the most-updated row's count is the closest equivalent.
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if p.grad is not None and state and "row_step" in state:
                    state["step"] = torch.as_tensor(float(state.pop("row_step").max()))

    def _row_update(self, group: dict, p: torch.Tensor, rows: torch.Tensor, grad_rows: torch.Tensor, skip=None) -> None:
        if group["amsgrad"] or group["maximize"]:
            raise ValueError("sampled-row AdamW does not support amsgrad or maximize")
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        state = self.state[p]
        if "row_step" not in state:
            scalar_step = float(state.get("step", 0))  # continuing a dense run: keep its count
            state["row_step"] = torch.full((p.shape[0],), scalar_step, dtype=torch.float32, device=p.device)
            state.setdefault("exp_avg", torch.zeros_like(p, memory_format=torch.preserve_format))
            state.setdefault("exp_avg_sq", torch.zeros_like(p, memory_format=torch.preserve_format))
        for part in row_slices(rows.numel(), p[0].numel() * p.element_size(), p.device):
            chunk = rows[part]
            grad = self._grad_piece(grad_rows, part, p.dtype)
            step = state["row_step"].index_select(0, chunk).add_(1.0)
            m = state["exp_avg"].index_select(0, chunk).mul_(beta1).add_(grad, alpha=1 - beta1)
            v = state["exp_avg_sq"].index_select(0, chunk).mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            bias1 = (1 - beta1**step).unsqueeze(1)
            bias2 = (1 - beta2**step).unsqueeze(1)
            w = p.index_select(0, chunk).mul_(1 - lr * wd)
            w.addcdiv_(m / bias1, (v / bias2).sqrt_().add_(eps), value=-lr)
            self._write_rows(state["row_step"], chunk, step, skip)
            self._write_rows(state["exp_avg"], chunk, m, skip)
            self._write_rows(state["exp_avg_sq"], chunk, v, skip)
            self._write_rows(p, chunk, w, skip)
        # torch's Adam expects a scalar "step" in every state (load_state_dict checks it);
        # here it counts the optimizer steps that touched this parameter at all.
        state["step"] = torch.as_tensor(float(state.get("step", 0)) + 1.0)


def build_optimizer(
    name: str,
    backbone_params: Iterable[torch.nn.Parameter],
    head_params: Iterable[torch.nn.Parameter],
    *,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    device_type: str = "cpu",
) -> torch.optim.Optimizer:
    """One optimizer, two parameter groups (backbone, PartialFC head), as insightface has."""
    groups = [
        # All parameters, frozen ones too, in module order: the same parameter indices as
        # insightface's optimizer, so its resume states map onto ours.
        {"params": list(backbone_params), "name": "backbone"},
        {"params": list(head_params), "name": "partial_fc"},
    ]
    # Fused kernels exist for CUDA and CPU; foreach elsewhere.
    impl = {"fused": True} if device_type in ("cuda", "cpu") else {"foreach": True}
    if name == "sgd":
        return SampledRowSGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, **impl)
    if name == "adamw":
        return SampledRowAdamW(groups, lr=lr, weight_decay=weight_decay, **impl)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {name!r}")
