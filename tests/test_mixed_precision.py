"""The fast training path (bf16 autocast, channels_last, low-precision PartialFC logits)
stays within mixed-precision tolerance of the fp32 step."""
import copy

import pytest
import torch

from backbones import get_model
from losses import CombinedMarginLoss, PartialFC
from losses.optim import build_optimizer

NUM_CLASSES, EMB, BATCH, STEPS = 40, 64, 4, 3
LR = 0.02  # small enough that the trajectories of two precisions stay comparable


def _train(backbone, head, batches, *, fast: bool):
    backbone, head = copy.deepcopy(backbone), copy.deepcopy(head)
    head.fp16 = fast  # the head's logits in bf16, as train.py sets it for low precision
    if fast:
        backbone = backbone.to(memory_format=torch.channels_last)
    opt = build_optimizer("sgd", backbone.parameters(), head.parameters(), lr=LR, weight_decay=5e-4)
    backbone.train()
    losses = []
    for images, labels in batches:
        if fast:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast):
            embeddings = backbone(images)
        loss = head(embeddings, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(backbone.parameters(), 5.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, backbone, head


def test_bf16_steps_track_fp32_in_loss_and_weights():
    # r18, not mbf: MobileFaceNet's stacked BatchNorms make its early-training gradients
    # cancel so much that bf16 rounding alone moves them by ~30%, which would hide a real bug.
    torch.manual_seed(0)
    backbone = get_model("r18", num_features=EMB)
    head = PartialFC(CombinedMarginLoss(64.0, 1.0, 0.5, 0.0), EMB, NUM_CLASSES)
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.rand(BATCH, 3, 112, 112, generator=g) * 2 - 1, torch.randint(0, NUM_CLASSES, (BATCH,), generator=g))
        for _ in range(STEPS)
    ]
    start = {k: v.clone() for k, v in backbone.state_dict().items()}
    w0 = head.weight.detach().clone()

    ref_losses, ref_bb, ref_head = _train(backbone, head, batches, fast=False)
    losses, bb, fast_head = _train(backbone, head, batches, fast=True)

    assert bb.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(losses, ref_losses):
        assert abs(a - b) / abs(b) < 0.02, (losses, ref_losses)

    # The weights' change over the steps agrees in direction and size with fp32's.
    def update(model_state, key):
        return (model_state[key].float() - start[key].float()).flatten()

    fast_state, ref_state = bb.state_dict(), ref_bb.state_dict()
    weights = [k for k, v in start.items() if v.dtype.is_floating_point and k.endswith("weight")]
    du = torch.cat([update(fast_state, k) for k in weights])
    dr = torch.cat([update(ref_state, k) for k in weights])
    assert dr.norm() > 0
    assert torch.nn.functional.cosine_similarity(du, dr, dim=0) > 0.98
    assert (du - dr).norm() / dr.norm() < 0.2

    dh = fast_head.weight.detach() - w0
    dhr = ref_head.weight.detach() - w0
    assert torch.nn.functional.cosine_similarity(dh.flatten(), dhr.flatten(), dim=0) > 0.98
    assert (dh - dhr).norm() / dhr.norm() < 0.2


@pytest.mark.parametrize("sample_rate", [1.0, 0.5])
@pytest.mark.parametrize("batch", [16, 80])  # below and above the embedding size: two backward paths
def test_low_precision_head_gradients_stay_close_to_fp32(sample_rate, batch):
    torch.manual_seed(0)
    emb = torch.randn(batch, EMB, requires_grad=True)
    labels = torch.randint(0, NUM_CLASSES, (batch,))
    full = PartialFC(CombinedMarginLoss(64.0, 1.0, 0.5, 0.0), EMB, NUM_CLASSES, sample_rate)
    half = copy.deepcopy(full)
    half.fp16 = True
    grads = []
    for head in (full, half):
        emb.grad = None
        torch.manual_seed(1)  # the same centres are sampled
        loss = head(emb, labels)
        loss.backward()
        weight_grad = head.weight.grad
        assert weight_grad.is_sparse == (sample_rate < 1)
        grads.append((loss.detach(), emb.grad.clone(), weight_grad.to_dense()))
    (loss32, *grads32), (loss16, *grads16) = grads
    assert abs(loss16 - loss32) / loss32 < 5e-3
    for a, b in zip(grads32, grads16):
        assert (a - b).norm() / a.norm() < 0.02



def _auto_precision(**env_overrides) -> str:
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}
    code = ("import torch; from utils.amp import resolve_precision; "
            "print(resolve_precision('auto', False, torch.device('cpu')).name)")
    return subprocess.run([sys.executable, "-c", code], env={**env, **env_overrides}, capture_output=True, text=True,
                          check=True, cwd=Path(__file__).parents[1]).stdout.strip()


def test_auto_precision_is_bf16_only_where_the_cpu_has_bf16_units():
    # The CPU's flags read from /proc/cpuinfo here, from cpuid in utils.amp. An AVX512 CPU without
    # AVX512-BF16 (Skylake-X to Ice Lake, or a VM that hides the bf16 flags) emulates bf16 and runs
    # slower in it: oneDNN's own "bf16 supported" says yes there, and auto chose bf16 until 2026-12-03.
    from bench.common import cpu_matrix_units

    units = cpu_matrix_units()
    if units == "unknown":
        pytest.skip("no /proc/cpuinfo")
    has_units = bool({"avx512_bf16", "amx_bf16"} & set(units.split()))
    assert _auto_precision() == ("bf16" if has_units else "fp32")
    # oneDNN held below its bf16 instructions is a CPU without them, whatever the CPU has.
    assert _auto_precision(ONEDNN_MAX_CPU_ISA="AVX512_CORE") == "fp32"
    assert _auto_precision(ONEDNN_MAX_CPU_ISA="AVX2") == "fp32"
    if has_units:
        assert _auto_precision(ONEDNN_MAX_CPU_ISA="AVX512_CORE_BF16") == "bf16"
