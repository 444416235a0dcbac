"""RT-DETR's hybrid encoder (transformers' `RTDetrHybridEncoder` with RT-DETR's encoder input projections).

The coarsest `num_levels` backbone maps are projected to `hidden_dim` (1x1 conv + BN); AIFI (attention-based
intra-scale feature interaction: post-norm transformer encoder layers with a 2-d sin-cos position embedding)
refines the levels in `aifi_levels` (the coarsest by default); CCFM (cross-scale feature fusion) then runs a
top-down FPN (lateral 1x1 conv, nearest 2x upsampling, concatenation, CSPRep block) and a bottom-up PAN
(3x3 stride-2 conv, concatenation, CSPRep block). The output holds `num_levels` maps of `hidden_dim` channels,
fine to coarse, and no mask features (a detection neck).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from densepred.layers import NeckOutput, multi_head_attention

ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU, None: nn.Identity}


def _activation(name: str | None) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; choose one of {list(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class ConvNormLayer(nn.Module):
    """Conv (no bias, 'same' padding) + BatchNorm + activation."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        activation: str | None = None,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2, bias=False)
        self.norm = nn.BatchNorm2d(out_channels, eps)
        self.activation = _activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.norm(self.conv(x)))


class RepVggBlock(nn.Module):
    """RepVGG block (training form): activation(3x3 conv-BN + 1x1 conv-BN)."""

    def __init__(self, channels: int, activation: str | None = "silu", eps: float = 1e-5) -> None:
        super().__init__()
        self.conv1 = ConvNormLayer(channels, channels, 3, eps=eps)
        self.conv2 = ConvNormLayer(channels, channels, 1, eps=eps)
        self.activation = _activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.conv1(x) + self.conv2(x))


class CSPRepLayer(nn.Module):
    """Cross-stage-partial layer: (RepVGG blocks on a 1x1 branch) + (a second 1x1 branch), then a 1x1 conv
    when the hidden width differs from `out_channels`. (B, in_channels, h, w) -> (B, out_channels, h, w)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_blocks: int = 3,
        expansion: float = 1.0,
        activation: str | None = "silu",
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        hidden = int(out_channels * expansion)
        self.conv1 = ConvNormLayer(in_channels, hidden, 1, activation=activation, eps=eps)
        self.conv2 = ConvNormLayer(in_channels, hidden, 1, activation=activation, eps=eps)
        self.bottlenecks = nn.Sequential(*(RepVggBlock(hidden, activation, eps) for _ in range(num_blocks)))
        self.conv3 = (
            ConvNormLayer(hidden, out_channels, 1, activation=activation, eps=eps)
            if hidden != out_channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.bottlenecks(self.conv1(x)) + self.conv2(x))


def sincos_position_embedding(
    height: int, width: int, dim: int, temperature: float, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """2-d sin-cos embedding of an (h, w) grid, rows outer: (1, h * w, dim) laid out as [sin y | cos y | sin x |
    cos x] (transformers' `build_2d_sinusoidal_position_embedding`, computed in float64)."""
    if dim % 4:
        raise ValueError(f"the 2-d sin-cos position embedding needs hidden_dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float64, device=device) / quarter)
    grid_y, grid_x = torch.meshgrid(
        torch.arange(height, dtype=torch.float64, device=device),
        torch.arange(width, dtype=torch.float64, device=device),
        indexing="ij",
    )
    y, x = grid_y.flatten().outer(omega), grid_x.flatten().outer(omega)
    return torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=1)[None].to(dtype)


class AIFILayer(nn.Module):
    """Transformer encoder layer: self-attention (position embedding added to queries and keys), FFN; post-norm
    by default (pre-norm with `normalize_before`). (B, S, C) -> (B, S, C)."""

    def __init__(
        self,
        hidden_dim: int = 256,
        num_heads: int = 8,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        activation: str = "gelu",
        normalize_before: bool = False,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.normalize_before = normalize_before
        self.self_attn = nn.MultiheadAttention(hidden_dim, num_heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(hidden_dim, eps=eps)
        self.linear1 = nn.Linear(hidden_dim, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, hidden_dim)
        self.norm2 = nn.LayerNorm(hidden_dim, eps=eps)
        self.activation = _activation(activation)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        residual = x
        if self.normalize_before:
            x = self.norm1(x)
        query = x + pos
        x = residual + self.dropout(multi_head_attention(self.self_attn, query, query, x))
        if not self.normalize_before:
            x = self.norm1(x)
        residual = x
        if self.normalize_before:
            x = self.norm2(x)
        x = residual + self.dropout(self.linear2(self.dropout(self.activation(self.linear1(x)))))
        if not self.normalize_before:
            x = self.norm2(x)
        return x


class HybridEncoder(nn.Module):
    """RT-DETR's neck: input projections, AIFI on `aifi_levels`, CCFM (top-down FPN + bottom-up PAN).

    Reads the coarsest `num_levels` maps of the backbone (`in_channels`, `in_strides`, fine to coarse); returns
    `NeckOutput(mask_features=None, multi_scale_features=[num_levels maps (B, hidden_dim, h_i, w_i)], fine to
    coarse, strides=out_strides)`.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        in_strides: Sequence[int],
        hidden_dim: int = 256,
        num_levels: int = 3,
        aifi_levels: Sequence[int] = (2,),
        encoder_layers: int = 1,
        num_heads: int = 8,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        encoder_activation: str = "gelu",
        normalize_before: bool = False,
        temperature: float = 10000.0,
        activation: str = "silu",
        expansion: float = 1.0,
        num_blocks: int = 3,
        batch_norm_eps: float = 1e-5,
        layer_norm_eps: float = 1e-5,
    ) -> None:
        """`aifi_levels`: indices into the `num_levels` used levels (0 the finest) refined by AIFI, each with
        its own `encoder_layers` layers; `expansion` / `num_blocks`: the CSPRep blocks' hidden width ratio and
        RepVGG depth."""
        super().__init__()
        if len(in_channels) != len(in_strides) or len(in_channels) < num_levels:
            raise ValueError(
                f"HybridEncoder reads the {num_levels} coarsest backbone maps, got in_channels={list(in_channels)}, "
                f"in_strides={list(in_strides)}; select more backbone stages (backbone.out_features) or set "
                "neck.num_levels"
            )
        if any(not -num_levels <= level < num_levels for level in aifi_levels):
            raise ValueError(f"neck.aifi_levels={list(aifi_levels)} must index the {num_levels} levels")
        self.in_channels = list(in_channels)[-num_levels:]
        self.out_strides = list(in_strides)[-num_levels:]
        self.out_channels = hidden_dim
        self.mask_dim = None
        self.num_levels = num_levels
        self.aifi_levels = [level % num_levels for level in aifi_levels]
        self.hidden_dim = hidden_dim
        self.temperature = temperature
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, hidden_dim, 1, bias=False), nn.BatchNorm2d(hidden_dim, batch_norm_eps))
            for c in self.in_channels
        )
        self.aifi = nn.ModuleList(
            nn.ModuleList(
                AIFILayer(
                    hidden_dim,
                    num_heads,
                    dim_feedforward,
                    dropout,
                    encoder_activation,
                    normalize_before,
                    layer_norm_eps,
                )
                for _ in range(encoder_layers)
            )
            for _ in self.aifi_levels
        )

        def conv(kernel_size: int, stride: int) -> ConvNormLayer:
            return ConvNormLayer(hidden_dim, hidden_dim, kernel_size, stride, activation, batch_norm_eps)

        def csp() -> CSPRepLayer:
            return CSPRepLayer(2 * hidden_dim, hidden_dim, num_blocks, expansion, activation, batch_norm_eps)

        self.lateral_convs = nn.ModuleList(conv(1, 1) for _ in range(num_levels - 1))
        self.fpn_blocks = nn.ModuleList(csp() for _ in range(num_levels - 1))
        self.downsample_convs = nn.ModuleList(conv(3, 2) for _ in range(num_levels - 1))
        self.pan_blocks = nn.ModuleList(csp() for _ in range(num_levels - 1))

    def repeated_blocks(self) -> list[nn.Module]:
        """The AIFI layers and the CSPRep blocks, the units of activation checkpointing."""
        return [*(layer for layers in self.aifi for layer in layers), *self.fpn_blocks, *self.pan_blocks]

    def encode(self, x: torch.Tensor, layers: nn.ModuleList) -> torch.Tensor:
        """AIFI over one level: (B, C, h, w) -> (B, C, h, w)."""
        batch, channels, height, width = x.shape
        pos = sincos_position_embedding(height, width, channels, self.temperature, x.device, x.dtype)
        tokens = x.flatten(2).transpose(1, 2)
        for layer in layers:
            tokens = layer(tokens, pos)
        return tokens.transpose(1, 2).reshape(batch, channels, height, width)

    def forward(self, features: Sequence[torch.Tensor]) -> NeckOutput:
        """Backbone maps (fine to coarse, the coarsest `num_levels` used) -> NeckOutput (see class doc)."""
        features = list(features)[-self.num_levels :]
        if len(features) != self.num_levels:
            raise ValueError(f"HybridEncoder expects at least {self.num_levels} backbone maps, got {len(features)}")
        maps = [proj(x) for proj, x in zip(self.input_proj, features, strict=True)]
        for level, layers in zip(self.aifi_levels, self.aifi, strict=True):
            maps[level] = self.encode(maps[level], layers)
        # top-down FPN, coarse to fine
        top_down = [maps[-1]]
        for i, (lateral, block) in enumerate(zip(self.lateral_convs, self.fpn_blocks, strict=True)):
            top = lateral(top_down[-1])
            top_down[-1] = top
            upsampled = F.interpolate(top, scale_factor=2.0, mode="nearest")
            top_down.append(block(torch.cat([upsampled, maps[self.num_levels - 2 - i]], dim=1)))
        top_down.reverse()  # fine to coarse
        # bottom-up PAN, fine to coarse
        outputs = [top_down[0]]
        for i, (down, block) in enumerate(zip(self.downsample_convs, self.pan_blocks, strict=True)):
            outputs.append(block(torch.cat([down(outputs[-1]), top_down[i + 1]], dim=1)))
        return NeckOutput(mask_features=None, multi_scale_features=outputs, strides=list(self.out_strides))
