"""MobileFaceNet (depthwise-separable bottlenecks with a global depthwise head): mbf, mbf_large, mbf_small.

Module names follow insightface's arcface_torch so its released `model.pt` files load with
strict=True. `gradient_checkpointing` is accepted for a uniform interface and ignored:
the network is small enough that activations are not the memory bottleneck.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .activation import PReLU
from .conv import Conv2d
from .precision import float32_region, trunk_autocast
from .registry import register_model

INPUT_SIZE = 112
_HEAD_CHANNELS = 512
_HEAD_SPATIAL = 7  # 112 after four stride-2 stages


class ConvBlock(nn.Module):
    """Conv (no bias) -> BatchNorm -> PReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1,
                 padding: int = 0, groups: int = 1):
        super().__init__()
        self.layers = nn.Sequential(
            Conv2d(in_channels, out_channels, kernel, stride=stride, padding=padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
            PReLU(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class LinearBlock(nn.Module):
    """Conv (no bias) -> BatchNorm, no activation."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1,
                 padding: int = 0, groups: int = 1):
        super().__init__()
        self.layers = nn.Sequential(
            Conv2d(in_channels, out_channels, kernel, stride=stride, padding=padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DepthWise(nn.Module):
    """Inverted bottleneck: 1x1 expand to `hidden`, 3x3 depthwise (with the stride), 1x1 linear project."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int, stride: int, residual: bool):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(in_channels, hidden),
            ConvBlock(hidden, hidden, kernel=3, stride=stride, padding=1, groups=hidden),
            LinearBlock(hidden, out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


class Residual(nn.Module):
    """`num_blocks` residual DepthWise blocks of constant width."""

    def __init__(self, channels: int, num_blocks: int, hidden: int):
        super().__init__()
        self.layers = nn.Sequential(
            *[DepthWise(channels, channels, hidden, stride=1, residual=True) for _ in range(num_blocks)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GDC(nn.Module):
    """Global depthwise 7x7 conv -> flatten -> (dropout) -> Linear -> BatchNorm1d."""

    def __init__(self, num_features: int, dropout: float):
        super().__init__()
        self.layers = nn.Sequential(
            LinearBlock(_HEAD_CHANNELS, _HEAD_CHANNELS, kernel=_HEAD_SPATIAL, groups=_HEAD_CHANNELS),
            nn.Flatten(1),
            nn.Linear(_HEAD_CHANNELS, num_features, bias=False),
            nn.BatchNorm1d(num_features),
        )
        # Not inside `layers`: an extra index there would shift the released weights' keys.
        self.dropout = nn.Dropout(p=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled, flatten, linear, norm = self.layers
        return norm(linear(self.dropout(flatten(pooled(x)))))


class MobileFaceNet(nn.Module):
    """Input [N, 3, 112, 112] normalised RGB -> unnormalised embedding [N, num_features]."""

    # Convolutions run faster on NHWC tensors (oneDNN and cuDNN); training uses it when
    # the config's channels_last allows.
    prefers_channels_last = True

    def __init__(self, blocks: Sequence[int] = (1, 4, 6, 2), scale: int = 2, dropout: float = 0.0,
                 num_features: int = 512, fp16: bool = False):
        super().__init__()
        if len(blocks) != 4:
            raise ValueError(f"MobileFaceNet needs 4 block counts, got blocks={list(blocks)}")
        self.fp16 = fp16
        self.num_features = num_features
        narrow, wide = 64 * scale, 128 * scale
        if blocks[0] == 1:
            # The original MobileFaceNet stem: one grouped 3x3 conv instead of a residual stage.
            second: nn.Module = ConvBlock(narrow, narrow, kernel=3, padding=1, groups=64)
        else:
            second = Residual(narrow, blocks[0], hidden=128)
        self.layers = nn.ModuleList([
            ConvBlock(3, narrow, kernel=3, stride=2, padding=1),
            second,
            DepthWise(narrow, narrow, hidden=128, stride=2, residual=False),
            Residual(narrow, blocks[1], hidden=128),
            DepthWise(narrow, wide, hidden=256, stride=2, residual=False),
            Residual(wide, blocks[2], hidden=256),
            DepthWise(wide, wide, hidden=512, stride=2, residual=False),
            Residual(wide, blocks[3], hidden=256),
        ])
        self.conv_sep = ConvBlock(wide, _HEAD_CHANNELS)
        self.features = GDC(num_features, dropout)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"MobileFaceNet expects {INPUT_SIZE}x{INPUT_SIZE} inputs, got shape {tuple(x.shape)}")
        device_type = x.device.type
        with trunk_autocast(device_type, self.fp16):
            for layer in self.layers:
                x = layer(x)
        with float32_region(device_type):
            x = self.features(self.conv_sep(x.float()))
        return x


@register_model("mbf")
def mbf(*, dropout: float = 0.0, fp16: bool = False, num_features: int = 512,
        gradient_checkpointing: bool = False) -> MobileFaceNet:
    return MobileFaceNet((1, 4, 6, 2), scale=2, dropout=dropout, num_features=num_features, fp16=fp16)


@register_model("mbf_large")
def mbf_large(*, dropout: float = 0.0, fp16: bool = False, num_features: int = 512,
              gradient_checkpointing: bool = False) -> MobileFaceNet:
    return MobileFaceNet((2, 8, 12, 4), scale=4, dropout=dropout, num_features=num_features, fp16=fp16)


@register_model("mbf_small")
def mbf_small(*, dropout: float = 0.0, fp16: bool = False, num_features: int = 512,
              gradient_checkpointing: bool = False) -> MobileFaceNet:
    """The MobileFaceNet paper's widths (64 / 128 channels; insightface's mbf doubles them).

    Not an insightface network: its weights are its own. The expansions stay those of mbf
    (128 / 256 / 512 hidden channels), which at half the width are the paper's factors 2 and 4.
    """
    return MobileFaceNet((1, 4, 6, 2), scale=1, dropout=dropout, num_features=num_features, fp16=fp16)
