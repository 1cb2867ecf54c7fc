"""Vision Transformer for 112x112 faces (insightface's arcface_torch ViT), vit_t ... vit_h.

Patch 9 -> 12x12 = 144 tokens, no class token; the whole token grid is flattened into the
embedding head. Module names follow insightface so its released weights load with strict=True.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .checkpointing import checkpointed
from .precision import float32_region, trunk_autocast
from .registry import register_model

INPUT_SIZE = 112
PATCH_SIZE = 9
NUM_PATCHES = (INPUT_SIZE // PATCH_SIZE) ** 2  # 144; the 4 border pixels are never seen
NUM_HEADS = 8
MLP_RATIO = 4
HEAD_BN_EPS = 2e-5


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a sample's residual branch with probability p
    and scale the survivors by 1 / (1 - p)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention; the softmax(q k^T / sqrt(d)) v core always runs in float32."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [batch, heads, tokens, head_dim]
        with float32_region(x.device.type):
            # Default scale is head_dim ** -0.5, as in the reference.
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, drop_path: float):
        super().__init__()
        # Registration order fixes the state_dict order: norm1, norm2, attn, mlp.
        self.norm1 = nn.LayerNorm(dim)  # eps 1e-5, PyTorch's default, as in the reference
        self.norm2 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.drop_path = DropPath(drop_path)
        self.mlp = Mlp(dim, dim * MLP_RATIO)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=PATCH_SIZE, stride=PATCH_SIZE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [batch, tokens, dim]


class VisionTransformer(nn.Module):
    """Input [N, 3, 112, 112] normalised RGB -> unnormalised embedding [N, num_features].

    In training mode a random `mask_ratio` of the patch tokens is dropped before the
    blocks (a regulariser and a speed-up); after the final norm the dropped positions are
    filled with the learned `mask_token` so the head always sees the full 144-token grid.
    """

    # One strided convolution, then token matmuls: NHWC gains nothing.
    prefers_channels_last = False

    def __init__(self, dim: int, depth: int, drop_path_rate: float, mask_ratio: float,
                 dropout: float = 0.0, num_features: int = 512, fp16: bool = False,
                 gradient_checkpointing: bool = False, num_heads: int = NUM_HEADS):
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.dim = dim
        self.mask_ratio = mask_ratio
        self.fp16 = fp16
        self.gradient_checkpointing = gradient_checkpointing
        self.num_features = num_features

        # Parameters of this module come first in the state_dict, in this order.
        self.pos_embed = nn.Parameter(torch.zeros(1, NUM_PATCHES, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.patch_embed = PatchEmbed(dim)
        rates = torch.linspace(0.0, drop_path_rate, depth, device="cpu").tolist()  # stochastic depth rises linearly
        self.blocks = nn.ModuleList([Block(dim, num_heads, rate) for rate in rates])
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(p=dropout)
        self.feature = nn.Sequential(
            nn.Linear(dim * NUM_PATCHES, dim, bias=False),
            nn.BatchNorm1d(dim, eps=HEAD_BN_EPS),
            nn.Linear(dim, num_features, bias=False),
            nn.BatchNorm1d(num_features, eps=HEAD_BN_EPS),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _keep_count(self) -> int:
        return int(NUM_PATCHES * (1.0 - self.mask_ratio))

    def _drop_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep a random subset of tokens per sample; return it and the permutation that restores order."""
        batch, tokens, dim = x.shape
        order = torch.argsort(torch.rand(batch, tokens, device=x.device), dim=1)
        restore = torch.argsort(order, dim=1)
        kept = order[:, : self._keep_count()]
        return torch.gather(x, 1, kept.unsqueeze(-1).expand(-1, -1, dim)), restore

    def _restore_tokens(self, x: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        batch, kept, dim = x.shape
        fill = self.mask_token.to(x.dtype).expand(batch, NUM_PATCHES - kept, dim)
        x = torch.cat([x, fill], dim=1)
        return torch.gather(x, 1, restore.unsqueeze(-1).expand(-1, -1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"VisionTransformer expects {INPUT_SIZE}x{INPUT_SIZE} inputs, got shape {tuple(x.shape)}")
        device_type = x.device.type
        masking = self.training and self.mask_ratio > 0
        use_checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        with trunk_autocast(device_type, self.fp16):
            x = self.patch_embed(x) + self.pos_embed
            if masking:
                x, restore = self._drop_tokens(x)
            for block in self.blocks:
                x = checkpointed(block, x) if use_checkpoint else block(x)
        with float32_region(device_type):
            x = self.norm(x.float())
            if masking:
                x = self._restore_tokens(x, restore)
            x = self.feature(self.dropout(x.flatten(1)))
        return x


@dataclass(frozen=True)
class _Variant:
    dim: int
    depth: int
    drop_path_rate: float
    mask_ratio: float
    gradient_checkpointing: bool


_VARIANTS = {
    "vit_t": _Variant(256, 12, 0.1, 0.1, False),
    "vit_t_dp005_mask0": _Variant(256, 12, 0.05, 0.0, False),
    "vit_s": _Variant(512, 12, 0.1, 0.1, False),
    "vit_s_dp005_mask_0": _Variant(512, 12, 0.05, 0.0, False),
    "vit_b": _Variant(512, 24, 0.1, 0.1, True),
    "vit_b_dp005_mask_005": _Variant(512, 24, 0.05, 0.05, True),
    "vit_l": _Variant(768, 24, 0.1, 0.1, True),
    "vit_l_dp005_mask_005": _Variant(768, 24, 0.05, 0.05, True),
    "vit_h": _Variant(1024, 48, 0.1, 0.0, True),
}


def _register(name: str, variant: _Variant) -> None:
    def build(*, dropout: float = 0.0, fp16: bool = False, num_features: int = 512,
              gradient_checkpointing: bool = variant.gradient_checkpointing) -> VisionTransformer:
        return VisionTransformer(
            variant.dim, variant.depth, variant.drop_path_rate, variant.mask_ratio, dropout=dropout,
            num_features=num_features, fp16=fp16, gradient_checkpointing=gradient_checkpointing,
        )

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"{name}: dim {variant.dim}, depth {variant.depth}, drop_path {variant.drop_path_rate}, " \
                    f"mask_ratio {variant.mask_ratio}"
    register_model(name)(build)


for _name, _variant in _VARIANTS.items():
    _register(_name, _variant)
