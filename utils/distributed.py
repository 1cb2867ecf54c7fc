"""The one place that knows how this process was launched.

`init_distributed()` reads torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, MASTER_ADDR/PORT); without it the run is a single process and
no process group is created. Everything else receives the resulting
`DistContext` as an argument instead of reading globals.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from utils.errors import UserError


class DeviceError(UserError, RuntimeError):
    """The launch asks for devices this machine does not have."""


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.is_distributed:
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def init_distributed(timeout_minutes: float = 30.0, device: str | None = None) -> DistContext:
    """Set up this process from the launcher's environment.

    NCCL with one GPU per local rank when CUDA is available, gloo on CPU
    otherwise. `device` ("cpu"/"cuda") forces the device type. With no launcher
    (or WORLD_SIZE=1) no process group is created.
    """
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", world_size if world_size > 1 else 1)

    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda:
        visible = torch.cuda.device_count()
        if local_rank >= visible:
            # torch's own message ("invalid device ordinal") does not say what to change.
            if visible == 0:
                raise DeviceError(f"local rank {local_rank} asks for CUDA, but this node has no visible CUDA "
                                  "device: train on the CPU with --device=cpu")
            raise DeviceError(
                f"local rank {local_rank} needs GPU {local_rank}, but this node has {visible} visible CUDA "
                f"device{'s' if visible != 1 else ''}: start at most {visible} processes per node "
                "(--nproc_per_node) or train on the CPU with --device=cpu"
            )
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")

    backend = None
    if world_size > 1:
        backend = "nccl" if use_cuda else "gloo"
        if not dist.is_initialized():
            timeout = datetime.timedelta(minutes=timeout_minutes)
            kwargs = {}
            if backend == "nccl":
                kwargs["device_id"] = dev  # binds the communicator to this GPU eagerly
            store = _elastic_attempt_store(world_size, timeout)
            if store is not None:
                kwargs["store"] = store
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout, **kwargs)
    return DistContext(rank, local_rank, world_size, local_world_size, dev, backend)


def _elastic_attempt_store(world_size: int, timeout: datetime.timedelta):
    """The torchrun agent's store, with the keys of this restart attempt kept apart.

    torchrun's c10d rendezvous keeps one TCPStore for every restart of the worker group
    and no longer prefixes the attempts (pytorch/pytorch#135712): a restarted rank can
    read the address that a rank of the failed attempt published and fail to connect
    ("Gloo connectFullMesh failed ... Connection refused"). A failure restarts every
    worker of the group, so all of them see the same TORCHELASTIC_RESTART_COUNT.
    None outside torchrun (init_process_group then reads MASTER_ADDR/PORT itself).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False, timeout=timeout
    )
    return dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def cleanup_distributed() -> None:
    """Destroy the process group if this process created one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model: torch.nn.Module, ctx: DistContext, *, bucket_cap_mb: int = 16) -> torch.nn.Module:
    """DistributedDataParallel around `model` whose buffers (BatchNorm statistics) stay per rank
    in training, as in insightface, after one copy of rank 0's at wrapping time.

    torch 2.13 spells this `forward_sync_buffers=False`; older releases only have
    `broadcast_buffers=False`, which also leaves the buffers out of the initial sync, so
    they are broadcast here. Either way every rank starts from rank 0's state (a resumed
    run loads it on rank 0 only).
    """
    import inspect

    ddp = torch.nn.parallel.DistributedDataParallel
    device_ids = [ctx.local_rank] if ctx.device.type == "cuda" else None
    if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters:
        return ddp(model, device_ids=device_ids, forward_sync_buffers=False, bucket_cap_mb=bucket_cap_mb)
    wrapped = ddp(model, device_ids=device_ids, broadcast_buffers=False, bucket_cap_mb=bucket_cap_mb)
    with torch.no_grad():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
    return wrapped


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank when `flag` is true on any rank (collective; the flag itself without a group)."""
    if not ctx.is_distributed:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=ctx.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())

