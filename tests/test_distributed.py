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
