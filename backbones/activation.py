"""PReLU with a faster backward on CPU, the same module to everything else.

`PReLU` is `nn.PReLU` (same parameter, same state_dict key, same forward, exported to
ONNX as PRelu) except for the gradient when it is trained on a CPU. ATen's CPU kernel for
the PReLU gradient (`_prelu_kernel_backward`, torch 2.13) takes about 22 ms on one
16x128x56x56 activation on two cores, ten times a pass over the tensor, and it was the
second largest item in the profile of the MobileFaceNet step (27%, after the convolutions'
gradient). The backward below builds the same gradient from four vectorised passes
(ReLU's own backward kernel, a subtraction, a fused multiply-add, one product summed per
channel) in 14 ms (fp32) and 8.6 ms (bf16). Measured on the whole backbone's
forward+backward at batch 16 on a 2-core Sapphire Rapids: mbf 0.80x the time with bf16
autocast, 0.91x in fp32 with the kernels held to AVX2; r18 0.82x (bf16).

Two of those passes now write in place and the subtraction writes into a reused buffer:
most of what remained was the cost of fresh memory (see `_scratch`). On the same
16x128x56x56 gradient on a 2-core AMD EPYC (Zen 5), interleaved medians: fp32 14.3 -> 7.9 ms,
bf16 7.9 -> 5.4 ms (ATen's kernel: 22 ms); MobileFaceNet's (mbf_small) whole training step at
batch 32: 0.94x the time in fp32, 0.92x with bf16 autocast.

With bf16 autocast the slope's float32 sum is staged through a reused block too (see
`_sum_in_float32`); steps interleaved one by one in one process (2-core Xeon with AMX, bf16,
medians): mbf_small 0.97x the time at batch 32, 0.90x at 64, 0.82x at 128; r50 0.975x at 32.

CUDA keeps ATen's kernel, which is one fused pass there; so do graphs traced for export.
"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn


class _PReLUFunction(torch.autograd.Function):
    """y = x if x > 0 else w * x, with w per channel (dim 1) or one shared value."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # Under autocast F.prelu casts both operands to the low-precision dtype (prelu is on
        # autocast's lower-precision list); the gradient is computed in that dtype too.
        y = F.prelu(x, weight)
        ctx.save_for_backward(x.to(y.dtype), weight)
        ctx.input_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, weight = ctx.saved_tensors
        grad_output = grad_output.to(x.dtype)
        per_channel = weight.numel() > 1
        if per_channel:
            slope = weight.to(x.dtype).view([1, -1] + [1] * (x.dim() - 2))
            reduce_dims = [d for d in range(x.dim()) if d != 1]
        else:
            slope = weight.to(x.dtype).reshape([])
            reduce_dims = list(range(x.dim()))
        if torch.is_grad_enabled():
            # backward(create_graph=True): the in-place steps below are not differentiable;
            # ATen's kernel is, and it returns the slope's gradient before the sum.
            grad_input, grad_weight = torch.ops.aten._prelu_kernel_backward(grad_output, x, slope)
            sum_dtype = torch.promote_types(x.dtype, torch.float32)  # bf16's products summed in fp32
            grad_weight = grad_weight.sum(reduce_dims, dtype=sum_dtype)
        else:
            through = torch.ops.aten.threshold_backward(grad_output, x, 0)  # the gradient where x > 0
            # Where x <= 0. A graph being compiled gets a tensor of its own: the compiler plans memory.
            scratch = None if torch.compiler.is_compiling() else _scratch_like(through)
            negative_side = torch.sub(grad_output, through, out=scratch)
            grad_input = through.addcmul_(negative_side, slope)
            # The slope's gradient sums x * grad over the negative side.
            grad_weight = _sum_in_float32(negative_side.mul_(x), reduce_dims)
        return grad_input.to(ctx.input_dtype), grad_weight.to(weight.dtype).view_as(weight)


# One reusable buffer per thread and dtype for the backward's temporary. On these CPUs the
# cost of the gradient was mostly fresh memory, not arithmetic: every new activation-sized
# tensor is paged in by the kernel as it is first written (PyTorch's CPU allocator hands large
# blocks back to the operating system when they are freed), and a pass in place reads what the
# pass before left in the cache. Measured in mbf_small's step (2-core AMD EPYC, torch 2.13, fp32
# held to AVX2, channels_last, batch 32, the mean over its PReLUs): an in-place multiply took
# 0.3 ms where the same product into a new tensor took 3.3 ms. Thread-local because each thread
# that runs a backward (the CPU autograd engine runs it on the caller's) needs its own. It keeps
# the largest PReLU input seen for the life of the thread: 51 MB for mbf_small at batch 32 in
# fp32, 205 MB for r50 at batch 128 in bf16, against gigabytes of activations in that step;
# with bf16 or fp16 also one float32 staging block of at most 16 MB.
_scratch = threading.local()


def _scratch_buffer(purpose: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """This thread's reused 1-D buffer for `purpose`, at least `numel` elements of `dtype`."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    buffer = buffers.get((purpose, dtype))
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[(purpose, dtype)] = torch.empty(numel, dtype=dtype)
    return buffer


def _scratch_like(tensor: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor with `tensor`'s shape, dtype and strides, on reused memory."""
    buffer = _scratch_buffer("negative_side", tensor.dtype, tensor.numel())
    # threshold_backward's result is dense (contiguous or channels_last), so its strides
    # address exactly numel() elements from the start of the buffer.
    return buffer.as_strided(tensor.shape, tensor.stride())


# The float32 staging block of _sum_in_float32: at most this many elements (16 MB), or one
# sample where a sample is larger.
STAGING_ELEMENTS = 1 << 22


def _sum_in_float32(products: torch.Tensor, reduce_dims: list[int]) -> torch.Tensor:
    """products.sum(reduce_dims, dtype=float32) for any float dtype, without its cost on CPU.

    For bf16 (and fp16) `sum(dtype=torch.float32)` first copies the whole tensor into a new
    float32 one, and a new tensor of more than 32 MB is fresh memory from the kernel every
    time (glibc's largest mmap threshold): 15 ms for a 32x128x56x56 bf16 activation where
    the sum itself takes 1.1 ms (2-core Xeon with AMX). Summing in bf16 instead (ATen
    accumulates in float32 but rounds each channel's result to bf16) was tried: the demo's four
    seeds ended at 97.60 / 97.70 / 98.10 / 97.40% against 98.00 / 97.90 / 97.90 / 97.90% with the
    whole-tensor float32 sum, not a resolved difference, but not the same gradient either. So
    the products are staged into a reused float32 block, a few samples at a time (dim 0 is
    always reduced), and summed there in float32: 3.9 ms on that activation; the demo 97.40 /
    97.90 / 97.90 / 97.90%. float32 and float64 products are summed as they are.
    """
    if products.dtype in (torch.float32, torch.float64) or torch.compiler.is_compiling():
        return products.sum(reduce_dims, dtype=torch.promote_types(products.dtype, torch.float32))
    per_sample = products[0].numel() if products.dim() > 0 else 1
    if products.numel() <= STAGING_ELEMENTS or products.stride(0) != per_sample:
        # Small: its float32 copy is cheap. Or dim 0 is not the outermost dense dimension (not
        # a layout our networks make), so blocks of samples would not be dense.
        return products.sum(reduce_dims, dtype=torch.float32)
    samples = max(1, STAGING_ELEMENTS // per_sample)
    buffer = _scratch_buffer("float32_staging", torch.float32, samples * per_sample)
    total = None
    for block in products.split(samples):
        # A block of whole samples of a dense (contiguous or channels_last) tensor is dense too.
        staged = buffer[: block.numel()].as_strided(block.shape, block.stride())
        staged.copy_(block)
        partial = staged.sum(reduce_dims)
        total = partial if total is None else total.add_(partial)
    return total


class PReLU(nn.PReLU):
    """nn.PReLU whose CPU training gradient takes the vectorised path above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.device.type == "cpu"
            and torch.is_grad_enabled()
            and (x.requires_grad or self.weight.requires_grad)
            and not torch.jit.is_tracing()
            and not torch.onnx.is_in_onnx_export()
        ):
            return _PReLUFunction.apply(x, self.weight)
        return F.prelu(x, self.weight)
