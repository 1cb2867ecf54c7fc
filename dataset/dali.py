"""Optional NVIDIA DALI path (`dali=True`): JPEG decoding and normalisation on the GPU.

The samples, their order and their flips are the same as the default loader's: the
sampler and the data set choose and read the encoded images in Python; DALI decodes
them on the GPU ("mixed" decoder) and mirrors / normalises them. Needs the `nvidia-dali`
package and a CUDA device; without them `DaliFaceLoader` raises a DataError that says so.
"""
from __future__ import annotations

import numpy as np
import torch

from dataset.base import FaceDataset
from dataset.errors import DataError
from dataset.sampler import ResumableDistributedSampler


def _import_dali():
    try:
        from nvidia import dali  # noqa: F401
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator
    except ImportError:
        raise DataError(
            "dali=True needs NVIDIA DALI (Python package nvidia.dali), which is not installed; "
            "install nvidia-dali-cuda120 (pip, NVIDIA's index) or set dali=False"
        ) from None
    return dali, fn, types, DALIGenericIterator


class _EncodedBatches:
    """External source for one epoch: per batch the encoded images, labels and flips."""

    def __init__(self, dataset: FaceDataset, epoch: int, indices: np.ndarray, batch_size: int):
        self.dataset, self.epoch, self.indices, self.batch_size = dataset, epoch, indices, batch_size
        self.position = 0

    def __iter__(self):
        self.position = 0
        return self

    def __next__(self):
        if self.position + self.batch_size > len(self.indices):
            raise StopIteration
        batch = self.indices[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        images, labels, flips = [], [], []
        for index in batch.tolist():
            encoded, label = self.dataset.read_encoded(index)
            labels.append(np.array([self.dataset.check_label(label, index)], dtype=np.int64))
            images.append(np.frombuffer(encoded, dtype=np.uint8))
            flips.append(np.array(self.dataset.flips(index, self.epoch), dtype=np.int32))
        return images, labels, flips


class DaliFaceLoader:
    """Same interface as FaceDataLoader: (images float32 N x 3 x H x W, labels int64 N) on `device`."""

    def __init__(
        self,
        dataset: FaceDataset,
        sampler: ResumableDistributedSampler,
        batch_size: int,
        *,
        device: torch.device,
        num_threads: int = 2,
        seed: int = 2048,
    ):
        self._dali = _import_dali()
        if device.type != "cuda":
            raise DataError(f"dali=True decodes on a CUDA device; this run uses {device}")
        if dataset.skip_bad_images:
            raise DataError("skip_bad_images is not supported with dali=True (the GPU decoder cannot skip)")
        self.dataset, self.sampler, self.batch_size = dataset, sampler, batch_size
        self.device, self.num_threads, self.seed = device, num_threads, seed
        self.num_skipped = 0

    def __len__(self) -> int:
        return self.sampler.num_samples // self.batch_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch)
        self.dataset.set_epoch(epoch)

    def _pipeline(self, source: _EncodedBatches):
        dali, fn, types, _ = self._dali
        pipe = dali.Pipeline(
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=self.device.index if self.device.index is not None else torch.cuda.current_device(),
            seed=self.seed,
            prefetch_queue_depth=2,
        )
        with pipe:
            jpegs, labels, flips = fn.external_source(
                source=source, num_outputs=3, batch=True, dtype=[types.UINT8, types.INT64, types.INT32]
            )
            images = fn.decoders.image(jpegs, device="mixed", output_type=types.RGB)
            images = fn.crop_mirror_normalize(
                images,
                dtype=types.FLOAT,
                output_layout="CHW",
                mean=[127.5, 127.5, 127.5],
                std=[127.5, 127.5, 127.5],
                mirror=flips,
            )
            pipe.set_outputs(images, labels.gpu())
        pipe.build()
        return pipe

    def __iter__(self):
        _, _, _, iterator_class = self._dali
        source = _EncodedBatches(self.dataset, self.sampler.epoch, self.sampler.indices(), self.batch_size)
        if len(source.indices) < self.batch_size:
            return
        # A fresh pipeline per epoch: its source is bound to this epoch's order and start.
        pipe = self._pipeline(source)
        try:
            for output in iterator_class([pipe], ["images", "labels"], auto_reset=False):
                yield output[0]["images"], output[0]["labels"].view(-1).long()
        finally:
            del pipe
