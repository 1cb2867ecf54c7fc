"""Sampled-row optimizer semantics: only the sampled rows and their state change."""
import io

import pytest
import torch

from losses import CombinedMarginLoss, PartialFC
from losses.optim import SampledRowAdamW, SampledRowSGD, build_optimizer


def _sparse_rows(rows, values, shape):
    idx = torch.tensor([rows])
    return torch.sparse_coo_tensor(idx, values, shape, check_invariants=True)


def _grads(seed, rows, dim=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(rows), dim, generator=g, dtype=torch.float64)


STEPS = [[1, 4], [4, 7], [1, 4, 8]]


def _manual_sgd(w0, lr, momentum, wd):
    w = w0.clone()
    buf = torch.zeros_like(w)
    for i, rows in enumerate(STEPS):
        g = _grads(i, rows)
        for j, r in enumerate(rows):
            d = g[j] + wd * w[r]
            buf[r] = momentum * buf[r] + d
            w[r] -= lr * buf[r]
    return w, buf


@pytest.mark.parametrize("fused", [False, True])
def test_sgd_updates_exactly_the_sampled_rows(fused):
    w0 = torch.randn(10, 3, dtype=torch.float64)
    p = torch.nn.Parameter(w0.clone())
    opt = SampledRowSGD([p], lr=0.1, momentum=0.9, weight_decay=0.01, fused=fused)
    for i, rows in enumerate(STEPS):
        p.grad = _sparse_rows(rows, _grads(i, rows), p.shape)
        before = p.detach().clone()
        buf_before = opt.state[p]["momentum_buffer"].clone() if opt.state[p] else torch.zeros_like(w0)
        opt.step()
        untouched = [r for r in range(10) if r not in rows]
        assert torch.equal(p.detach()[untouched], before[untouched])
        assert torch.equal(opt.state[p]["momentum_buffer"][untouched], buf_before[untouched])
    ref_w, ref_buf = _manual_sgd(w0, 0.1, 0.9, 0.01)
    torch.testing.assert_close(p.detach(), ref_w)
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], ref_buf)
    assert torch.equal(p.detach()[[0, 2, 3, 5, 6, 9]], w0[[0, 2, 3, 5, 6, 9]])


def test_dense_parameters_follow_stock_sgd_and_adamw():
    torch.manual_seed(0)
    for ours, stock, kw in [
        (SampledRowSGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4)),
        (SampledRowAdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    ]:
        a = torch.nn.Parameter(torch.randn(4, 5))
        b = torch.nn.Parameter(a.detach().clone())
        oa, ob = ours([a], **kw), stock([b], **kw)
        for _ in range(3):
            g = torch.randn(4, 5)
            a.grad, b.grad = g.clone(), g.clone()
            oa.step()
            ob.step()
        torch.testing.assert_close(a, b)


def test_adamw_rows_use_their_own_step_counts():
    w0 = torch.randn(10, 3, dtype=torch.float64)
    p = torch.nn.Parameter(w0.clone())
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    opt = SampledRowAdamW([p], **kw)
    refs = {r: torch.nn.Parameter(w0[r : r + 1].clone()) for r in range(10)}
    ref_opts = {r: torch.optim.AdamW([refs[r]], **kw) for r in range(10)}
    for i, rows in enumerate(STEPS):
        g = _grads(i, rows)
        p.grad = _sparse_rows(rows, g, p.shape)
        opt.step()
        for j, r in enumerate(rows):  # a row's history is a dense AdamW over its own steps only
            refs[r].grad = g[j : j + 1].clone()
            ref_opts[r].step()
    for r in range(10):
        torch.testing.assert_close(p.detach()[r : r + 1], refs[r].detach())
    assert opt.state[p]["row_step"].tolist() == [0, 2, 0, 0, 3, 0, 0, 1, 1, 0]
    assert torch.all(opt.state[p]["exp_avg"][[0, 2, 3, 5, 6, 9]] == 0)


def test_partial_fc_step_touches_only_sampled_class_centres():
    torch.manual_seed(0)
    backbone = torch.nn.Linear(8, 16)
    pfc = PartialFC(CombinedMarginLoss(64.0, 1.0, 0.5, 0.0), 16, 200, sample_rate=0.1)
    opt = build_optimizer("sgd", backbone.parameters(), pfc.parameters(), lr=0.1, weight_decay=5e-4)
    before = pfc.weight.detach().clone()
    loss = pfc(backbone(torch.randn(6, 8)), torch.randint(0, 200, (6,)))
    loss.backward()
    assert pfc.weight.grad.is_sparse
    sampled = pfc.weight.grad.coalesce().indices()[0]
    assert sampled.numel() == 20
    opt.step()
    changed = (pfc.weight.detach() != before).any(dim=1).nonzero().view(-1)
    assert torch.equal(changed, sampled.sort().values)
    buf = opt.state[pfc.weight]["momentum_buffer"]
    assert torch.equal((buf != 0).any(dim=1).nonzero().view(-1), changed)
    assert all(p.grad is not None for p in backbone.parameters())


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    p1 = torch.nn.Parameter(torch.randn(10, 3, dtype=torch.float64))
    o1 = SampledRowAdamW([p1], lr=1e-2)
    p1.grad = _sparse_rows([2, 3], _grads(0, [2, 3]), p1.shape)
    o1.step()
    p2 = torch.nn.Parameter(p1.detach().clone())
    o2 = SampledRowAdamW([p2], lr=1e-2)
    buffer = io.BytesIO()  # as a checkpoint on disk would
    torch.save(o1.state_dict(), buffer)
    buffer.seek(0)
    o2.load_state_dict(torch.load(buffer, weights_only=True))
    for p, o in ((p1, o1), (p2, o2)):
        p.grad = _sparse_rows([3, 5], _grads(1, [3, 5]), p.shape)
        o.step()
    torch.testing.assert_close(p1, p2)


def test_unsupported_row_options_fail_clearly():
    p = torch.nn.Parameter(torch.randn(4, 2))
    opt = SampledRowSGD([p], lr=0.1, momentum=0.9, nesterov=True)
    p.grad = _sparse_rows([1], torch.randn(1, 2), p.shape)
    with pytest.raises(ValueError, match="nesterov"):
        opt.step()


@pytest.mark.parametrize("cls", [SampledRowSGD, SampledRowAdamW])
@pytest.mark.parametrize("fused", [True, False])
def test_found_inf_voids_the_whole_step(cls, fused):
    torch.manual_seed(0)
    dense = torch.nn.Parameter(torch.randn(4, 3))
    rows = torch.nn.Parameter(torch.randn(10, 3))
    kw = dict(momentum=0.9) if cls is SampledRowSGD else {}
    opt = cls([dense, rows], lr=0.1, weight_decay=0.01, fused=fused, **kw)

    def set_grads():
        dense.grad = torch.randn(4, 3)
        rows.grad = _sparse_rows([2, 5], torch.randn(2, 3), rows.shape)

    set_grads()
    opt.step()  # creates optimizer state
    snapshot = [dense.detach().clone(), rows.detach().clone()]
    state = {(i, k): v.clone() for i, s in enumerate(opt.state.values()) for k, v in s.items() if torch.is_tensor(v)}
    set_grads()
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    del opt.found_inf
    assert torch.equal(dense.detach(), snapshot[0]) and torch.equal(rows.detach(), snapshot[1])
    after = {(i, k): v for i, s in enumerate(opt.state.values()) for k, v in s.items() if torch.is_tensor(v)}
    assert state.keys() == after.keys()
    assert all(torch.equal(state[k], after[k]) for k in state if k[1] != "step"), "state changed on a void step"
    assert all(torch.equal(state[k], after[k]) for k in state if k[1] == "step" and k[0] == 0)
    opt.found_inf = torch.tensor(0.0)
    opt.step()
    assert not torch.equal(dense.detach(), snapshot[0]) and not torch.equal(rows.detach(), snapshot[1])


@pytest.fixture
def tiny_chunks(monkeypatch):
    """Row updates in pieces of two rows, so that the piece boundaries are exercised."""
    import losses.row_chunks

    monkeypatch.setattr(losses.row_chunks, "CPU_CHUNK_BYTES", 2 * 3 * 8)


@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_row_updates_in_pieces_match_the_formula(tiny_chunks, momentum):
    w0 = torch.randn(10, 3, dtype=torch.float64)
    p = torch.nn.Parameter(w0.clone())
    opt = SampledRowSGD([p], lr=0.1, momentum=momentum, weight_decay=0.01)
    for i, rows in enumerate(STEPS):
        p.grad = _sparse_rows(rows, _grads(i, rows), p.shape)
        opt.step()
    ref_w, ref_buf = _manual_sgd(w0, 0.1, momentum, 0.01)
    torch.testing.assert_close(p.detach(), ref_w)
    if momentum:
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], ref_buf)
    else:
        assert "momentum_buffer" not in opt.state[p]


def test_adamw_in_pieces_matches_adamw_in_one_piece(monkeypatch):
    import losses.row_chunks

    results = []
    for chunk_bytes in (losses.row_chunks.CPU_CHUNK_BYTES, 2 * 3 * 8):
        monkeypatch.setattr(losses.row_chunks, "CPU_CHUNK_BYTES", chunk_bytes)
        p = torch.nn.Parameter(torch.arange(30, dtype=torch.float64).view(10, 3) / 30)
        opt = SampledRowAdamW([p], lr=1e-2, weight_decay=0.1)
        for i, rows in enumerate(STEPS):
            p.grad = _sparse_rows(rows, _grads(i, rows), p.shape)
            opt.step()
        results.append((p.detach().clone(), opt.state[p]["exp_avg_sq"].clone()))
    torch.testing.assert_close(results[0], results[1])


def test_repeated_rows_are_summed_first():
    # Gradient accumulation concatenates sparse gradients: a row can appear twice, unsorted.
    w0 = torch.randn(10, 3, dtype=torch.float64)
    g = _grads(0, [0, 1, 2])
    p = torch.nn.Parameter(w0.clone())
    opt = SampledRowSGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.sparse_coo_tensor(torch.tensor([[7, 2, 7]]), g, p.shape, check_invariants=True)
    opt.step()
    expected = w0.clone()
    expected[7] -= 0.1 * (g[0] + g[2])
    expected[2] -= 0.1 * g[1]
    torch.testing.assert_close(p.detach(), expected)


@pytest.mark.parametrize("cls", [SampledRowSGD, SampledRowAdamW])
def test_device_side_skip_leaves_rows_and_state_unchanged(cls):
    # On an accelerator the void-step decision stays on the device (no host sync): the row
    # update then writes the old values back. On a CPU step() decides on the host, so this
    # path is exercised directly.
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(10, 3))
    kw = dict(momentum=0.9) if cls is SampledRowSGD else {}
    opt = cls([p], lr=0.1, weight_decay=0.01, **kw)
    p.grad = _sparse_rows([2, 5], torch.randn(2, 3), p.shape)
    opt.step()
    before = p.detach().clone()
    state = {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v) and k != "step"}
    rows, values = torch.tensor([2, 5, 8]), torch.randn(3, 3)
    with torch.no_grad():  # as inside step()
        opt._row_update(opt.param_groups[0], p, rows, values, skip=torch.tensor(True))
    assert torch.equal(p.detach(), before)
    assert all(torch.equal(opt.state[p][k], v) for k, v in state.items())
    with torch.no_grad():
        opt._row_update(opt.param_groups[0], p, rows, values, skip=torch.tensor(False))
    changed = (p.detach() != before).any(dim=1).nonzero().view(-1)
    assert changed.tolist() == [2, 5, 8]


@pytest.mark.parametrize("cls", [SampledRowSGD, SampledRowAdamW])
def test_grad_scaler_hands_scale_and_inf_flag_to_the_fused_step(cls):
    # With fused groups GradScaler does not read the inf flag on the host: it passes the
    # scale and the flag to step(), which must unscale the sampled rows and skip on inf.
    kw = dict(momentum=0.9) if cls is SampledRowSGD else {}

    def make():
        torch.manual_seed(0)
        dense = torch.nn.Parameter(torch.randn(4, 3))
        rows = torch.nn.Parameter(torch.randn(10, 3))
        return dense, rows, cls([dense, rows], lr=0.1, weight_decay=0.01, fused=True, **kw)

    g_dense, g_rows = torch.randn(4, 3), torch.randn(2, 3)
    dense, rows, opt = make()
    assert opt._step_supports_amp_scaling
    scale = 2.0**10
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    assert scaler.scale(torch.tensor(1.0)) == scale  # (as scaler.scale(loss).backward() would)
    dense.grad = g_dense * scale
    rows.grad = _sparse_rows([2, 5], g_rows * scale, rows.shape)
    scaler.step(opt)
    scaler.update()

    ref_dense, ref_rows, ref_opt = make()
    ref_dense.grad = g_dense.clone()
    ref_rows.grad = _sparse_rows([2, 5], g_rows.clone(), ref_rows.shape)
    ref_opt.step()
    torch.testing.assert_close(dense.detach(), ref_dense.detach())
    torch.testing.assert_close(rows.detach(), ref_rows.detach())

    before = [dense.detach().clone(), rows.detach().clone()]
    dense.grad = g_dense * scale
    rows.grad = _sparse_rows([2, 5], torch.tensor([[float("inf"), 0, 0], [0, 0, 0]]), rows.shape)
    scaler.step(opt)
    scaler.update()
    assert torch.equal(dense.detach(), before[0]) and torch.equal(rows.detach(), before[1])
    assert scaler.get_scale() < scale


def test_sgd_gives_a_zero_momentum_buffer_before_a_step_the_device_may_skip():
    """torch's fused SGD starts momentum from an uninitialised buffer that a device-side
    skip (found_inf) leaves as garbage; ours is zero before such a step (tests/test_cuda.py
    runs the skipped step itself)."""
    from losses.optim import build_optimizer

    p = torch.nn.Parameter(torch.ones(3, 2))
    optimizer = build_optimizer("sgd", [p], [], lr=0.1, weight_decay=0.0, device_type="cpu")
    p.grad = torch.ones_like(p)
    optimizer._before_dense_step()
    assert "momentum_buffer" not in optimizer.state[p]  # no device skip pending: torch's own start
    optimizer.found_inf = torch.zeros(())
    optimizer._before_dense_step()
    assert torch.equal(optimizer.state[p]["momentum_buffer"], torch.zeros(3, 2))


@pytest.mark.parametrize("sample_rate", [1.0, 0.5])  # dense and sparse-row class-centre gradients
@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_grad_scaler_unscale_clip_and_step_as_the_training_step_calls_them(name, sample_rate):
    """training.step.TrainStep with a GradScaler: the scaled loss's gradients are unscaled
    (scaler.unscale_) before clipping, then scaler.step hands the fused optimizer the inf
    flag. The updates equal those of the same step without a scaler; an overflowing scale
    updates nothing, and the scaler lowers it."""
    from training.guard import NonFiniteGuard
    from training.step import TrainStep

    clip = 0.05

    def run(scaler, clip_norm=clip, steps=3):
        torch.manual_seed(0)
        backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8))
        head = PartialFC(CombinedMarginLoss(16.0, 1.0, 0.3, 0.0), 8, 10, sample_rate)
        opt = build_optimizer(name, backbone.parameters(), head.parameters(), lr=0.05, weight_decay=5e-4)
        guard = NonFiniteGuard(0, torch.device("cpu"), backbone.buffers())
        step = TrainStep(backbone, backbone, head, opt, guard=guard, scaler=scaler, clip_grad_norm=clip_norm)
        g = torch.Generator().manual_seed(1)
        for _ in range(steps):
            assert step(torch.randn(4, 3, 2, 2, generator=g), torch.randint(0, 10, (4,), generator=g))
        return [p.detach().clone() for p in [*backbone.parameters(), *head.parameters()]], guard

    plain, _ = run(None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    scaled, _ = run(scaler)
    assert scaler.get_scale() == 2.0**13  # three steps without overflow, each one grew it
    for a, b in zip(scaled, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    unclipped, _ = run(None, clip_norm=0.0)
    assert any(not torch.allclose(a, b) for a, b in zip(unclipped, plain))  # the clip was active

    before, _ = run(None, steps=0)
    overflow = torch.amp.GradScaler("cpu", init_scale=3e38)  # loss * scale is inf
    after, guard = run(overflow, steps=1)
    assert all(torch.equal(a, b) for a, b in zip(after, before))
    assert overflow.get_scale() == pytest.approx(1.5e38) and int(guard.skipped) == 0  # the loss itself was finite
