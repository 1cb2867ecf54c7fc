"""Face-recognition training data: RecordIO (MS1M / im2rec layouts), image folders and
synthetic tensors, a resumable distributed sampler and the device-side loader.

Importing the package does no I/O; files are opened when a data set is created.
"""
from dataset.base import FaceDataset
from dataset.errors import BadImageError, DataError, LabelError, RecordIOError
from dataset.image_folder import ImageFolderDataset
from dataset.info import DatasetInfo, dataset_kind, inspect_dataset, open_dataset
from dataset.loader import FaceDataLoader, get_dataloader
from dataset.mx_face import MXFaceDataset
from dataset.recordio import IndexedRecordReader, IndexedRecordWriter, IRHeader, pack, unpack, write_identity_records
from dataset.sampler import ResumableDistributedSampler
from dataset.synthetic import SyntheticDataset
from dataset.transforms import flip_decision

__all__ = [
    "BadImageError",
    "DataError",
    "DatasetInfo",
    "FaceDataLoader",
    "FaceDataset",
    "ImageFolderDataset",
    "IndexedRecordReader",
    "IndexedRecordWriter",
    "IRHeader",
    "LabelError",
    "MXFaceDataset",
    "RecordIOError",
    "ResumableDistributedSampler",
    "SyntheticDataset",
    "dataset_kind",
    "flip_decision",
    "get_dataloader",
    "inspect_dataset",
    "open_dataset",
    "pack",
    "unpack",
    "write_identity_records",
]
