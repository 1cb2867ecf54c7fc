"""Our model.onnx inside insightface's own Python package (model_zoo.get_model -> ArcFaceONNX).

insightface is not a dependency of this project (it pulls scipy, scikit-image and a
second OpenCV build), so this test runs where the package is importable and is skipped
elsewhere. To run it:

    .venv/bin/pip install --no-deps --target /tmp/insightface insightface requests tqdm scipy scikit-image
    PYTHONPATH=/tmp/insightface .venv/bin/python -m pytest -q tests/test_insightface_package.py
"""
import numpy as np
import pytest
import torch

model_zoo = pytest.importorskip("insightface.model_zoo", reason="insightface's Python package is not installed")

from backbones import get_model  # noqa: E402
from eval.onnx_export import export_onnx  # noqa: E402


def _model_with_realistic_outputs():
    """An untrained network whose embedding is O(1), as a trained one's is (its BN statistics are set)."""
    torch.manual_seed(0)
    model = get_model("mbf", num_features=512)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the calibration batches
    with torch.no_grad():
        model.train()
        for _ in range(2):  # BN running statistics from real forward passes
            model(torch.rand(16, 3, 112, 112) * 2 - 1)
    return model.eval()


def test_get_model_returns_arcface_recogniser_with_our_embedding(tmp_path):
    model = _model_with_realistic_outputs()
    path = export_onnx(model, tmp_path / "model.onnx")

    recogniser = model_zoo.get_model(str(path))
    assert type(recogniser).__name__ == "ArcFaceONNX" and recogniser.taskname == "recognition"
    # No Sub/Mul at the start of our graph, so the package normalises (x - 127.5) / 127.5 itself.
    assert (recogniser.input_mean, recogniser.input_std) == (127.5, 127.5)
    assert tuple(recogniser.input_size) == (112, 112)
    recogniser.prepare(ctx_id=-1)

    bgr = np.random.default_rng(0).integers(0, 256, size=(112, 112, 3), dtype=np.uint8)
    theirs = recogniser.get_feat(bgr).ravel()
    rgb = torch.from_numpy(bgr[:, :, ::-1].copy()).permute(2, 0, 1).float().unsqueeze(0)
    with torch.no_grad():
        ours = model((rgb / 255 - 0.5) / 0.5).numpy().ravel()
    assert np.abs(ours).max() > 0.1
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-4 * np.abs(ours).max())
