"""IResNet (improved ResNet with pre-activation BN-Conv-BN-PReLU-Conv-BN blocks), r18 ... r200.

Module names follow insightface's arcface_torch so its released `model.pt` files load with
strict=True.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .activation import PReLU
from .checkpointing import checkpointed
from .precision import float32_region, trunk_autocast
from .registry import register_model

INPUT_SIZE = 112
_STAGE_WIDTHS = (64, 128, 256, 512)
_FINAL_SPATIAL = 7  # 112 halved by each of the four stages


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """out = bn3(conv2(prelu(bn2(conv1(bn1(x)))))) + shortcut(x); the stride sits on conv2."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        # Registration order fixes the state_dict order: bn1, conv1, bn2, prelu, conv2, bn3, downsample.
        self.bn1 = nn.BatchNorm2d(in_channels, eps=1e-5)
        self.conv1 = _conv3x3(in_channels, channels)
        self.bn2 = nn.BatchNorm2d(channels, eps=1e-5)
        self.prelu = PReLU(channels)
        self.conv2 = _conv3x3(channels, channels, stride)
        self.bn3 = nn.BatchNorm2d(channels, eps=1e-5)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


def _make_stage(in_channels: int, channels: int, num_blocks: int) -> nn.Sequential:
    downsample = nn.Sequential(
        nn.Conv2d(in_channels, channels, kernel_size=1, stride=2, bias=False),
        nn.BatchNorm2d(channels, eps=1e-5),
    )
    blocks = [IBasicBlock(in_channels, channels, stride=2, downsample=downsample)]
    blocks += [IBasicBlock(channels, channels) for _ in range(1, num_blocks)]
    return nn.Sequential(*blocks)


class IResNet(nn.Module):
    """Input [N, 3, 112, 112] normalised RGB -> unnormalised embedding [N, num_features]."""

    # Convolutions run faster on NHWC tensors (oneDNN and cuDNN); training uses it when
    # the config's channels_last allows.
    prefers_channels_last = True

    def __init__(
        self,
        blocks_per_stage: Sequence[int],
        dropout: float = 0.0,
        num_features: int = 512,
        fp16: bool = False,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        if len(blocks_per_stage) != 4:
            raise ValueError(f"IResNet needs 4 stages, got blocks_per_stage={list(blocks_per_stage)}")
        self.fp16 = fp16
        self.gradient_checkpointing = gradient_checkpointing
        self.num_features = num_features

        self.conv1 = _conv3x3(3, _STAGE_WIDTHS[0])
        self.bn1 = nn.BatchNorm2d(_STAGE_WIDTHS[0], eps=1e-5)
        self.prelu = PReLU(_STAGE_WIDTHS[0])
        in_channels = _STAGE_WIDTHS[0]
        for index, (channels, num_blocks) in enumerate(zip(_STAGE_WIDTHS, blocks_per_stage), start=1):
            self.add_module(f"layer{index}", _make_stage(in_channels, channels, num_blocks))
            in_channels = channels
        self.bn2 = nn.BatchNorm2d(in_channels, eps=1e-5)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(in_channels * _FINAL_SPATIAL * _FINAL_SPATIAL, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # The embedding BN only centres and scales; a learnable gain would let the
        # network inflate the embedding norm, so it is fixed at 1 (as in insightface).
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad_(False)

    def _stages(self) -> tuple[nn.Sequential, ...]:
        return (self.layer1, self.layer2, self.layer3, self.layer4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"IResNet expects {INPUT_SIZE}x{INPUT_SIZE} inputs, got shape {tuple(x.shape)}")
        device_type = x.device.type
        use_checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        with trunk_autocast(device_type, self.fp16):
            x = self.prelu(self.bn1(self.conv1(x)))
            for stage in self._stages():
                for block in stage:
                    x = checkpointed(block, x) if use_checkpoint else block(x)
            x = self.dropout(self.bn2(x))
            x = torch.flatten(x, 1)
        with float32_region(device_type):
            x = self.features(self.fc(x.float()))
        return x


def _build(blocks: Sequence[int], dropout: float, fp16: bool, num_features: int, gradient_checkpointing: bool) -> IResNet:
    return IResNet(blocks, dropout=dropout, num_features=num_features, fp16=fp16,
                   gradient_checkpointing=gradient_checkpointing)


@register_model("r18")
def r18(*, dropout: float = 0.0, fp16: bool = False, num_features: int = 512, gradient_checkpointing: bool = False) -> IResNet:
    return _build((2, 2, 2, 2), dropout, fp16, num_features, gradient_checkpointing)


@register_model("r34")
def r34(*, dropout: float = 0.0, fp16: bool = False, num_features: int = 512, gradient_checkpointing: bool = False) -> IResNet:
    return _build((3, 4, 6, 3), dropout, fp16, num_features, gradient_checkpointing)


@register_model("r50")
def r50(*, dropout: float = 0.0, fp16: bool = False, num_features: int = 512, gradient_checkpointing: bool = False) -> IResNet:
    return _build((3, 4, 14, 3), dropout, fp16, num_features, gradient_checkpointing)


@register_model("r100")
def r100(*, dropout: float = 0.0, fp16: bool = False, num_features: int = 512, gradient_checkpointing: bool = False) -> IResNet:
    return _build((3, 13, 30, 3), dropout, fp16, num_features, gradient_checkpointing)


@register_model("r200")
def r200(*, dropout: float = 0.0, fp16: bool = False, num_features: int = 512, gradient_checkpointing: bool = False) -> IResNet:
    return _build((6, 26, 60, 6), dropout, fp16, num_features, gradient_checkpointing)
