"""insightface's own GPU training step, as the reference the benchmarks compare ours with,
and the model-FLOPs utilisation (MFU) of a step.

What insightface's arcface_torch does on a GPU (train.py, partial_fc_v2.py, losses.py),
rebuilt here from the published algorithm, not copied:

- the backbone built with `fp16=True`: its trunk under float16 autocast, the embedding
  layer in float32 (our backbones' fp16 flag does exactly that), NCHW tensors;
- `torch.backends.cudnn.benchmark = True`;
- PartialFC_V2: the class centres are one full Parameter; with sampling the sampled rows
  are `weight[index]` (so the gradient is a dense [classes x D] matrix); F.normalize and
  F.linear under float16 autocast, logits clamped to [-1, 1] in float32;
- its margin: ArcFace changes the target angle inside `torch.no_grad()` (arccos and cos of
  the whole logit matrix), so the gradient passes the margin as if it were constant;
  CosFace subtracts m3 from the target logit;
- its distributed cross-entropy: the softmax materialised in place, the target
  probability clamped at 1e-30 before the log (the 69.0776 ceiling);
- torch's own nn.Conv2d and nn.PReLU (`with_stock_modules`), not our CPU routes;
- torch.optim.SGD (its default implementation) over backbone and head, GradScaler with
  growth_interval=100, gradient clipping of the backbone at norm 5, and the loss read on
  the host every step (its AverageMeter).

    from bench.insightface_reference import (
        InsightfaceMargin, InsightfacePartialFC, build_insightface_step, count_step_flops, mfu, peak_flops,
        with_stock_modules)
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from backbones.activation import PReLU
from backbones.conv import Conv2d
from losses.partial_fc import _distributed, _gather_labels, _GatherEmbeddings, shard_range


_STOCK = {Conv2d: nn.Conv2d, PReLU: nn.PReLU}


def with_stock_modules(model: nn.Module) -> nn.Module:
    """`model`, changed in place, with torch's nn.Conv2d and nn.PReLU where it has ours.

    backbones.conv.Conv2d and backbones.activation.PReLU are those classes with faster CPU
    routes and no state of their own, so changing each instance's class back gives the
    module insightface builds, with the same parameters.
    """
    for module in model.modules():
        if type(module) in _STOCK:
            module.__class__ = _STOCK[type(module)]
    return model


@contextlib.contextmanager
def stock_modules(model: nn.Module) -> Iterator[None]:
    """`with_stock_modules` for the duration: to count a routed model's own FLOPs (the
    block-diagonal weights of backbones.conv multiply zeros, which the model does not)."""
    changed = [(module, type(module)) for module in model.modules() if type(module) in _STOCK]
    with_stock_modules(model)
    try:
        yield
    finally:
        for module, kind in changed:
            module.__class__ = kind


class InsightfaceMargin(nn.Module):
    """insightface's CombinedMarginLoss for its two shipped margins (labels [N, 1], -1: elsewhere).

    ArcFace (m1 = 1, m3 = 0): target angle + m2 computed without gradient; CosFace (m1 = 1,
    m2 = 0): target - m3. Then every logit times s.
    """

    def __init__(self, s: float, m1: float, m2: float, m3: float):
        super().__init__()
        if m1 != 1.0 or (m2 != 0.0 and m3 != 0.0):
            raise ValueError(
                f"insightface's margin covers ArcFace (1, m2, 0) and CosFace (1, 0, m3), got {(m1, m2, m3)}"
            )
        self.s, self.m2, self.m3 = float(s), float(m2), float(m3)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        rows = torch.where(labels.view(-1) != -1)[0]  # a host sync, as in insightface
        cols = labels.view(-1)[rows]
        if self.m3 == 0.0:  # ArcFace
            with torch.no_grad():
                target = logits[rows, cols].arccos_()
                logits.arccos_()
                logits[rows, cols] = target + self.m2
                logits.cos_()
        else:  # CosFace
            logits[rows, cols] = logits[rows, cols] - self.m3
        return logits * self.s


class _DistCrossEntropy(torch.autograd.Function):
    """insightface's cross-entropy over class shards: softmax in place, target clamped at 1e-30."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, distributed: bool) -> torch.Tensor:
        batch = logits.shape[0]
        row_max = logits.max(dim=1, keepdim=True).values
        if distributed:
            dist.all_reduce(row_max, dist.ReduceOp.MAX)
        logits.sub_(row_max).exp_()
        sum_exp = logits.sum(dim=1, keepdim=True)
        if distributed:
            dist.all_reduce(sum_exp)
        logits.div_(sum_exp)
        index = torch.where(labels.view(-1) != -1)[0]
        target = torch.zeros(batch, 1, device=logits.device)
        target[index] = logits[index].gather(1, labels[index])
        if distributed:
            dist.all_reduce(target)
        ctx.save_for_backward(index, logits, labels)
        return target.clamp_min_(1e-30).log_().mean() * (-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        index, softmax, labels = ctx.saved_tensors
        one_hot = torch.zeros(index.numel(), softmax.shape[1], device=softmax.device)
        one_hot.scatter_(1, labels[index], 1)
        softmax[index] -= one_hot
        softmax.div_(softmax.shape[0])
        return softmax * grad.item(), None, None


class InsightfacePartialFC(nn.Module):
    """insightface's PartialFC_V2: forward(local_embeddings [B, D], local_labels [B]) -> loss.

    fp16: the normalisation and the logits' matmul under autocast (float16 on CUDA, as
    insightface; `amp_dtype` elsewhere). Same class split and sampling rule as
    losses.PartialFC, so both can start from the same centres.
    """

    def __init__(self, margin: nn.Module, embedding_size: int, num_classes: int, sample_rate: float = 1.0, *,
                 fp16: bool = True, amp_dtype: torch.dtype | None = None, rank: int | None = None,
                 world_size: int | None = None):
        super().__init__()
        if world_size is None:
            world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if world_size > 1 else 0
        self.margin, self.sample_rate, self.fp16, self.amp_dtype = margin, float(sample_rate), fp16, amp_dtype
        self.rank, self.world_size = rank, world_size
        self.class_start, self.num_local = shard_range(num_classes, rank, world_size)
        self.num_sample = int(self.sample_rate * self.num_local)
        self.weight = nn.Parameter(torch.normal(0.0, 0.01, (self.num_local, embedding_size)))

    def _sample(self, labels: torch.Tensor, positive_mask: torch.Tensor) -> torch.Tensor:
        """Rows to use (positives + random negatives, sorted); remaps `labels` in place."""
        with torch.no_grad():
            positive = torch.unique(labels[positive_mask], sorted=True)
            if self.num_sample - positive.numel() >= 0:
                scores = torch.rand(self.num_local, device=labels.device)
                scores[positive] = 2.0
                index = torch.topk(scores, k=self.num_sample)[1].sort()[0]
            else:
                index = positive
            labels[positive_mask] = torch.searchsorted(index, labels[positive_mask])
        return index

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        local_labels = local_labels.view(-1).long()
        distributed = _distributed(self.world_size)
        if distributed:
            embeddings = _GatherEmbeddings.apply(local_embeddings, self.world_size, self.rank)
            labels = _gather_labels(local_labels, self.world_size)
        else:
            embeddings, labels = local_embeddings, local_labels.clone()
        labels = labels.view(-1, 1)
        positive_mask = (self.class_start <= labels) & (labels < self.class_start + self.num_local)
        labels[~positive_mask] = -1
        labels[positive_mask] -= self.class_start
        weight = self.weight[self._sample(labels, positive_mask)] if self.sample_rate < 1 else self.weight
        device_type = embeddings.device.type
        dtype = torch.float16 if device_type == "cuda" else (self.amp_dtype or torch.bfloat16)
        with torch.autocast(device_type, dtype=dtype, enabled=self.fp16):
            logits = F.linear(F.normalize(embeddings), F.normalize(weight))
        if self.fp16:
            logits = logits.float()
        logits = self.margin(logits.clamp(-1, 1), labels)
        return _DistCrossEntropy.apply(logits, labels, distributed)


def configure_like_insightface() -> None:
    """The global setting insightface's train.py makes: cuDNN picks the fastest convolution algorithms."""
    torch.backends.cudnn.benchmark = True


def build_insightface_step(backbone: nn.Module, head: nn.Module, *, fp16: bool = True, lr: float = 0.1,
                           momentum: float = 0.9, weight_decay: float = 5e-4, clip_norm: float = 5.0,
                           device_type: str = "cuda") -> tuple[Callable, torch.optim.Optimizer]:
    """(step(images, labels) -> loss as a float, optimizer): insightface's training-loop body.

    `backbone` is built with fp16=fp16 (its trunk autocasts itself); `head` an
    InsightfacePartialFC. The images stay NCHW.
    """
    optimizer = torch.optim.SGD([{"params": backbone.parameters()}, {"params": head.parameters()}],
                                lr=lr, momentum=momentum, weight_decay=weight_decay)
    scaler = torch.amp.GradScaler(device_type, growth_interval=100) if fp16 else None

    def step(images: torch.Tensor, labels: torch.Tensor) -> float:
        loss = head(backbone(images), labels)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(backbone.parameters(), clip_norm)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(backbone.parameters(), clip_norm)
            optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    return step, optimizer


# --- model-FLOPs utilisation ---------------------------------------------------------------

def _conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                         _output_padding, _groups, output_mask, out_shape=None, **_kwargs) -> int:
    """convolution_backward: each gradient it computes (input, weight) takes as many
    multiply-adds as the forward convolution. torch's own formula (2.13) counts the
    weight gradient of a grouped convolution as if it were ungrouped -- `groups` times too
    many, 512x for MobileFaceNet's depthwise layers -- so the count is made here."""
    from torch.utils.flop_counter import conv_flop_count

    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def count_step_flops(step: Callable, *args) -> int:
    """FLOPs of one call of `step(*args)` (forward and backward when it runs both), as
    torch.utils.flop_counter.FlopCounterMode counts them (with grouped convolutions'
    backward counted right, see _conv_backward_flops): matmuls and convolutions, a
    multiply-add = 2 FLOPs; element-wise work is not counted (the usual MFU convention).
    The call is a real step: run it on a warm-up step."""
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {torch.ops.aten.convolution_backward: _conv_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        step(*args)
    return counter.get_total_flops()


def mfu(step_flops: float, seconds: float, peak: float) -> float:
    """Model-FLOPs utilisation: the step's counted FLOPs per second over the device's peak."""
    if seconds <= 0 or peak <= 0:
        raise ValueError(f"seconds and peak must be positive, got {seconds}, {peak}")
    return step_flops / seconds / peak


# Dense (no structured sparsity) 16-bit tensor-core peaks from the vendors' datasheets, in
# FLOP/s, with float32 accumulation (what autocast matmuls use; GeForce cards run it at half
# their float16-accumulate rate). The first name fragment found in the device name wins.
PEAK_FLOPS: tuple[tuple[str, float, str], ...] = (
    ("H200 NVL", 835e12, "H200 NVL, dense fp16/bf16"),
    ("H200", 989.4e12, "H200 SXM, dense fp16/bf16"),
    ("H100 PCIe", 756.5e12, "H100 PCIe, dense fp16/bf16"),
    ("H100 NVL", 835e12, "H100 NVL, dense fp16/bf16"),
    ("H100", 989.4e12, "H100 SXM, dense fp16/bf16"),
    ("GH200", 989.4e12, "GH200, dense fp16/bf16"),
    ("B200", 2250e12, "B200, dense fp16/bf16"),
    ("A100", 312e12, "A100, dense fp16/bf16"),
    ("A800", 312e12, "A800, dense fp16/bf16"),
    ("L40S", 362.05e12, "L40S, dense fp16/bf16"),
    ("L4", 121e12, "L4, dense fp16/bf16"),
    ("A10G", 70e12, "A10G, dense fp16/bf16"),
    ("A10", 125e12, "A10, dense fp16/bf16"),
    ("V100", 125e12, "V100 SXM2, dense fp16"),
    ("T4", 65e12, "T4, dense fp16"),
    ("RTX 4090", 165.2e12, "RTX 4090, dense fp16 with fp32 accumulation"),
    ("RTX 3090", 71e12, "RTX 3090, dense fp16 with fp32 accumulation"),
)


def peak_flops(device_name: str) -> tuple[float, str] | None:
    """(peak FLOP/s, what it is) for a device name such as torch.cuda.get_device_name(); None if unknown."""
    for fragment, flops, label in PEAK_FLOPS:
        if fragment.lower() in device_name.lower():
            return flops, label
    return None


def _fastest_seconds(run: Callable[[], object], device: torch.device, repeats: int) -> float:
    """The fastest of `repeats` timed calls of `run`, after one untimed call."""
    from bench.common import timed

    run()
    return min(timed(run, device) for _ in range(repeats))


def measured_matmul_flops(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", *,
                          size: int = 2048, repeats: int = 3) -> float:
    """FLOP/s of the fastest of `repeats` [size x size] @ [size x size] matmuls in `dtype`."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    return 2 * size**3 / _fastest_seconds(lambda: torch.mm(a, b), device, repeats)


# The convolution the ceiling times: an r50 stage-3 layer (3x3, 256 -> 256 channels at 14 x 14,
# stride 1, padded), batch 32, channels_last as train.py runs it.
CEILING_CONV = dict(batch=32, channels=256, size=14, kernel=3)


def measured_conv_flops(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", *,
                        repeats: int = 3) -> float:
    """FLOP/s of the fastest of `repeats` forward calls of the CEILING_CONV convolution in `dtype`."""
    device = torch.device(device)
    n, c, hw, k = (CEILING_CONV[key] for key in ("batch", "channels", "size", "kernel"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, hw, hw, generator=g).to(device=device, dtype=dtype, memory_format=torch.channels_last)
    w = torch.randn(c, c, k, k, generator=g).to(device=device, dtype=dtype, memory_format=torch.channels_last)
    flops = 2 * n * c * c * k * k * hw * hw
    return flops / _fastest_seconds(lambda: F.conv2d(x, w, padding=k // 2), device, repeats)


def measured_peak_flops(dtype: torch.dtype, device: torch.device | str,
                        name: str) -> tuple[float, str]:
    """(FLOP/s, what it is, `name` being the dtype's short name): a measured ceiling for
    devices without a datasheet peak (CPUs), as MFU's denominator -- the faster of a
    [2048 x 2048] matmul and the CEILING_CONV convolution in `dtype`. Other load on the
    machine only lowers it.

    Both, because they run on different libraries: torch.mm in float32 calls MKL's sgemm, and
    on a CPU that is not Intel's MKL takes a slower code path (a 2-core AMD EPYC, Zen 5,
    2026-12-02: 166-192 GFLOP/s, where oneDNN's convolutions reached 424-480 on the same
    cores), while the steps' FLOPs are mostly convolutions, which oneDNN runs; a matmul alone
    put the r50 fp32 step at 131% there."""
    matmul = measured_matmul_flops(dtype, device)
    conv = measured_conv_flops(dtype, device)
    peak = max(matmul, conv)
    return peak, (f"measured {peak / 1e9:,.0f} GFLOP/s {name}: the faster of a 2048^2 GEMM ({matmul / 1e9:,.0f}) "
                  f"and a 3x3 convolution ({conv / 1e9:,.0f})")


def format_mfu(step_flops: float, seconds: float, device_name: str) -> str:
    """'41.3% of H100 SXM, dense fp16/bf16 (989 TFLOP/s)', or why there is no figure."""
    found = peak_flops(device_name)
    if found is None:
        return f"n/a (no peak known for {device_name!r})"
    peak, label = found
    return f"{100 * mfu(step_flops, seconds, peak):.1f}% of {label} ({peak / 1e12:,.0f} TFLOP/s)"

