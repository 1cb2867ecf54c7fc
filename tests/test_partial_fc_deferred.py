"""fc_state_dtype="bfloat16": PartialFC hands the sampled rows' gradient to the optimizer as
factors (losses.row_gradient) -- the same updates as the materialised sparse gradient, with
gradient accumulation, the non-finite guard and GradScaler, and no [k x D] buffer."""
import copy

import pytest
import torch

import losses.row_chunks
from losses import CombinedMarginLoss, PartialFC
from losses.optim import _MaterialisedRows, build_optimizer
from losses.row_gradient import RowGradientSink

CLASSES, DIM, BATCH = 3000, 64, 32


def _head_and_optimizer(optimizer="sgd", matmul_dtype=None, deferred=True, fc_state_dtype="bfloat16", rate=0.1):
    torch.manual_seed(0)
    head = PartialFC(CombinedMarginLoss(64.0, 1.0, 0.5, 0.0), DIM, CLASSES, rate, matmul_dtype=matmul_dtype)
    opt = build_optimizer(optimizer, [], head.parameters(), lr=0.1, weight_decay=5e-4, fc_state_dtype=fc_state_dtype)
    if not deferred:
        RowGradientSink.of(head.weight).enabled = False
    return head, opt


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(BATCH, DIM, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g)) for _ in range(n)]


def _train(head, opt, steps=3, accumulate=1):
    emb_grads = []
    for i, (emb, labels) in enumerate(_batches(steps * accumulate)):
        emb = emb.requires_grad_()
        (head(emb, labels) / accumulate).backward()
        emb_grads.append(emb.grad)
        if (i + 1) % accumulate == 0:
            opt.step()
            opt.zero_grad(set_to_none=True)
    state = {k: v.clone() for k, v in opt.state[head.weight].items() if torch.is_tensor(v)}
    return head.weight.detach().clone(), state, emb_grads


def _deferred_dense(head) -> torch.Tensor:
    gradient = RowGradientSink.of(head.weight).gradient
    values = _MaterialisedRows(gradient, head.weight)[0:gradient.index.numel()]
    return torch.zeros_like(head.weight).index_copy_(0, gradient.index, values)


@pytest.mark.parametrize("matmul_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_deferred_gradient_updates_exactly_as_the_materialised_one(optimizer, matmul_dtype):
    deferred = _train(*_head_and_optimizer(optimizer, matmul_dtype))
    materialised = _train(*_head_and_optimizer(optimizer, matmul_dtype, deferred=False))
    assert torch.equal(deferred[0], materialised[0])  # the weights, bit for bit
    assert deferred[1].keys() == materialised[1].keys()
    assert all(torch.equal(deferred[1][k], materialised[1][k]) for k in deferred[1])
    assert deferred[1]["exp_avg" if optimizer == "adamw" else "momentum_buffer"].dtype == torch.bfloat16
    # The embeddings' gradient is summed over pieces of rows: equal up to the matmul's rounding.
    for a, b in zip(deferred[2], materialised[2]):
        scale = float(b.abs().max())
        torch.testing.assert_close(a, b, rtol=0, atol=(1e-2 if matmul_dtype else 1e-6) * scale)


@pytest.mark.parametrize("matmul_dtype", [None, torch.bfloat16])
def test_accumulated_factors_are_the_sum_of_the_batches_gradients(matmul_dtype):
    grads = {}
    for deferred in (True, False):
        head, opt = _head_and_optimizer(matmul_dtype=matmul_dtype, deferred=deferred)
        for emb, labels in _batches(3):
            (head(emb, labels) / 3).backward()
        grads[deferred] = _deferred_dense(head) if deferred else head.weight.grad.to_dense()
        if deferred:
            assert head.weight.grad is None
    exact, _ = _head_and_optimizer(fc_state_dtype="float32")
    exact = exact.double()
    for emb, labels in _batches(3):
        (exact(emb.double(), labels) / 3).backward()
    truth = exact.weight.grad.to_dense()
    assert torch.equal(grads[True] != 0, truth != 0)  # the union of the batches' rows
    error = {k: float((g.double() - truth).abs().max() / truth.abs().max()) for k, g in grads.items()}
    assert error[True] <= 1.05 * error[False] + 1e-7, error  # as accurate as the summed sparse gradients
    torch.testing.assert_close(grads[True], grads[False], rtol=0, atol=(3e-2 if matmul_dtype else 1e-6) * float(
        truth.abs().max()))


def test_the_step_holds_no_gradient_of_the_sampled_rows_size(monkeypatch):
    monkeypatch.setattr(losses.row_chunks, "LEAN_CPU_CHUNK_BYTES", 64 * DIM * 4)
    largest = {}
    for deferred in (True, False):
        head, opt = _head_and_optimizer(deferred=deferred, rate=0.5)
        emb, labels = _batches(1)[0]
        head(emb, labels).backward()  # the state and the rounding table exist after this step
        opt.step()
        opt.zero_grad()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            head(emb, labels).backward()
            opt.step()
        largest[deferred] = max(e.cpu_memory_usage for e in prof.events())
    sampled_rows_bytes = head.num_sample * DIM * 4
    logits_bytes = BATCH * head.num_sample * 4  # (a batch smaller than D: less than the rows)
    assert largest[False] >= sampled_rows_bytes  # the materialised gradient
    assert largest[True] <= 1.05 * logits_bytes < sampled_rows_bytes, largest


def test_the_guard_voids_the_step_for_a_non_finite_factor():
    from training.guard import NonFiniteGuard

    head, opt = _head_and_optimizer()
    guard = NonFiniteGuard(0, torch.device("cpu"), [])
    emb, labels = _batches(1)[0]
    loss = head(emb, labels)
    loss.backward()
    guard.observe_loss(loss)
    RowGradientSink.of(head.weight).gradient.scaled[0, 0] = float("nan")
    before = head.weight.detach().clone()
    guard.step(opt, None, [p.grad for p in head.parameters()])
    assert torch.equal(head.weight.detach(), before) and int(guard.skipped) == 1
    # Without the guard, the optimizer voids the step itself.
    head(emb, labels).backward()
    RowGradientSink.of(head.weight).gradient.embeddings[1, 2] = float("inf")
    opt.step()
    assert torch.equal(head.weight.detach(), before)


def test_grad_scaler_in_the_training_step_unscales_the_factors_and_skips_an_overflow():
    from training.guard import NonFiniteGuard
    from training.step import TrainStep

    def run(scaler, steps=3):
        torch.manual_seed(0)
        backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, DIM))
        head = PartialFC(CombinedMarginLoss(16.0, 1.0, 0.3, 0.0), DIM, 40, 0.5)
        opt = build_optimizer("sgd", backbone.parameters(), head.parameters(), lr=0.05, weight_decay=5e-4,
                              fc_state_dtype="bfloat16")
        assert RowGradientSink.of(head.weight) is not None
        guard = NonFiniteGuard(0, torch.device("cpu"), backbone.buffers())
        step = TrainStep(backbone, backbone, head, opt, guard=guard, scaler=scaler, clip_grad_norm=1.0)
        g = torch.Generator().manual_seed(1)
        for _ in range(steps):
            assert step(torch.randn(8, 3, 2, 2, generator=g), torch.randint(0, 40, (8,), generator=g))
        return [p.detach().clone() for p in [*backbone.parameters(), *head.parameters()]]

    plain = run(None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    scaled = run(scaler)
    assert scaler.get_scale() == 2.0**13
    for a, b in zip(scaled, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    before = run(None, steps=0)
    overflow = torch.amp.GradScaler("cpu", init_scale=3e38)
    after = run(overflow, steps=1)
    assert all(torch.equal(a, b) for a, b in zip(after, before))
    assert overflow.get_scale() == pytest.approx(1.5e38)


def test_only_the_optimizers_own_weight_defers():
    head, opt = _head_and_optimizer()
    emb, labels = _batches(1)[0]
    twin = copy.deepcopy(head)  # its weight is another tensor: an ordinary gradient
    twin(emb, labels).backward()
    assert twin.weight.grad is not None and twin.weight.grad.is_sparse
    float32_head, _ = _head_and_optimizer(fc_state_dtype="float32")
    float32_head(emb, labels).backward()
    assert float32_head.weight.grad.is_sparse
    head(emb, labels).backward()
    assert head.weight.grad is None and RowGradientSink.of(head.weight).gradient is not None
    opt.zero_grad()
    assert RowGradientSink.of(head.weight).gradient is None
    del opt  # its optimizer is gone: the weight gets ordinary gradients again
    head(emb, labels).backward()
    assert head.weight.grad is not None
