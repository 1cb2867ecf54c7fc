"""bench/insightface_reference.py: insightface's GPU step as the benchmark reference, and MFU."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.insightface_reference import (
    InsightfaceMargin, InsightfacePartialFC, build_insightface_step, count_step_flops, format_mfu, mfu, peak_flops,
    with_stock_modules,
)
from losses import CombinedMarginLoss, PartialFC

NUM_CLASSES, DIM = 300, 32


def _heads(margin, sample_rate):
    torch.manual_seed(0)
    ours = PartialFC(CombinedMarginLoss(64.0, *margin), DIM, NUM_CLASSES, sample_rate)
    theirs = InsightfacePartialFC(InsightfaceMargin(64.0, *margin), DIM, NUM_CLASSES, sample_rate, fp16=False)
    with torch.no_grad():
        theirs.weight.copy_(ours.weight)
    return ours, theirs


@pytest.mark.parametrize("margin", [(1.0, 0.5, 0.0), (1.0, 0.0, 0.4)], ids=["arcface", "cosface"])
@pytest.mark.parametrize("sample_rate", [1.0, 0.3])
def test_reference_head_loss_equals_ours_on_the_same_weights(margin, sample_rate):
    ours, theirs = _heads(margin, sample_rate)
    g = torch.Generator().manual_seed(1)
    # Embeddings near their centres: every sample's loss stays below insightface's clamp (69.08),
    # where the two cross-entropies agree.
    centres = torch.nn.functional.normalize(ours.weight.detach())
    for _ in range(3):
        labels = torch.randint(0, NUM_CLASSES, (16,), generator=g)
        embeddings = centres[labels] + torch.randn(16, DIM, generator=g) / DIM**0.5
        labels_before = labels.clone()
        torch.manual_seed(7)  # the same random negatives for both (the same sampling rule)
        a = ours(embeddings, labels)
        torch.manual_seed(7)
        b = theirs(embeddings, labels)
        assert torch.equal(labels, labels_before)  # the caller's labels are not remapped in place
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        assert 0.5 < float(a.detach()) < 60.0, float(a.detach())
    # CosFace's margin has an exact gradient in both; insightface's ArcFace trick does not.
    if margin[1] == 0.0:
        for head in (ours, theirs):
            head.weight.grad = None
        torch.manual_seed(7)
        ours(embeddings, labels).backward()
        torch.manual_seed(7)
        theirs(embeddings, labels).backward()
        got = ours.weight.grad.to_dense() if ours.weight.grad.is_sparse else ours.weight.grad
        torch.testing.assert_close(theirs.weight.grad, got, rtol=1e-4, atol=1e-4 * float(got.abs().max()))


def test_arcface_gradient_passes_the_margin_as_a_constant():
    # The no_grad trick: d loss / d cos is that of a plain scaled softmax over the margin logits.
    torch.manual_seed(0)
    head = InsightfacePartialFC(InsightfaceMargin(64.0, 1.0, 0.5, 0.0), DIM, 20, fp16=False)
    embeddings = torch.randn(4, DIM, requires_grad=True)
    labels = torch.tensor([1, 5, 5, 19])
    head(embeddings, labels).backward()

    def cosines():
        return F.linear(F.normalize(embeddings), F.normalize(head.weight))

    with torch.no_grad():
        cos = cosines()
        logits = cos.clone()
        logits[torch.arange(4), labels] = torch.cos(torch.arccos(cos[torch.arange(4), labels]) + 0.5)
        softmax = torch.softmax(64.0 * logits, dim=1)
        softmax[torch.arange(4), labels] -= 1
        grad_cos = 64.0 * softmax / 4
    expected = torch.autograd.grad(cosines(), head.weight, grad_cos)[0]
    torch.testing.assert_close(head.weight.grad, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fp16", [False, True])
def test_insightface_step_trains(fp16):
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, DIM))
    head = InsightfacePartialFC(InsightfaceMargin(64.0, 1.0, 0.5, 0.0), DIM, 10, fp16=fp16, amp_dtype=torch.float16)
    step, optimizer = build_insightface_step(backbone, head, fp16=fp16, lr=0.05, device_type="cpu")
    assert isinstance(optimizer, torch.optim.SGD) and not any(g.get("fused") for g in optimizer.param_groups)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(10, 3, 8, 8, generator=g)
    labels = torch.arange(10)
    losses = [step(images, labels) for _ in range(30)]
    assert all(isinstance(v, float) for v in losses)
    assert losses[-1] < losses[0] - 1.0


def test_flops_of_a_training_step_count_forward_and_backward():
    layer = nn.Linear(64, 32, bias=False)
    x = torch.randn(8, 64, requires_grad=True)

    def step():
        layer(x).sum().backward()

    forward = 2 * 8 * 64 * 32
    assert count_step_flops(step) == 3 * forward  # forward, input gradient, weight gradient


@pytest.mark.parametrize("groups", [1, 4, 8], ids=["dense", "grouped", "depthwise"])
@pytest.mark.parametrize("input_grad", [True, False], ids=["inner-layer", "first-layer"])
def test_flops_of_a_convolution_step_match_the_hand_count(groups, input_grad):
    # Each gradient of a convolution (input, weight) costs what its forward costs; the first
    # layer's input needs none. torch's own formula counts a grouped weight gradient `groups`x.
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=groups, bias=False)
    x = torch.randn(2, 8, 16, 16, requires_grad=input_grad)

    def step():
        conv(x).sum().backward()

    forward = 2 * 2 * 16 * 8 * 8 * (8 // groups) * 3 * 3  # 2 * N * C_out * H_out * W_out * C_in/groups * k * k
    assert count_step_flops(step) == (3 if input_grad else 2) * forward


def test_mfu_and_peaks():
    assert mfu(3e12, 0.01, 600e12) == pytest.approx(0.5)
    assert peak_flops("NVIDIA H100 80GB HBM3")[0] == 989.4e12
    assert peak_flops("NVIDIA H100 PCIe")[0] == 756.5e12
    assert peak_flops("NVIDIA H200")[0] == 989.4e12
    assert peak_flops("NVIDIA A100-SXM4-80GB")[0] == 312e12
    assert peak_flops("NVIDIA L4")[0] == 121e12 and peak_flops("NVIDIA L40S")[0] == 362.05e12
    assert peak_flops("Some Future GPU") is None
    assert format_mfu(989.4e12 * 0.25, 1.0, "NVIDIA H100 80GB HBM3").startswith("25.0% of H100 SXM")
    assert format_mfu(1e12, 1.0, "cpu").startswith("n/a")
    with pytest.raises(ValueError):
        mfu(1.0, 0.0, 1.0)


def test_with_stock_modules_gives_torchs_modules_with_the_same_weights():
    from backbones import get_model

    torch.manual_seed(0)
    ours = get_model("mbf", num_features=32)
    stock = with_stock_modules(get_model("mbf", num_features=32))
    stock.load_state_dict(ours.state_dict())
    kinds = {type(m) for m in stock.modules()}
    assert nn.Conv2d in kinds and nn.PReLU in kinds
    assert not any(type(m).__module__.startswith("backbones") and isinstance(m, (nn.Conv2d, nn.PReLU))
                   for m in stock.modules())
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(stock.eval()(x), ours.eval()(x))
