"""Conv2d with CPU routes around two slow oneDNN kernels, the same module to everything else.

`Conv2d` is `nn.Conv2d` (same parameters, state_dict keys, results up to rounding, and the
same Conv node in an exported ONNX graph) except for how two kinds of convolution are
computed on a CPU. Both are in MobileFaceNet, and they made up 0.8 s of its 2.2 s training
step at batch 32 under bf16 autocast (2-core Sapphire Rapids, torch 2.13):

* **Grouped convolutions with few channels per group** (mbf's `conv2_dw`: 128 channels in
  64 groups of 2). oneDNN runs them as many tiny convolutions: 196 ms forward+backward in
  fp32 and 441 ms in bf16 on a 32x128x56x56 input, where a dense 3x3 convolution of the same
  size does 64 times the arithmetic in less. Here neighbouring groups are merged into one
  group of `_MERGED_GROUP_CHANNELS` input channels whose weight is block-diagonal (zeros
  between the original groups), so the kernel sees fewer, wider groups: 51 ms (bf16, 16
  channels), 116 ms (fp32, 8 channels; 146 ms against 227 ms with the kernels held to
  AVX2). The zeros cost arithmetic, not accuracy: the products they add are exact zeros.
  The weight's gradient flows back through the block-diagonal product, so it is zero
  off the blocks and the parameter keeps its original shape.
* **The input gradient of a strided depthwise convolution in bf16** (mbf's stride-2
  depthwise layers). oneDNN's bf16 kernel for it takes 134-162 ms whatever the size
  (32x{128x56, 256x28, 512x14}; fp32: 1-26 ms). The same gradient is a stride-1 depthwise
  convolution of the output gradient spread onto a zero grid at the stride (the transposed
  convolution written out), which oneDNN runs fast in bf16: 22, 10 and 4 ms. fp32 keeps
  oneDNN's own gradient, which is faster there than the zero grid.

Depthwise convolutions are not merged (16 times the arithmetic for kernels that are already
direct). CUDA (cuDNN has neither problem), graphs traced for export and float64 take the
plain path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Input channels per merged group, by compute dtype: the fastest of 4, 8, 16 and 32
# measured on mbf's conv2_dw (32x128x56x56, forward+backward, 2 cores).
_MERGED_GROUP_CHANNELS = {torch.bfloat16: 16, torch.float32: 8}


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype F.conv2d will compute in: the CPU autocast dtype where autocast is on."""
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return x.dtype


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


def merge_factor(in_channels: int, groups: int, dtype: torch.dtype) -> int:
    """How many neighbouring groups to merge into one (1: leave the convolution as it is)."""
    channels_per_group = in_channels // groups
    target = _MERGED_GROUP_CHANNELS.get(dtype)
    if groups == 1 or channels_per_group == 1 or target is None:
        return 1
    merge = max(1, target // channels_per_group)
    while groups % merge:
        merge -= 1
    return merge


def block_diagonal_weight(weight: torch.Tensor, groups: int, merge: int) -> torch.Tensor:
    """The weight of the same convolution with every `merge` neighbouring groups as one group.

    Output channel (group g, j) of the original weight keeps its index; in the merged group
    it reads the merged group's input channels, with zeros for those of the other groups.
    """
    out_channels, in_per_group, kh, kw = weight.shape
    out_per_group = out_channels // groups
    blocks = weight.view(groups // merge, merge, out_per_group, 1, in_per_group, kh, kw)
    eye = torch.eye(merge, dtype=weight.dtype, device=weight.device).view(1, merge, 1, merge, 1, 1, 1)
    return (blocks * eye).reshape(out_channels, merge * in_per_group, kh, kw)


def depthwise_input_gradient(grad_output: torch.Tensor, weight: torch.Tensor, input_shape: torch.Size,
                             stride: tuple[int, int], padding: tuple[int, int]) -> torch.Tensor:
    """The input gradient of a depthwise convolution (dilation 1) as a stride-1 convolution.

    The output gradient is spread onto a zero grid at the stride; convolving the grid with
    the kernel flipped in both axes, padded by kernel-1-padding, gives every input position
    the sum of the kernel taps that read it.
    """
    batch, channels, height, width = input_shape
    kh, kw = weight.shape[-2:]
    grid = torch.empty((batch, channels, height + 2 * padding[0] - kh + 1, width + 2 * padding[1] - kw + 1),
                       dtype=grad_output.dtype, device=grad_output.device, memory_format=_memory_format(grad_output))
    grid.zero_()
    grid[:, :, ::stride[0], ::stride[1]] = grad_output
    return F.conv2d(grid, weight.flip(-1, -2), padding=(kh - 1 - padding[0], kw - 1 - padding[1]), groups=channels)


class _StridedDepthwiseConv(torch.autograd.Function):
    """A depthwise convolution whose input gradient is `depthwise_input_gradient`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int],
                padding: tuple[int, int]) -> torch.Tensor:
        # Under autocast F.conv2d casts both operands to the low-precision dtype; the
        # gradients are computed in that dtype too, as autocast's own convolution does.
        y = F.conv2d(x, weight, None, stride, padding, 1, weight.shape[0])
        ctx.save_for_backward(x.to(y.dtype), weight.to(y.dtype))
        ctx.conv = (stride, padding)
        ctx.dtypes = (x.dtype, weight.dtype)
        return y

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        x, weight = ctx.saved_tensors
        stride, padding = ctx.conv
        grad_output = grad_output.to(x.dtype)
        grad_input = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_input = depthwise_input_gradient(grad_output, weight, x.shape, stride, padding).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            grad_weight = torch.ops.aten.convolution_backward(
                grad_output, x, weight, None, list(stride), list(padding), [1, 1], False, [0, 0], weight.shape[0],
                [False, True, False])[1].to(ctx.dtypes[1])
        return grad_input, grad_weight, None, None


class Conv2d(nn.Conv2d):
    """nn.Conv2d that takes the routes above on a CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type != "cpu" or self.padding_mode != "zeros" or isinstance(self.padding, str)
                or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):
            return super().forward(x)
        dtype = _compute_dtype(x)
        merge = merge_factor(self.in_channels, self.groups, dtype)
        if merge > 1:
            weight = block_diagonal_weight(self.weight, self.groups, merge)
            return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups // merge)
        if (dtype == torch.bfloat16 and self.groups == self.in_channels == self.out_channels and self.bias is None
                and max(self.stride) > 1 and self.dilation == (1, 1)
                and all(pad < size for pad, size in zip(self.padding, self.kernel_size)) and torch.is_grad_enabled()
                and (x.requires_grad or self.weight.requires_grad)):
            return _StridedDepthwiseConv.apply(x, self.weight, self.stride, self.padding)
        return super().forward(x)
