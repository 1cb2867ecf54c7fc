import torch
import torch.distributed as dist

from helpers import run_distributed
from utils.distributed import DistContext, init_distributed


def _sum_ranks(ctx):
    t = torch.tensor([ctx.rank + 1.0])
    dist.all_reduce(t)
    return ctx.rank, ctx.world_size, ctx.backend, float(t)


def test_two_gloo_processes_see_each_other():
    results = run_distributed(_sum_ranks, 2)
    assert results == [(0, 2, "gloo", 3.0), (1, 2, "gloo", 3.0)]


def test_single_process_creates_no_group(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    ctx = init_distributed(device="cpu")
    assert ctx == DistContext()
    assert not dist.is_initialized()
    assert ctx.is_main and not ctx.is_distributed


class _DDPBeforeForwardSyncBuffers(torch.nn.parallel.DistributedDataParallel):
    """DDP as torch < 2.13 offers it: no forward_sync_buffers, and broadcast_buffers=False
    also keeps the buffers out of the sync at wrapping time."""

    def __init__(self, module, device_ids=None, broadcast_buffers=True, bucket_cap_mb=None):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the 2.13 build deprecates the old spelling
            super().__init__(module, device_ids=device_ids, broadcast_buffers=broadcast_buffers,
                             bucket_cap_mb=bucket_cap_mb)


def _buffers_after_wrapping(ctx, old_torch):
    from utils.distributed import wrap_ddp

    if old_torch:
        torch.nn.parallel.DistributedDataParallel = _DDPBeforeForwardSyncBuffers
    torch.manual_seed(ctx.rank)  # different weights and statistics on every rank
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    model[1].running_mean.fill_(ctx.rank + 1.0)
    wrapped = wrap_ddp(model, ctx)
    at_wrap = (model[0].weight.detach().clone(), model[1].running_mean.clone())
    wrapped(torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(10 + ctx.rank))).sum().backward()
    return at_wrap, model[1].running_mean.clone()


def _check_rank0_state_then_per_rank_statistics(results):
    (w0, mean0), after0 = results[0]
    (w1, mean1), after1 = results[1]
    assert torch.equal(w0, w1)  # rank 0's weights everywhere
    assert torch.equal(mean0, mean1) and torch.all(mean0 == 1.0)  # and its BatchNorm statistics
    assert not torch.equal(after0, after1)  # training statistics then stay per rank (not re-synced)


def test_ddp_copies_rank0_buffers_once_then_keeps_them_per_rank():
    _check_rank0_state_then_per_rank_statistics(run_distributed(_buffers_after_wrapping, 2, False))


def test_ddp_of_older_torch_gets_rank0_buffers_too():
    _check_rank0_state_then_per_rank_statistics(run_distributed(_buffers_after_wrapping, 2, True))
