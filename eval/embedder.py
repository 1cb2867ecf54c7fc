"""One way to run a trained recogniser outside training: a PyTorch state_dict or an ONNX file.

`load_embedder(path, network)` returns an object with `embed(images)`: uint8 RGB
NCHW images in, raw (unnormalised) float32 embeddings out. The input
normalisation (training's `dataset.transforms.normalize_batch`) is applied here for
both kinds, because the exported ONNX graph does not normalise (insightface's
convention, REFERENCE 6). Weights are read by `backbones.weights`, so a file that
does not fit raises its `WeightsError`.
"""
from __future__ import annotations

import os
import warnings
from typing import Union

import numpy as np
import torch

from backbones.folding import fold_batchnorm
from backbones.weights import load_backbone_weights
from dataset.transforms import normalize_batch
from utils.errors import UserError

INPUT_SIZE = 112

ImageBatch = Union[np.ndarray, torch.Tensor]


class EmbedderError(UserError, ValueError):
    """A model file that cannot be used as a recogniser; the message names the file."""


def _as_uint8_nchw(images: ImageBatch) -> np.ndarray:
    arr = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.ndim != 4 or arr.shape[1] != 3:
        raise ValueError(f"expected uint8 RGB images [N,3,H,W], got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 images (0..255), got {arr.dtype}")
    return arr


class TorchEmbedder:
    def __init__(self, model: torch.nn.Module, device: str | torch.device = "cpu", batch_size: int = 64):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self._folded = fold_batchnorm(self.model)  # what embed() runs: BatchNorm folded into the convolutions
        self.batch_size = batch_size

    def embed(self, images: ImageBatch) -> np.ndarray:
        arr = _as_uint8_nchw(images)
        out = []
        with torch.inference_mode():
            for start in range(0, arr.shape[0], self.batch_size):
                x = normalize_batch(torch.from_numpy(arr[start : start + self.batch_size]).to(self.device))
                out.append(self._folded(x).float().cpu().numpy())
        return np.concatenate(out, axis=0) if out else np.zeros((0, 0), dtype=np.float32)


class OnnxEmbedder:
    def __init__(self, path: str, device: str | torch.device = "cpu", batch_size: int = 64):
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if torch.device(device).type == "cuda":
            if "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
            else:
                warnings.warn(f"{path}: this onnxruntime has no CUDA provider (install onnxruntime-gpu); running on the CPU")
        try:
            self.session = ort.InferenceSession(path, providers=providers)
        except Exception as e:
            raise EmbedderError(f"{path}: onnxruntime cannot load it ({str(e).splitlines()[0]})") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise EmbedderError(f"{path}: a recogniser has one input, this model has {len(inputs)}")
        shape = list(inputs[0].shape)
        if len(shape) != 4 or shape[1:] != [3, INPUT_SIZE, INPUT_SIZE]:
            raise EmbedderError(f"{path}: input '{inputs[0].name}' has shape {shape}, expected [N, 3, 112, 112]")
        self.input_name = inputs[0].name
        # A graph exported with a fixed batch only accepts exactly that many images per run.
        self.fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        self.batch_size = self.fixed_batch or batch_size

    def embed(self, images: ImageBatch) -> np.ndarray:
        arr = _as_uint8_nchw(images)
        if arr.shape[2:] != (INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"the ONNX model takes 112x112 images, got {arr.shape[2]}x{arr.shape[3]}")
        out = []
        for start in range(0, arr.shape[0], self.batch_size):
            chunk = normalize_batch(torch.from_numpy(arr[start : start + self.batch_size])).numpy()
            real = chunk.shape[0]
            if self.fixed_batch is not None and real < self.fixed_batch:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.fixed_batch - real, axis=0)])
            out.append(self.session.run(None, {self.input_name: chunk})[0][:real].astype(np.float32))
        return np.concatenate(out, axis=0) if out else np.zeros((0, 0), dtype=np.float32)


def load_embedder(
    path: str,
    network: str | torch.nn.Module | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
):
    """A `TorchEmbedder` for a `.pt`/`.pth` state_dict (needs `network`: a backbone name
    for `backbones.get_model` or a module to load the weights into) or an
    `OnnxEmbedder` for a `.onnx` file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise EmbedderError(f"{path}: model file not found")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".onnx":
        return OnnxEmbedder(path, device=device, batch_size=batch_size)
    if ext not in (".pt", ".pth"):
        raise EmbedderError(f"{path}: unknown model type '{ext}'; use a .pt/.pth state_dict or an .onnx file")
    if network is None:
        raise EmbedderError(f"{path}: a state_dict needs the network it belongs to (e.g. --network r50)")
    return TorchEmbedder(load_backbone_weights(path, network), device=device, batch_size=batch_size)
