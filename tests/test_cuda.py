"""The CUDA paths: skipped without a GPU (CI), run on a GPU machine.

    ARCFACE_TESTDATA=/path/to/shared/testdata python -m pytest -q tests/test_cuda.py

Each test compares the CUDA result with the CPU one computed in the same test, so the
GPU code is held to the numbers the CPU suite already checks.
"""
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import SHARED_TESTDATA
from helpers import PYTHON, REPO_ROOT, run_script

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda:0")


def test_backbone_fp16_trunk_on_cuda_matches_fp32_cpu():
    from backbones import get_model

    torch.manual_seed(0)
    reference = _calibrated(get_model("r18", num_features=128))
    fast = get_model("r18", num_features=128, fp16=True).eval()
    fast.load_state_dict(reference.state_dict())
    fast = fast.to(CUDA).to(memory_format=torch.channels_last)
    x = torch.rand(8, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        want = reference(x)
        got = fast(x.to(CUDA).contiguous(memory_format=torch.channels_last)).cpu()
    assert got.dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity(got, want, dim=1)
    assert cosine.min() > 0.999, cosine


def _calibrated(model):
    """BatchNorm statistics from real forward passes, as a trained model has: with the
    initial ones (mean 0, var 1) an untrained IResNet's activations grow past float16's
    range in eval mode."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # a plain average over the calibration batches
    with torch.no_grad():
        model.train()
        for _ in range(2):
            model(torch.rand(16, 3, 112, 112) * 2 - 1)
    return model.eval()


@pytest.mark.parametrize("logits_chunk_rows", [0, 7])  # 7: the chunked head, uneven blocks
@pytest.mark.parametrize("sample_rate", [1.0, 0.5])
def test_partial_fc_and_sampled_sgd_step_on_cuda_match_cpu(sample_rate, logits_chunk_rows):
    from losses import CombinedMarginLoss, PartialFC
    from losses.optim import build_optimizer

    results = []
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        head = PartialFC(CombinedMarginLoss(64.0, 1.0, 0.5, 0.0), 64, 1000, sample_rate, check_labels=device == "cpu",
                         logits_chunk_rows=logits_chunk_rows)
        head = head.to(device)
        embeddings = torch.randn(32, 64, generator=torch.Generator().manual_seed(1)).to(device).requires_grad_()
        labels = torch.randint(0, 1000, (32,), generator=torch.Generator().manual_seed(2)).to(device)
        optimizer = build_optimizer("sgd", [], head.parameters(), lr=0.1, weight_decay=5e-4, device_type=device)
        if sample_rate < 1.0:
            # The same negatives on both devices: sample on the CPU, then move the choice.
            index, _ = head.sample(torch.full((32,), -1, dtype=torch.long))
            head.sample = _fixed_sample(index.to(device))
        loss = head(embeddings, labels)
        loss.backward()
        optimizer.step()
        results.append((loss.item(), embeddings.grad.cpu(), head.weight.detach().cpu()))
    (loss_cpu, grad_cpu, w_cpu), (loss_gpu, grad_gpu, w_gpu) = results
    assert loss_gpu == pytest.approx(loss_cpu, rel=1e-4)
    torch.testing.assert_close(grad_gpu, grad_cpu, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(w_gpu, w_cpu, rtol=1e-4, atol=1e-6)


def _fixed_sample(index):
    def sample(local_targets):
        # Positives must be in the index; add them to the fixed negatives.
        positive = torch.unique(local_targets[local_targets >= 0])
        merged = torch.unique(torch.cat([index, positive]))
        remapped = local_targets.clone()
        hit = local_targets >= 0
        remapped[hit] = torch.searchsorted(merged, local_targets[hit])
        return merged, remapped

    return sample


def test_loader_prefetches_normalised_batches_onto_the_gpu(tmp_path):
    from dataset import get_dataloader

    for name in ("train.rec", "train.idx", "property"):
        shutil.copy(SHARED_TESTDATA / "ms1m_style" / name, tmp_path / name)
    batches = {}
    for device in ("cpu", "cuda"):
        loader = get_dataloader(str(tmp_path), 0, 8, seed=7, num_workers=1, device=device)
        loader.set_epoch(0)
        batches[device] = [(x.to("cpu"), y.to("cpu"), x.device.type) for x, y in loader]
    assert [b[2] for b in batches["cuda"]] == ["cuda"] * 6
    for (x_cpu, y_cpu, _), (x_gpu, y_gpu, _) in zip(batches["cpu"], batches["cuda"]):
        torch.testing.assert_close(x_gpu, x_cpu)
        assert torch.equal(y_gpu, y_cpu)


@pytest.mark.parametrize("launcher", ["python", "torchrun"])
def test_train_fp16_with_grad_scaler_on_cuda(tmp_path, launcher):
    """fp16=True on CUDA: float16 autocast + GradScaler, model.pt and model.onnx, alone and under
    torchrun. (NCCL itself needs two GPUs: two ranks may not share one device.)"""
    rec = tmp_path / "rec"
    rec.mkdir()
    for name in ("train.rec", "train.idx", "property"):
        shutil.copy(SHARED_TESTDATA / "ms1m_style" / name, rec / name)
    shutil.copy(SHARED_TESTDATA / "lfw_style.bin", rec / "lfw_style.bin")
    out = tmp_path / "run"
    prefix = [PYTHON] if launcher == "python" else [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    run_script([
        *prefix, REPO_ROOT / "train.py", "configs/ms1mv3_r50", f"--rec={rec}", f"--output={out}",
        "--network=r18", "--num_classes=12", "--num_image=48", "--batch_size=8", "--num_epoch=2",
        "--frequent=2", "--fp16=True", "--val_targets=['lfw_style']", "--verbose=4", "--sample_rate=0.5",
        "--embedding_size=128", "--lr=0.02",
    ], timeout=600)
    log = (out / "training.log").read_text()
    assert "precision fp16" in log and "grad scale" in log
    assert "world size 1" in log and "cuda" in log
    assert "[lfw_style][4]Accuracy-Flip" in log
    assert json.loads((out / "checkpoints" / "step_000000012" / "manifest.json").read_text())["global_step"] == 12
    state = torch.load(out / "checkpoints" / "step_000000012" / "checkpoint_gpu_0.pt", weights_only=True)
    assert state["state_scaler"] and state["state_scaler"]["scale"] > 0

    import onnxruntime as ort
    from backbones import get_model

    weights = torch.load(out / "model.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    assert "loss nan" not in log and "skipped non-finite" not in log
    model = get_model("r18", num_features=128)
    model.load_state_dict(weights)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 112, 112)).astype(np.float32)
    with torch.no_grad():
        want = model.eval()(torch.from_numpy(x)).numpy()
    got = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"data": x})[0]
    np.testing.assert_allclose(got, want, atol=1e-4 * max(1.0, np.abs(want).max()), rtol=0)


def test_verification_embedding_on_cuda_matches_cpu():
    from backbones import get_model
    from eval.verification import embed_verification_set
    from dataset.verification_bin import load_bin

    data, issame = load_bin(str(SHARED_TESTDATA / "lfw_style.bin"))
    torch.manual_seed(0)
    model = get_model("mbf", num_features=64).eval()
    cpu, xnorm_cpu = embed_verification_set(data, model, batch_size=16)
    gpu, xnorm_gpu = embed_verification_set(data, model.to(CUDA), batch_size=16)
    # Unit-norm embeddings; cuDNN's TF32 convolutions differ from the CPU's fp32 by ~1e-4.
    np.testing.assert_allclose(gpu, cpu, atol=2e-3)
    assert (gpu * cpu).sum(axis=1).min() > 0.9999
    assert xnorm_gpu == pytest.approx(xnorm_cpu, rel=1e-3)


def test_float16_evaluation_of_an_untrained_iresnet_stays_finite():
    """Before the first step BatchNorm statistics are untrained and float16 overflows; the
    evaluation falls back to float32 for such batches instead of reporting NaN."""
    from backbones import get_model
    from eval.verification import embed_verification_set
    from dataset.verification_bin import load_bin

    data, _ = load_bin(str(SHARED_TESTDATA / "lfw_style.bin"))
    torch.manual_seed(0)
    model = get_model("r18", num_features=64).to(CUDA)
    fp32, _ = embed_verification_set(data, model, batch_size=8)
    fp16, _ = embed_verification_set(data, model, batch_size=8, amp_dtype=torch.float16)
    assert np.isfinite(fp16).all()
    assert (fp16 * fp32).sum(axis=1).min() > 0.999


def test_a_skipped_first_fused_sgd_step_leaves_no_garbage_momentum():
    """GradScaler's first steps overflow and are skipped on the device; torch's fused SGD
    would keep an uninitialised momentum buffer from such a step (NaN weights later)."""
    from losses.optim import build_optimizer

    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4).to(CUDA)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = build_optimizer("sgd", model.parameters(), [], lr=0.1, weight_decay=5e-4, device_type="cuda")
    scaler = torch.amp.GradScaler("cuda", init_scale=1.0)
    x = torch.randn(8, 16, device=CUDA)
    for batch in (x * float("inf"), x):  # the first step's gradients are not finite
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(batch).float().pow(2).sum() * 1e4
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        scaler.step(optimizer)
        scaler.update()
    # Reference: one plain SGD step from the start (the skipped step changed nothing).
    reference = torch.nn.Linear(16, 4).to(CUDA)
    reference.load_state_dict(start)
    plain = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    (reference(x).float().pow(2).sum() * 1e4).backward()
    plain.step()
    for name, value in model.state_dict().items():
        assert torch.isfinite(value).all(), name
        torch.testing.assert_close(value, reference.state_dict()[name], rtol=2e-2, atol=1e-3)
