"""The one place that knows how this process was launched.

`init_distributed()` reads torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, MASTER_ADDR/PORT); without it the run is a single process and
no process group is created. Everything else receives the resulting
`DistContext` as an argument instead of reading globals.
"""
from __future__ import annotations

import datetime
import os
import time
import uuid
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
    # Identifies this launch under torchelastic: the same for every rank and every restart of
    # the job (kept in the agents' store), another value for another job. None without one.
    job_id: str | None = None

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
    timeout = datetime.timedelta(minutes=timeout_minutes)
    agent_store = _elastic_agent_store(world_size, timeout)
    job_id = None
    if world_size > 1:
        backend = "nccl" if use_cuda else "gloo"
        if not dist.is_initialized():
            kwargs = {}
            if backend == "nccl":
                kwargs["device_id"] = dev  # binds the communicator to this GPU eagerly
            if agent_store is not None:
                attempt, job_id = _agree_on_attempt(agent_store, rank, world_size, timeout)
                kwargs["store"] = dist.PrefixStore(f"{_KEYS}/attempt/{attempt}", agent_store)
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout, **kwargs)
    elif agent_store is not None:
        job_id = _job_id(agent_store)
    return DistContext(rank, local_rank, world_size, local_world_size, dev, backend, job_id)


_KEYS = "arcface_torch"  # this project's keys in the torchelastic agents' store


def _elastic_agent_store(world_size: int, timeout: datetime.timedelta):
    """A client of the store that torchrun's agents keep for the whole job, or None.

    None outside torchrun, and when the agents do not share their store
    (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: init_process_group then reads MASTER_ADDR/PORT,
    and rank 0 hosts a fresh store for every attempt).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    return dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False, timeout=timeout
    )


def _job_id(store) -> str:
    """The job's id in the agents' store: created by the first rank that asks, kept across restarts."""
    return store.compare_set(f"{_KEYS}/job", "", uuid.uuid4().hex).decode()


def _agree_on_attempt(store, rank: int, world_size: int, timeout: datetime.timedelta) -> tuple[str, str]:
    """(a key prefix for this attempt's process group, the job id), the same on every rank.

    torchrun's agents keep one store for every restart of the job and do not separate the
    attempts' keys (pytorch/pytorch#135712): a restarted rank could read the address that a
    rank of the failed attempt published and fail with "Gloo connectFullMesh failed ...
    Connection refused". TORCHELASTIC_RESTART_COUNT cannot name the attempt: an agent
    advances it only when one of its own workers failed, so the nodes disagree after a
    failure on one of them. Instead rank 0 draws a fresh attempt id, and each other rank
    asks for it with a fresh nonce of its own: the answer to that nonce can only come from
    this attempt's rank 0 (every worker of an earlier attempt was stopped before this one
    started), so no rank can pick up an earlier attempt's id.
    """
    if rank != 0:
        nonce = uuid.uuid4().hex
        store.set(f"{_KEYS}/hello/{rank}", nonce)
        attempt, job_id = store.get(f"{_KEYS}/welcome/{nonce}").decode().split()  # waits up to `timeout`
        store.set(f"{_KEYS}/attempt/{attempt}/joined/{rank}", "1")
        return attempt, job_id
    attempt, job_id = uuid.uuid4().hex, _job_id(store)
    answered: dict[int, str] = {}  # rank -> the nonce answered last
    pending = set(range(1, world_size))
    deadline = time.monotonic() + timeout.total_seconds()
    pause = 0.002
    # A rank's hello may still be its previous incarnation's until the new one arrives, so
    # rank 0 answers every nonce it sees until the rank confirms (the store has no way to
    # wait for a key to change: it polls, with a growing pause of at most 0.1 s).
    while pending:
        for r in sorted(pending):
            hello = f"{_KEYS}/hello/{r}"
            if store.check([hello]):
                nonce = store.get(hello).decode()
                if answered.get(r) != nonce:
                    store.set(f"{_KEYS}/welcome/{nonce}", f"{attempt} {job_id}")
                    answered[r] = nonce
            if store.check([f"{_KEYS}/attempt/{attempt}/joined/{r}"]):
                pending.discard(r)
        if pending:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"ranks {sorted(pending)} did not join the process group within {timeout} (torchelastic store "
                    f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')})"
                )
            time.sleep(pause)
            pause = min(2 * pause, 0.1)
    return attempt, job_id


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


def broadcast_object(obj, ctx: DistContext, src: int = 0):
    """`obj` of rank `src` on every rank (collective; pickled, so keep it small)."""
    if not ctx.is_distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=ctx.device if ctx.backend == "nccl" else None)
    return box[0]


def first_error(error: str | None, ctx: DistContext) -> str | None:
    """The error message of the lowest rank that has one, on every rank; None when no rank has.

    Collective. Costs one small all_reduce when no rank failed; the messages travel only
    when one did, so every rank can stop with the same line.
    """
    if not any_rank(error is not None, ctx):
        return None
    if not ctx.is_distributed:
        return error
    errors: list = [None] * ctx.world_size
    dist.all_gather_object(errors, error)
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    message = failed[0][1]
    if len(failed) > 1:
        message += f" (and on rank{'s' if len(failed) > 2 else ''} {', '.join(str(r) for r, _ in failed[1:])})"
    return message


def same_on_every_rank(value: int, ctx: DistContext) -> tuple[int, int]:
    """(smallest, largest) of an integer over all ranks (collective): equal when the ranks agree."""
    if not ctx.is_distributed:
        return value, value
    t = torch.tensor([value, -value], dtype=torch.int64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return -int(t[1].item()), int(t[0].item())


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank when `flag` is true on any rank (collective; the flag itself without a group)."""
    if not ctx.is_distributed:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=ctx.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())

