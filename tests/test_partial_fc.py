"""PartialFC against a single-process full-softmax reference over the global batch."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from helpers import run_distributed
from losses import CombinedMarginLoss, PartialFC
from losses.partial_fc import shard_range

IN_DIM, EMB = 6, 5


def _problem(world_size, local_batch, num_classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = world_size * local_batch
    x = torch.randn(n, IN_DIM, generator=g, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    centres = torch.randn(num_classes, EMB, generator=g, dtype=torch.float64)
    backbone = torch.nn.Linear(IN_DIM, EMB).double()
    with torch.no_grad():
        backbone.weight.copy_(torch.randn(EMB, IN_DIM, generator=g, dtype=torch.float64))
        backbone.bias.copy_(torch.randn(EMB, generator=g, dtype=torch.float64))
    return x, labels, centres, backbone


def _margin():
    return CombinedMarginLoss(16.0, 1.0, 0.4, 0.1)


def _reference(x, labels, centres, backbone, classes=None):
    """Plain full softmax over `classes` (default: all) of the whole global batch."""
    bb = torch.nn.Linear(IN_DIM, EMB).double()
    bb.load_state_dict(backbone.state_dict())
    w = centres.clone().requires_grad_()
    if classes is None:
        used, targets = w, labels
    else:
        used, targets = w[classes], torch.searchsorted(classes, labels)
    logits = F.linear(F.normalize(bb(x)), F.normalize(used))
    loss = F.cross_entropy(_margin()(logits, targets), targets)
    loss.backward()
    return loss.detach(), w.grad, {k: p.grad for k, p in bb.named_parameters()}


def _run_pfc(ctx, local_batch, num_classes, sample_rate, seed):
    torch.manual_seed(100 + ctx.rank)  # ranks sample negatives independently
    x, labels, centres, backbone = _problem(ctx.world_size, local_batch, num_classes, seed)
    start, num_local = shard_range(num_classes, ctx.rank, ctx.world_size)
    pfc = PartialFC(_margin(), EMB, num_classes, sample_rate=sample_rate)
    assert (pfc.class_start, pfc.num_local) == (start, num_local)
    with torch.no_grad():
        pfc.weight.data = centres[start : start + num_local].clone()
    model = DDP(backbone) if ctx.world_size > 1 else backbone
    sl = slice(ctx.rank * local_batch, (ctx.rank + 1) * local_batch)
    loss = pfc(model(x[sl]), labels[sl])
    loss.backward()
    grad = pfc.weight.grad
    if grad.is_sparse:
        grad = grad.coalesce()
        rows = grad.indices()[0]
        values = grad.values()
    else:
        rows = torch.arange(num_local)
        values = grad
    return {
        "loss": loss.detach(),
        "start": start,
        "rows": rows,
        "values": values,
        "backbone": {k.removeprefix("module."): p.grad for k, p in model.named_parameters()},
    }


def _check_against_reference(results, world_size, local_batch, num_classes, sample_rate, seed):
    x, labels, centres, backbone = _problem(world_size, local_batch, num_classes, seed)
    global_rows = torch.cat([r["rows"] + r["start"] for r in results])
    classes = None if sample_rate == 1.0 else global_rows.sort().values
    if classes is not None:
        assert set(labels.tolist()) <= set(classes.tolist()), "every positive class must be sampled"
        assert len(classes) < num_classes
    ref_loss, ref_w_grad, ref_bb = _reference(x, labels, centres, backbone, classes)
    for r in results:
        torch.testing.assert_close(r["loss"], ref_loss)
        torch.testing.assert_close(r["values"], ref_w_grad[r["rows"] + r["start"]])
        for name, g in r["backbone"].items():
            torch.testing.assert_close(g, ref_bb[name])
    if classes is not None:
        unsampled = torch.ones(num_classes, dtype=torch.bool)
        unsampled[classes] = False
        assert torch.all(ref_w_grad[unsampled] == 0)


@pytest.mark.parametrize("sample_rate", [1.0, 0.3])
@pytest.mark.parametrize("pieces", ["one", "several"])
def test_single_process_matches_full_softmax(sample_rate, pieces, monkeypatch):
    if pieces == "several":  # the gradient's row projection done two rows at a time
        import losses.row_chunks

        monkeypatch.setattr(losses.row_chunks, "CPU_CHUNK_BYTES", 2 * EMB * 8)
    results = [_run_pfc_single(4, 13, sample_rate)]
    _check_against_reference(results, 1, 4, 13, sample_rate, seed=3)


def _run_pfc_single(local_batch, num_classes, sample_rate):
    from utils.distributed import DistContext

    return _run_pfc(DistContext(), local_batch, num_classes, sample_rate, 3)


@pytest.mark.parametrize("sample_rate", [1.0, 0.5])
def test_two_processes_uneven_shards_match_full_softmax(sample_rate):
    # 21 classes over 2 ranks: 11 + 10
    local_batch, num_classes, seed = 3, 21, 7
    results = run_distributed(_run_pfc, 2, local_batch, num_classes, sample_rate, seed)
    assert [r["start"] for r in results] == [0, 11]
    _check_against_reference(results, 2, local_batch, num_classes, sample_rate, seed)


def test_shard_ranges_follow_insightface():
    assert [shard_range(10, r, 4) for r in range(4)] == [(0, 3), (3, 3), (6, 2), (8, 2)]
    covered = [c for r in range(7) for c in range(*(lambda s, n: (s, s + n))(*shard_range(100, r, 7)))]
    assert covered == list(range(100))


@pytest.mark.parametrize("bad", [13, 20, -1])
def test_out_of_range_label_is_an_error_naming_it(bad):
    pfc = PartialFC(_margin(), EMB, 13)
    emb = torch.randn(3, EMB)
    with pytest.raises(ValueError, match=rf"label {bad} is outside \[0, num_classes=13\)"):
        pfc(emb, torch.tensor([0, bad, 2]))


def test_sampled_rows_always_include_the_positives_and_have_the_requested_size():
    pfc = PartialFC(_margin(), EMB, 1000, sample_rate=0.1)
    targets = torch.tensor([5, 999, 5, -1, 420])
    index, remapped = pfc.sample(targets)
    assert index.numel() == 100 and torch.all(index[1:] > index[:-1])
    assert {5, 999, 420} <= set(index.tolist())
    assert torch.equal(index[remapped[remapped >= 0]], targets[targets >= 0])
    assert remapped[3] == -1


def test_low_precision_matmul_stays_close_to_fp32():
    torch.manual_seed(0)
    emb = torch.randn(16, 32)
    labels = torch.randint(0, 50, (16,))
    full = PartialFC(CombinedMarginLoss(64.0, 1.0, 0.5, 0.0), 32, 50)
    half = PartialFC(CombinedMarginLoss(64.0, 1.0, 0.5, 0.0), 32, 50, matmul_dtype=torch.bfloat16)
    half.weight.data.copy_(full.weight.data)
    with torch.no_grad():
        a, b = full(emb, labels), half(emb, labels)
    assert b.dtype == torch.float32
    assert abs(a.item() - b.item()) / a.item() < 2e-2


def _run_pfc_deferred(ctx, local_batch, num_classes, sample_rate, seed):
    """_run_pfc in float32 with fc_state_dtype="bfloat16": the sampled rows' gradient is held by
    the optimizer as factors (losses.row_gradient); it is materialised here to be compared."""
    from losses.optim import _MaterialisedRows, build_optimizer
    from losses.row_gradient import RowGradientSink

    torch.manual_seed(100 + ctx.rank)  # ranks sample negatives independently
    x, labels, centres, backbone = _problem(ctx.world_size, local_batch, num_classes, seed)
    x, backbone = x.float(), backbone.float()
    start, num_local = shard_range(num_classes, ctx.rank, ctx.world_size)
    pfc = PartialFC(_margin(), EMB, num_classes, sample_rate=sample_rate)
    with torch.no_grad():
        pfc.weight.data = centres[start : start + num_local].float().clone()
    optimizer = build_optimizer("sgd", [], pfc.parameters(), lr=0.1, weight_decay=0.0, fc_state_dtype="bfloat16")
    model = DDP(backbone) if ctx.world_size > 1 else backbone
    sl = slice(ctx.rank * local_batch, (ctx.rank + 1) * local_batch)
    loss = pfc(model(x[sl]), labels[sl])
    loss.backward()
    assert pfc.weight.grad is None  # deferred: no [k x D] gradient was built
    gradient = RowGradientSink.of(pfc.weight).gradient
    rows = gradient.index
    values = _MaterialisedRows(gradient, pfc.weight)[0 : rows.numel()]
    del optimizer
    return {
        "loss": loss.detach().double(), "start": start, "rows": rows, "values": values.double(),
        "backbone": {k.removeprefix("module."): p.grad.double() for k, p in model.named_parameters()},
    }


def test_two_processes_with_bfloat16_state_hold_the_global_batch_gradient_as_factors():
    local_batch, num_classes, seed, rate = 3, 21, 7, 0.5
    results = run_distributed(_run_pfc_deferred, 2, local_batch, num_classes, rate, seed)
    x, labels, centres, backbone = _problem(2, local_batch, num_classes, seed)
    classes = torch.cat([r["rows"] + r["start"] for r in results]).sort().values
    assert set(labels.tolist()) <= set(classes.tolist()) and len(classes) < num_classes
    ref_loss, ref_w_grad, ref_bb = _reference(x, labels, centres, backbone, classes)
    for r in results:
        torch.testing.assert_close(r["loss"], ref_loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["values"], ref_w_grad[r["rows"] + r["start"]], rtol=1e-4, atol=1e-5)
        for name, g in r["backbone"].items():
            torch.testing.assert_close(g, ref_bb[name], rtol=1e-4, atol=1e-5)
