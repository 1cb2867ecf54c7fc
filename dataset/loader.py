"""The training data loader: sampler -> batches decoded in worker processes -> device.

Workers load whole batches as uint8 (a quarter of the bytes of float32 through shared
and pinned memory); the conversion to normalised float32 happens on the training device.
On CUDA the next batch is copied and normalised on a side stream while the current one
is being used. Errors of the data (DataError) cross from the workers as values and are
raised again in the main process with their own message.
"""
from __future__ import annotations

import atexit
import multiprocessing
import os
import random
import signal
import weakref
from functools import partial
from typing import Iterator

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dataset.base import FaceDataset
from dataset.errors import DataError
from dataset.info import SYNTHETIC, dataset_kind, open_dataset
from dataset.sampler import ResumableDistributedSampler
from dataset.transforms import normalize_batch


class _BatchRequests(Sampler):
    """One item per batch: (epoch, sample indices); full batches only (drop_last)."""

    def __init__(self, sampler: ResumableDistributedSampler, batch_size: int):
        self.sampler, self.batch_size = sampler, batch_size

    def __iter__(self):
        epoch, indices = self.sampler.epoch, self.sampler.indices()
        for start in range(0, len(indices) - self.batch_size + 1, self.batch_size):
            yield epoch, indices[start:start + self.batch_size]

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size


class _WorkerDataError:
    """A DataError raised in a worker, sent as a value so its message arrives unchanged."""

    def __init__(self, error: DataError):
        self.error = error


class _Batches(Dataset):
    """Adapter that the torch DataLoader indexes with (epoch, indices) requests."""

    def __init__(self, dataset: FaceDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, request):
        epoch, indices = request
        skipped = self.dataset.num_skipped
        try:
            images, labels = self.dataset.load_batch(indices, epoch)
        except DataError as e:
            return _WorkerDataError(e)
        return images, labels, self.dataset.num_skipped - skipped


def _as_is(batch):
    return batch


def _worker_context():
    # spawn rather than forkserver: a worker's parent is then the training process itself,
    # which torch's worker watchdog follows (a forkserver would be killed with the process
    # group by torchrun's SIGTERM, and the workers would follow it).
    return multiprocessing.get_context("spawn")


def _seed_worker(worker_id: int, base_seed: int) -> None:
    seed = base_seed + worker_id
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    cv2.setNumThreads(1)  # the workers are the parallelism; OpenCV's own pool would oversubscribe
    # torchrun delivers SIGTERM (pre-emption) to the whole process group. The training
    # process answers it with a checkpoint at the next step, which needs its workers alive;
    # they exit when the training process shuts the loader down (or dies).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class FaceDataLoader:
    """Iterates (images float32 N x 3 x H x W, labels int64 N) on `device`, full batches only."""

    def __init__(
        self,
        dataset: FaceDataset,
        sampler: ResumableDistributedSampler,
        batch_size: int,
        *,
        num_workers: int = 2,
        seed: int = 2048,
        rank: int = 0,
        device: torch.device | str = "cpu",
    ):
        self.dataset, self.sampler, self.batch_size = dataset, sampler, batch_size
        self.device = torch.device(device)
        self.num_skipped = 0  # undecodable images replaced so far, over all workers
        on_cuda = self.device.type == "cuda"
        self._loader = DataLoader(
            _Batches(dataset),
            batch_size=None,
            sampler=_BatchRequests(sampler, batch_size),
            collate_fn=_as_is,
            num_workers=num_workers,
            pin_memory=on_cuda,
            worker_init_fn=partial(_seed_worker, base_seed=seed + num_workers * rank),
            persistent_workers=num_workers > 0,
            # Workers start from a clean process, not a fork of this one: a fork inherits
            # OpenCV's and OpenMP's thread pools in whatever state their locks were (the
            # verification sets are decoded by a thread pool before training starts), and
            # such a child can deadlock in its first cv2 call.
            multiprocessing_context=_worker_context() if num_workers > 0 else None,
            # Its own generator: a DataLoader iterator otherwise draws its worker base seed
            # from the global torch RNG, which would shift PartialFC's negative sampling
            # between an uninterrupted run and a resumed one.
            generator=torch.Generator().manual_seed(seed + rank),
        )
        if num_workers > 0:
            # The workers ignore SIGTERM (_seed_worker), and multiprocessing's exit handler
            # stops daemonic children with SIGTERM and then joins them: a process leaving on
            # an exception (a dead peer under torchrun, say) would wait there until torchrun
            # kills it, delaying the elastic restart. Handlers run last-registered first, so
            # this one asks the workers to finish before multiprocessing's runs.
            _stop_workers_at_exit.register(self)

    def close(self) -> None:
        """Stop the worker processes (they are started again by the next iteration)."""
        iterator = getattr(self._loader, "_iterator", None)  # persistent workers live here
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self._loader._iterator = None

    def __len__(self) -> int:
        """Batches in a whole epoch."""
        return self.sampler.num_samples // self.batch_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Next iteration yields epoch `epoch` from its batch `start_batch` on (resume)."""
        self.sampler.set_epoch(epoch, start_batch)
        self.dataset.set_epoch(epoch)

    def _host_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        try:
            for item in self._loader:
                if isinstance(item, _WorkerDataError):
                    raise item.error
                images, labels, skipped = item
                self.num_skipped += skipped
                yield images, labels
        except Exception:
            # Stop the workers now: the exception's traceback keeps this loader in a
            # reference cycle, and torch's shutdown of workers from inside the garbage
            # collector does not reach them (they would outlive the loader and hold up exit).
            self.close()
            raise

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.device.type == "cuda":
            return _cuda_prefetch(self._host_batches(), self.device)
        return ((normalize_batch(images.to(self.device)), labels.to(self.device)) for images, labels in self._host_batches())


class _WorkerStopper:
    """Stops the workers of every loader still alive when the process exits (see above).

    One hook for all loaders, registered when the first loader with workers is made (so it
    runs before multiprocessing's own). It closes loaders that are only reachable from a
    reference cycle (an exception's traceback, say) too: they are still in the WeakSet,
    since nothing collects cycles before exit. (Collecting them here instead would shut
    their workers down from inside the garbage collector, which at exit fails to reach them.)
    """

    def __init__(self):
        self.loaders: weakref.WeakSet = weakref.WeakSet()
        self.installed = False

    def register(self, loader: "FaceDataLoader") -> None:
        self.loaders.add(loader)
        if not self.installed:
            atexit.register(self)
            self.installed = True

    def __call__(self) -> None:
        for loader in list(self.loaders):
            loader.close()


_stop_workers_at_exit = _WorkerStopper()


def _cuda_prefetch(batches, device: torch.device):
    """Copy + normalise batch k+1 on a side stream while the caller works on batch k."""
    stream = torch.cuda.Stream(device=device)

    def stage(images: torch.Tensor, labels: torch.Tensor):
        with torch.cuda.stream(stream):
            images = normalize_batch(images.to(device, non_blocking=True))
            labels = labels.to(device, non_blocking=True)
        return images, labels

    ahead = None
    for host_images, host_labels in batches:
        if ahead is None:
            ahead = stage(host_images, host_labels)
            continue
        # Hand over first: the caller waits for this batch's copy only, not for the next one's.
        ready = _hand_over(ahead, stream)
        ahead = stage(host_images, host_labels)
        yield ready
    if ahead is not None:
        yield _hand_over(ahead, stream)


def _hand_over(batch, stream):
    current = torch.cuda.current_stream(batch[0].device)
    current.wait_stream(stream)
    for tensor in batch:
        # Allocated on the side stream, used on the current one: keep the memory until both are done.
        tensor.record_stream(current)
    return batch


def get_dataloader(
    root_dir: str | os.PathLike,
    local_rank: int,
    batch_size: int,
    dali: bool = False,
    seed: int = 2048,
    num_workers: int = 2,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str | None = None,
    num_classes: int | None = None,
    skip_bad_images: bool = False,
    num_images: int | None = None,
):
    """The training loader for `root_dir`: "synthetic", a train.rec/train.idx folder, or an image folder.

    Each rank reads its own shard (see ResumableDistributedSampler); `num_images` sets the
    length of synthetic data only. `device` None: CUDA device `local_rank` if there is
    CUDA, else the CPU.
    """
    if device is None:
        device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if batch_size < 1:
        raise DataError(f"batch_size must be positive, got {batch_size}")
    kind = dataset_kind(root_dir)
    dataset = open_dataset(
        root_dir, local_rank, seed=seed, num_classes=num_classes, skip_bad_images=skip_bad_images,
        num_images=num_images,
    )
    share = len(dataset) // world_size
    if batch_size > share:
        raise DataError(
            f"batch_size={batch_size} is larger than this rank's share of the data set {root_dir}: "
            f"{len(dataset)} images / {world_size} ranks = {share} per rank"
        )
    sampler = ResumableDistributedSampler(
        len(dataset), rank=rank, world_size=world_size, seed=seed, shuffle=kind != SYNTHETIC, batch_size=batch_size
    )
    if dali:
        if kind == SYNTHETIC:
            raise DataError("dali=True reads encoded images; it does not apply to rec='synthetic'")
        from dataset.dali import DaliFaceLoader

        return DaliFaceLoader(dataset, sampler, batch_size, device=device, num_threads=max(num_workers, 1), seed=seed)
    return FaceDataLoader(
        dataset, sampler, batch_size, num_workers=num_workers, seed=seed, rank=rank, device=device
    )
