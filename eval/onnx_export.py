"""Export a backbone to ONNX in the form insightface's inference package expects.

One input `data` [N, 3, H, W] (batch dynamic, H and W static), one output, fp32
weights, no normalisation inside the graph (the caller feeds (x - 127.5) / 127.5
RGB, which is what insightface's ArcFaceONNX does when the graph does not start
with Sub/Mul).
"""
from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import torch

from utils.atomic_file import atomic_path


def export_onnx(
    backbone: torch.nn.Module,
    path: str | os.PathLike,
    image_size: int = 112,
    opset: int = 17,
    check: bool = True,
) -> Path:
    """Write `backbone` (eval mode, fp32, CPU copy) to `path` atomically; return the path."""
    path = Path(path)
    model = copy.deepcopy(backbone).float().cpu().eval()
    model = model.to(memory_format=torch.contiguous_format)
    if hasattr(model, "fp16"):
        model.fp16 = False  # no autocast inside the traced graph: fp32 weights and activations
    dummy = torch.zeros(1, 3, image_size, image_size)
    with atomic_path(path) as tmp:
        with warnings.catch_warnings(), torch.no_grad():
            # The TorchScript-based exporter needs no extra packages (the dynamo one needs onnxscript).
            warnings.simplefilter("ignore", category=DeprecationWarning)
            # The backbones' 112x112 input check is Python control flow; H and W are static
            # in the exported graph, so the tracer's warning about it says nothing new.
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            torch.onnx.export(
                model,
                (dummy,),
                str(tmp),
                dynamo=False,
                input_names=["data"],
                output_names=["fc1"],
                dynamic_axes={"data": {0: "batch"}, "fc1": {0: "batch"}},
                opset_version=opset,
                do_constant_folding=True,
            )
        if check:
            import onnx

            onnx.checker.check_model(onnx.load(str(tmp)))
    return path


def compare_with_onnxruntime(backbone: torch.nn.Module, path: str | os.PathLike, batch: int = 2, seed: int = 0) -> float:
    """Max absolute difference between the PyTorch eval output and onnxruntime's on random input."""
    import numpy as np
    import onnxruntime as ort

    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, 112, 112, generator=g) * 2 - 1
    model = copy.deepcopy(backbone).float().cpu().eval()
    with torch.no_grad():
        expected = model(x).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"data": x.numpy()})[0]
    return float(np.abs(got - expected).max())
