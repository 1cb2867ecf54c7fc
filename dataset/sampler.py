"""Distributed sampling that every rank agrees on and that can resume mid-epoch.

Epoch e uses one permutation of the whole data set, drawn from a torch.Generator seeded
with seed + e, identical on all ranks. The first num_samples * world_size entries are
dealt out round-robin (rank r takes positions r, r + world_size, ...), so every rank gets
the same number of samples and the uneven tail is dropped. `set_epoch(e, start_batch=k)`
skips the first k * batch_size samples of this rank's shard: a resumed run continues with
exactly the samples the interrupted one would have seen.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


class ResumableDistributedSampler(Sampler[int]):
    def __init__(
        self,
        dataset_len: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 2048,
        shuffle: bool = True,
        batch_size: int = 1,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.dataset_len = int(dataset_len)
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.batch_size = int(seed), shuffle, batch_size
        self.num_samples = self.dataset_len // world_size  # per rank, every epoch
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if start_batch < 0 or start_batch * self.batch_size > self.num_samples:
            raise ValueError(
                f"start_batch={start_batch} is outside this epoch ({self.num_samples // self.batch_size} batches "
                f"of {self.batch_size})"
            )
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def shard(self) -> np.ndarray:
        """This rank's full list of sample indices for the current epoch (int64)."""
        total = self.num_samples * self.world_size
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_len, generator=generator).numpy()
            return order[:total][self.rank::self.world_size]
        return np.arange(self.rank, total, self.world_size, dtype=np.int64)

    def indices(self) -> np.ndarray:
        """What this epoch still yields: the shard after the first start_batch batches."""
        return self.shard()[self.start_batch * self.batch_size:]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return self.num_samples - self.start_batch * self.batch_size
