"""BatchNorm folded into the convolution before it, for inference.

In eval mode a BatchNorm2d is a per-channel affine map, so the convolution before it can
absorb it: weight * gamma / sqrt(var + eps) and a bias. That removes one full pass over every
such activation. On a 2-core CPU BatchNorm was a quarter of MobileFaceNet's inference time
(bf16, batch 64); the exported ONNX graph gets the same folding from the exporter's
constant folding, so evaluation in training and the shipped model compute alike.
"""
from __future__ import annotations

import copy

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` with each BatchNorm2d folded into the Conv2d before it.

    A pair is folded where the data flow is certain from the structure: a Conv2d directly
    followed by a BatchNorm2d (with running statistics) inside an nn.Sequential, as in
    MobileFaceNet's blocks and IResNet's downsample branches. `model` itself is not changed.
    """
    folded = copy.deepcopy(model).eval()
    for module in folded.modules():
        if not isinstance(module, nn.Sequential):
            continue
        for i in range(len(module) - 1):
            conv, bn = module[i], module[i + 1]
            if (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
                    and bn.running_mean is not None and conv.out_channels == bn.num_features):
                module[i] = fuse_conv_bn_eval(conv, bn)
                module[i + 1] = nn.Identity()
    return folded
