"""Optimizers whose update of a row-sparse gradient touches only the sampled rows.

PartialFC with sample_rate < 1 gives its class-centre matrix a sparse COO
gradient holding the rows used in this step. `torch.optim.SGD`/`AdamW` cannot
apply momentum or weight decay to such gradients, and densifying them would
bring back the cost that sampling is meant to remove. The classes below are
the stock optimizers (fused/foreach kernels for every dense parameter) plus an
exact per-row update for sparse ones, as the Partial FC paper describes:
momentum, weight decay and Adam moments change for exactly the sampled rows;
unsampled rows and their optimizer state are left untouched.

The class centres' optimizer state (SGD momentum; AdamW's two moments) can be kept
in bfloat16 (`build_optimizer(..., fc_state_dtype="bfloat16")`): it is half of the
shard's memory beside the float32 centres. Every update is computed in float32 and
only the stored state is rounded, *stochastically* (see `_StochasticRounding`), so
that updates smaller than bfloat16's resolution are not lost.
"""
from __future__ import annotations

import sys
from typing import Iterable

import torch
from torch.optim.sgd import sgd as functional_sgd

from losses.row_chunks import row_slices
from losses.row_gradient import DeferredRowGradient, RowGradientSink

# fc_state_dtype values (the config key) and the tensor dtypes they mean.
STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# The optimizer state that has one row per class centre, and may be kept in bfloat16.
ROW_STATE_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq")
# Param-group keys of a group whose row state is rounded: the dtype (what this run's config
# says), the seed and the count of rounded steps (what the checkpoint says: they decide the
# random bits, so a resumed run draws what an uninterrupted one would have).
_ROUNDING_KEYS = ("state_dtype", "rounding_seed", "rounding_step")
# Entries of the table of random bits (see _StochasticRounding): 16 MiB of int32 per device.
ROUNDING_TABLE_SIZE = 1 << 22
_BF16_HALF = 1 if sys.byteorder == "little" else 0  # which int16 of a float32 holds its bfloat16 bits


def _mix64(*values: int) -> int:
    """A 64-bit hash of integers (splitmix64 steps): generator seeds that differ in their
    low 32 bits, which are all that torch's CPU generator (mt19937) uses."""
    x = 0
    for v in values:
        x = (x + (v & 0xFFFFFFFFFFFFFFFF) + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x


class _StochasticRounding:
    """float32 -> bfloat16 with stochastic rounding: unbiased, E[round(x)] = x.

    bfloat16 is the upper 16 bits of a float32. Adding a uniform random integer
    u in [0, 2^16) to the float32's bit pattern and dropping the lower 16 bits rounds
    up with probability (dropped bits) / 2^16, i.e. by exactly the fraction of the way
    to the next bfloat16: unbiased for every magnitude, sign (the pattern is sign +
    magnitude), subnormals and across exponent boundaries; 0 stays 0, inf stays inf.
    Round-to-nearest would be biased where it matters here: momentum 0.9 * m and
    AdamW's 0.999 * v change a value by less than half a bfloat16 step, so they would
    be rounded away at every step and the state would never decay; a long run of small
    gradients would never accumulate.

    Why not fresh random bits per element: a CPU draws them one at a time (about 2 ns
    per element with torch's generator, as long as the rest of the update of 10^7
    elements), so the bits come from a fixed table instead, read at a random offset per
    piece. The table holds every 16-bit value equally often in a random order, so an
    element reading table[(offset + i) mod T] with a uniform offset gets an exactly
    uniform u: each rounding is exactly unbiased, and the offsets of different steps are
    independent. (Within one piece the bits of neighbouring elements are fixed relative
    to each other, and elements T apart share them, which changes no element's
    expectation; T = 2^22 is far more than a row, so they are different classes' rows.)

    Reproducible: the table comes from the seed, the offsets of a step from a generator
    seeded by (seed, step number); both numbers live in the param group and are saved
    with the optimizer's state_dict.
    """

    def __init__(self) -> None:
        self._tables: dict[tuple[int, str], torch.Tensor] = {}
        self._offsets: dict[int, tuple[int, int, torch.Generator]] = {}

    def table(self, seed: int, device: torch.device) -> torch.Tensor:
        key = (seed, str(device))
        if key not in self._tables:
            if ROUNDING_TABLE_SIZE % (1 << 16):
                raise ValueError(f"ROUNDING_TABLE_SIZE must be a multiple of 65536, got {ROUNDING_TABLE_SIZE}")
            g = torch.Generator().manual_seed(_mix64(seed, 0xB16))
            perm = torch.randperm(ROUNDING_TABLE_SIZE, generator=g, dtype=torch.int32)
            self._tables[key] = perm.remainder_(1 << 16).to(device)
        return self._tables[key]

    def new_step(self) -> None:
        self._offsets.clear()

    def generator(self, group: dict) -> torch.Generator:
        """The offsets' generator of the group's current step (continued across its pieces)."""
        seed, step = int(group["rounding_seed"]), int(group["rounding_step"])
        cached = self._offsets.get(id(group))
        if cached is None or cached[:2] != (seed, step):
            cached = (seed, step, torch.Generator().manual_seed(_mix64(seed, step)))
            self._offsets[id(group)] = cached
        return cached[2]

    def round_(self, group: dict, x: torch.Tensor) -> torch.Tensor:
        """x (contiguous float32) rounded to bfloat16; x's memory is used up (the result views it)."""
        if x.dtype != torch.float32 or not x.is_contiguous():
            raise ValueError(f"stochastic rounding takes a contiguous float32 tensor, got {x.dtype}")
        seed = int(group["rounding_seed"])
        table = self.table(seed, x.device)
        bits = x.view(-1).view(torch.int32)
        size = table.numel()
        offset = int(torch.randint(0, size, (1,), generator=self.generator(group)))
        done = 0
        while done < bits.numel():  # the table read cyclically from `offset`
            take = min(bits.numel() - done, size - offset)
            bits[done:done + take].add_(table[offset:offset + take])
            done, offset = done + take, 0
        # The upper halves of the patterns, read in place: no pass to mask or convert.
        halves = x.view(torch.int16).view(*x.shape[:-1], x.shape[-1], 2)[..., _BF16_HALF]
        return halves.view(torch.bfloat16)


def state_dtype_of(group: dict) -> torch.dtype:
    name = group.get("state_dtype", "float32")
    if name not in STATE_DTYPES:
        raise ValueError(f"state_dtype must be one of {sorted(STATE_DTYPES)}, got {name!r}")
    return STATE_DTYPES[name]


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


class _MaterialisedRows:
    """`rows[part]`: the rows `part` of a deferred row gradient of `weight`, float32."""

    def __init__(self, gradient: DeferredRowGradient, weight: torch.Tensor):
        self.gradient, self.weight = gradient, weight
        self._weights: tuple[slice, torch.Tensor] | None = None

    def __getitem__(self, part: slice) -> torch.Tensor:
        grad, weights = self.gradient.rows_and_weights(self.weight, part)
        self._weights = (part, weights)
        return grad

    def take_weights(self, part: slice) -> torch.Tensor | None:
        """The copy of the weight's rows `part` that materialising them gathered (once)."""
        if self._weights is None or self._weights[0] != part:
            return None
        weights, self._weights = self._weights[1], None
        return weights


class _RowSparseMixin:
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # With every group fused, GradScaler hands step() its scale and inf flag as device
        # tensors (`grad_scale`, `found_inf`) instead of reading the flag on the host: the
        # fused kernels and the row update both take them. Other kernels need the host.
        self._step_supports_amp_scaling = all(group.get("fused") for group in self.param_groups)
        self._row_grad_scale = None
        self._rounding = _StochasticRounding()
        # Weights whose sampled rows' gradient PartialFC hands over as factors (see
        # losses.row_gradient): those of the groups with bfloat16 state, where memory is the
        # point. A float32 state keeps the ordinary sparse gradient.
        self._row_gradient_sinks: list[RowGradientSink] = []
        for group in self.param_groups:
            if state_dtype_of(group) != torch.float32:
                group.setdefault("rounding_seed", 0)
                group.setdefault("rounding_step", 0)
                self._row_gradient_sinks += [RowGradientSink.attach(p, self) for p in group["params"]]

    def _deferred_gradients(self) -> list[tuple[dict, torch.Tensor, DeferredRowGradient]]:
        out = []
        for group in self.param_groups:
            for p in group["params"]:
                sink = RowGradientSink.of(p)
                if sink is not None and sink.gradient is not None and sink in self._row_gradient_sinks:
                    out.append((group, p, sink.gradient))
        return out

    def deferred_gradient_tensors(self) -> list[torch.Tensor]:
        """The tensors of the row gradients held as factors (not in `p.grad`): a check of the
        gradients' finiteness (training.guard) must include them."""
        return [t for _, _, gradient in self._deferred_gradients() for t in gradient.tensors()]

    def unscale_deferred_(self, scaler: torch.amp.GradScaler) -> None:
        """What `scaler.unscale_(self)` does to `p.grad`, for the row gradients held as factors
        (call it right after): they are multiplied by 1/scale when materialised, and a
        non-finite factor counts as an overflow, so that the scaler skips the step *and*
        lowers its scale. GradScaler has no public hook for gradients outside `p.grad`; this
        uses its per-optimizer record, as its own unscale_ fills it."""
        deferred = self._deferred_gradients()
        if not deferred or not scaler.is_enabled():
            return
        record = scaler._per_optimizer_states[id(self)]["found_inf_per_device"]
        inv_scale = scaler._scale.double().reciprocal().float()
        for _, p, gradient in deferred:
            gradient.scale_(inv_scale.to(p.device))
            finite = torch.stack([torch.isfinite(t).all() for t in gradient.tensors()]).all()
            bad = (~finite).to(torch.float32)
            record[p.device] = bad if p.device not in record else record[p.device] + bad

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        for sink in self._row_gradient_sinks:
            sink.gradient = None

    def _pop_row_grads(self) -> list[tuple[dict, torch.Tensor, torch.Tensor]]:
        """Gradients the row update applies: sparse ones, and every one of a group whose
        state is not float32 (the stock kernels keep the state in the parameter's dtype)."""
        hidden = []
        for group in self.param_groups:
            rounded = state_dtype_of(group) != torch.float32
            for p in group["params"]:
                if p.grad is not None and (p.grad.is_sparse or rounded):
                    hidden.append((group, p, p.grad))
                    p.grad = None  # the stock step() skips parameters without a gradient
        return hidden

    def load_state_dict(self, state_dict: dict) -> None:
        # torch replaces each group's options by the saved ones and casts every state tensor
        # to its parameter's dtype. The state dtype is this run's choice (a float32 run may
        # continue in bfloat16 and back); the rounding seed and step count are the saved run's.
        configured = [{k: g[k] for k in _ROUNDING_KEYS if k in g} for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, mine in zip(self.param_groups, configured):
            saved = {k: group.pop(k) for k in _ROUNDING_KEYS if k in group}
            if "state_dtype" not in mine:
                continue
            group["state_dtype"] = mine["state_dtype"]
            group["rounding_seed"] = saved.get("rounding_seed", mine["rounding_seed"])
            group["rounding_step"] = saved.get("rounding_step", mine["rounding_step"])
            dtype = state_dtype_of(group)
            for p in group["params"]:
                state = self.state.get(p, {})
                for key in ROW_STATE_KEYS:
                    if key in state and state[key].dtype != dtype:
                        state[key] = state[key].to(dtype)  # once, at resume: to nearest

    def step(self, closure=None):
        deferred = self._deferred_gradients()
        if not deferred:
            return self._step(closure, [])
        # A non-finite factor voids the whole step, as a non-finite gradient in `p.grad` does
        # for the training loop's guard and GradScaler (which cannot see the factors).
        finite = torch.stack([torch.isfinite(t).all() for _, _, g in deferred for t in g.tensors()]).all()
        void = (~finite).to(torch.float32)
        had_found_inf, caller_found_inf = "found_inf" in self.__dict__, self.__dict__.get("found_inf")
        if caller_found_inf is not None:
            void = void + caller_found_inf.reshape(()).to(void.device, torch.float32)
        self.found_inf = void
        try:
            return self._step(closure, deferred)
        finally:
            self.__dict__.pop("found_inf", None)
            if had_found_inf:
                self.found_inf = caller_found_inf

    def _step(self, closure, deferred):
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
        hidden = self._pop_row_grads()
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
                self._rounding.new_step()
                updates = [*hidden, *self._combine_deferred(deferred, hidden)]
                for group in {id(g): g for g, _, _ in updates if "rounding_step" in g}.values():
                    group["rounding_step"] += 1  # new random bits for this step's rounding
                for group, p, grad in updates:
                    if isinstance(grad, DeferredRowGradient):
                        rows, values = grad.index, _MaterialisedRows(grad, p)
                    elif grad.is_sparse:
                        rows, values = _unique_rows(grad)
                    else:
                        rows, values = torch.arange(grad.shape[0], device=grad.device), grad
                    if rows.numel():
                        self._row_update(group, p, rows, values, skip)
            finally:
                self._row_grad_scale = None
        return loss

    @staticmethod
    def _combine_deferred(deferred, hidden) -> list:
        """The deferred gradients to apply; one of a weight that also has a gradient in
        `p.grad` (a term that used the weight outside PartialFC's cosines) is materialised
        into that one instead, which the row update then applies."""
        with_grad = {id(p): i for i, (_, p, _) in enumerate(hidden)}
        out = []
        for group, p, gradient in deferred:
            i = with_grad.get(id(p))
            if i is None:
                out.append((group, p, gradient))
                continue
            values = _MaterialisedRows(gradient, p)[0:gradient.index.numel()]
            sparse = torch.sparse_coo_tensor(gradient.index.unsqueeze(0), values, p.shape)
            hidden[i] = (group, p, (hidden[i][2] + sparse).coalesce())
        return out

    def _pieces(self, group: dict, p: torch.Tensor, num_rows: int) -> list[slice]:
        """Pieces of the sampled rows, about one chunk of the weight's bytes each
        (losses.row_chunks). With bfloat16 state on an accelerator, whose chunks are large
        (1 GB per temporary), pieces of the rounding table's size instead: memory is the
        point of that state, and the few more kernel launches cost little."""
        if state_dtype_of(group) == torch.float32:
            return row_slices(num_rows, p[0].numel() * p.element_size(), p.device)
        pieces = row_slices(num_rows, p[0].numel() * p.element_size(), p.device, lean=True)
        if p.device.type == "cpu":
            return pieces
        most = max(1, ROUNDING_TABLE_SIZE // max(1, p[0].numel()))
        return [slice(i, min(i + most, s.stop)) for s in pieces for i in range(s.start, s.stop, most)]

    def _state_rows(self, group: dict, p: torch.Tensor, key: str) -> torch.Tensor:
        """The parameter's row state `key`, created as zeros in the group's state dtype
        (float32 means: the parameter's own dtype, as in torch)."""
        state = self.state[p]
        dtype = state_dtype_of(group)
        if dtype == torch.float32:
            dtype = p.dtype
        elif p.dtype != torch.float32:
            raise ValueError(f"a {group['state_dtype']} optimizer state needs float32 parameters, got {p.dtype}")
        if state.get(key) is None:
            state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        elif state[key].dtype != dtype:
            state[key] = state[key].to(dtype)
        return state[key]

    def _store_rows(self, group: dict, target: torch.Tensor, rows: torch.Tensor, new: torch.Tensor, skip) -> None:
        """target[rows] = new, rounded stochastically where the state is kept in bfloat16
        (`new` is used up then: call this after everything else has read it)."""
        if target.dtype != new.dtype:
            new = self._rounding.round_(group, new)
        self._write_rows(target, rows, new, skip)

    def _grad_piece(self, grad_rows: torch.Tensor, part: slice, dtype: torch.dtype) -> torch.Tensor:
        """Rows `part` of the gradient in the parameter's dtype, unscaled if GradScaler asked."""
        grad = grad_rows[part].to(dtype)
        if self._row_grad_scale is not None:
            grad = grad / self._row_grad_scale
        return grad

    @staticmethod
    def _weight_rows(p: torch.Tensor, chunk: torch.Tensor, grad_rows, part: slice) -> torch.Tensor:
        """A copy of the rows `chunk` of p (the one materialising a deferred gradient made)."""
        weights = grad_rows.take_weights(part) if isinstance(grad_rows, _MaterialisedRows) else None
        return p.index_select(0, chunk) if weights is None else weights

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
        buf = self._state_rows(group, p, "momentum_buffer") if momentum != 0 else None
        for part in self._pieces(group, p, rows.numel()):
            chunk, grad = rows[part], self._grad_piece(grad_rows, part, p.dtype)
            weights = self._weight_rows(p, chunk, grad_rows, part)
            # A never-updated row has buf = 0, so its first step is buf = g, as in torch.
            old = None if buf is None else buf.index_select(0, chunk).to(p.dtype)
            # torch's own SGD on the gathered rows, in the weight's dtype:
            # g += wd * w;  buf = momentum * buf + g;  w -= lr * buf. Its fused kernel does it
            # in one pass, and takes the void-step flag itself (it then leaves the copies as
            # they are, and writing them back changes nothing: a rounded copy of a bfloat16
            # value is that value). A CPU kernel is a parallel region however few the
            # elements, and with other processes on the cores a small one can wait for a
            # whole time slice: small pieces use the plain kernels.
            fused = p.device.type == "cuda" or (p.device.type == "cpu" and weights.numel() >= 1 << 16)
            functional_sgd(
                [weights], [grad], [old], fused=fused,
                found_inf=None if skip is None or not fused else skip.to(torch.float32),
                weight_decay=wd, momentum=momentum, lr=lr, dampening=0.0, nesterov=False, maximize=False,
            )
            write_skip = None if fused else skip
            self._write_rows(p, chunk, weights, write_skip)
            if buf is not None:
                self._store_rows(group, buf, chunk, old, write_skip)


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
        exp_avg, exp_avg_sq = self._state_rows(group, p, "exp_avg"), self._state_rows(group, p, "exp_avg_sq")
        for part in self._pieces(group, p, rows.numel()):
            chunk = rows[part]
            grad = self._grad_piece(grad_rows, part, p.dtype)
            step = state["row_step"].index_select(0, chunk).add_(1.0)
            # The moments in float32 (a bfloat16 state is widened), rounded only when stored.
            m = exp_avg.index_select(0, chunk).to(grad.dtype).mul_(beta1).add_(grad, alpha=1 - beta1)
            v = exp_avg_sq.index_select(0, chunk).to(grad.dtype).mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            bias1 = (1 - beta1**step).unsqueeze(1)
            bias2 = (1 - beta2**step).unsqueeze(1)
            w = self._weight_rows(p, chunk, grad_rows, part).mul_(1 - lr * wd)
            w.addcdiv_(m / bias1, (v / bias2).sqrt_().add_(eps), value=-lr)
            self._write_rows(state["row_step"], chunk, step, skip)
            self._write_rows(p, chunk, w, skip)
            self._store_rows(group, exp_avg, chunk, m, skip)
            self._store_rows(group, exp_avg_sq, chunk, v, skip)
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
    fc_state_dtype: str = "float32",
    seed: int = 0,
) -> torch.optim.Optimizer:
    """One optimizer, two parameter groups (backbone, PartialFC head), as insightface has.

    fc_state_dtype: "float32" or "bfloat16", the dtype of the head's optimizer state
    (momentum; AdamW's moments), rounded stochastically from float32 updates with random
    bits derived from `seed` (the run's seed) and the step count (saved in the state_dict).
    """
    if fc_state_dtype not in STATE_DTYPES:
        raise ValueError(f"fc_state_dtype must be one of {', '.join(STATE_DTYPES)}, got {fc_state_dtype!r}")
    head = {"params": list(head_params), "name": "partial_fc"}
    if fc_state_dtype != "float32":
        head.update(state_dtype=fc_state_dtype, rounding_seed=int(seed), rounding_step=0)
    groups = [
        # All parameters, frozen ones too, in module order: the same parameter indices as
        # insightface's optimizer, so its resume states map onto ours.
        {"params": list(backbone_params), "name": "backbone"},
        head,
    ]
    # Fused kernels exist for CUDA and CPU; foreach elsewhere.
    impl = {"fused": True} if device_type in ("cuda", "cpu") else {"foreach": True}
    if name == "sgd":
        return SampledRowSGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, **impl)
    if name == "adamw":
        return SampledRowAdamW(groups, lr=lr, weight_decay=weight_decay, **impl)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {name!r}")
