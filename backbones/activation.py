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
        # The slope's gradient is summed in x's dtype: ATen's CPU reductions accumulate bf16 and
        # fp16 in float32 and round only the per-channel result (tests/test_activation.py holds
        # torch to that), which is also the precision of nn.PReLU's gradient under autocast.
        # Asking for a float32 result instead (sum(dtype=torch.float32)) first copies the whole
        # bf16 tensor to a new float32 one: 15 ms against 1.1 ms on a 32x128x56x56 activation
        # (2-core Xeon with AMX), and a quarter of mbf_small's bf16 step in the profile.
        if torch.is_grad_enabled():
            # backward(create_graph=True): the in-place steps below are not differentiable;
            # ATen's kernel is, and it returns the slope's gradient before the sum.
            grad_input, grad_weight = torch.ops.aten._prelu_kernel_backward(grad_output, x, slope)
            grad_weight = grad_weight.sum(reduce_dims)
        else:
            through = torch.ops.aten.threshold_backward(grad_output, x, 0)  # the gradient where x > 0
            # Where x <= 0. A graph being compiled gets a tensor of its own: the compiler plans memory.
            scratch = None if torch.compiler.is_compiling() else _scratch_like(through)
            negative_side = torch.sub(grad_output, through, out=scratch)
            grad_input = through.addcmul_(negative_side, slope)
            # The slope's gradient sums x * grad over the negative side.
            grad_weight = negative_side.mul_(x).sum(reduce_dims)
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
# fp32, 205 MB for r50 at batch 128 in bf16, against gigabytes of activations in that step.
_scratch = threading.local()


def _scratch_like(tensor: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor with `tensor`'s shape, dtype and strides, on reused memory."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    buffer = buffers.get(tensor.dtype)
    if buffer is None or buffer.numel() < tensor.numel():
        buffer = buffers[tensor.dtype] = torch.empty(tensor.numel(), dtype=tensor.dtype)
    # threshold_backward's result is dense (contiguous or channels_last), so its strides
    # address exactly numel() elements from the start of the buffer.
    return buffer.as_strided(tensor.shape, tensor.stride())


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
