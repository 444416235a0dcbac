"""MaskFormer pixel decoders: the FPN-style `BasePixelDecoder` and `TransformerEncoderPixelDecoder`.

Both follow the official MaskFormer (`mask_former/modeling/heads/pixel_decoder.py`): the coarsest backbone
map goes through a 3x3 conv (GroupNorm, ReLU), then each finer level adds its 1x1 lateral projection
(GroupNorm) to the nearest-upsampled coarser output and goes through a 3x3 conv (GroupNorm, ReLU); a 3x3
conv on the finest (stride-4) output gives the mask features. The transformer variant first runs a
post-norm transformer encoder (sine positions) over the projected coarsest map; its output is the
transformer decoder's input.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import Conv2dNormActivation

from densepred.layers import NeckOutput, PositionEmbeddingSine


def check_pyramid(in_channels: Sequence[int], in_strides: Sequence[int], neck: str) -> None:
    """Refuse a backbone selection a neck cannot use, naming the config key to change."""
    if len(in_channels) != len(in_strides) or not in_channels:
        raise ValueError(
            f"{neck}: in_channels {list(in_channels)} and in_strides {list(in_strides)} must describe the same "
            "non-empty list of backbone stages"
        )
    if list(in_strides) != sorted(set(in_strides)) or in_strides[0] != 4:
        raise ValueError(
            f"{neck} needs backbone stages ordered fine to coarse, the finest at stride 4 (mask features are at "
            f"stride 4); got strides {list(in_strides)}. Select e.g. "
            "backbone.out_features=[stage1,stage2,stage3,stage4]."
        )


class TransformerEncoderLayer(nn.Module):
    """Post-norm DETR encoder layer: positions are added to queries and keys, not to values."""

    def __init__(self, d_model: int, num_heads: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """src (B, HW, C), pos (1 or B, HW, C) -> (B, HW, C)."""
        q = k = src + pos
        src = self.norm1(src + self.dropout(self.self_attn(q, k, src, need_weights=False)[0]))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout(ffn))


def _conv_gn(in_channels: int, out_channels: int, kernel_size: int, relu: bool) -> Conv2dNormActivation:
    """Conv (no bias) + GroupNorm(32) (+ ReLU), with the official c2_xavier_fill initialisation."""
    block = Conv2dNormActivation(
        in_channels,
        out_channels,
        kernel_size=kernel_size,
        norm_layer=lambda channels: nn.GroupNorm(32, channels),
        activation_layer=nn.ReLU if relu else None,
    )
    nn.init.kaiming_uniform_(block[0].weight, a=1)
    return block


class BasePixelDecoder(nn.Module):
    """MaskFormer's FPN pixel decoder.

    in: backbone maps fine to coarse, (B, in_channels[i], H/in_strides[i], W/in_strides[i]), finest at stride 4.
    out: NeckOutput(mask_features (B, mask_dim, H/4, W/4), multi_scale_features [decoder input]); the decoder
    input is the coarsest backbone map itself, so `out_channels` is its channel count.
    """

    def __init__(
        self, in_channels: Sequence[int], in_strides: Sequence[int], conv_dim: int = 256, mask_dim: int = 256
    ) -> None:
        super().__init__()
        check_pyramid(in_channels, in_strides, type(self).__name__)
        if conv_dim % 32:
            raise ValueError(f"{type(self).__name__}: conv_dim={conv_dim} must be a multiple of 32 (GroupNorm(32))")
        self.in_strides = list(in_strides)
        self.conv_dim = conv_dim
        self.mask_dim = mask_dim
        self.out_channels = in_channels[-1]
        self.lateral_convs = nn.ModuleList(_conv_gn(c, conv_dim, 1, relu=False) for c in in_channels[:-1])
        self.output_convs = nn.ModuleList(
            [_conv_gn(conv_dim, conv_dim, 3, relu=True) for _ in in_channels[:-1]]
            + [_conv_gn(in_channels[-1], conv_dim, 3, relu=True)]
        )
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, kernel_size=3, padding=1)
        nn.init.kaiming_uniform_(self.mask_features.weight, a=1)
        nn.init.zeros_(self.mask_features.bias)

    def encode_coarsest(self, x: torch.Tensor) -> torch.Tensor:
        """The coarsest backbone map -> the transformer decoder's input (here: unchanged)."""
        return x

    def forward(self, features: list[torch.Tensor]) -> NeckOutput:
        if len(features) != len(self.output_convs):
            raise ValueError(
                f"{type(self).__name__} was built for {len(self.output_convs)} backbone maps (strides "
                f"{self.in_strides}), got {len(features)}"
            )
        decoder_input = self.encode_coarsest(features[-1])
        y = self.output_convs[-1](decoder_input)
        for i in range(len(features) - 2, -1, -1):
            lateral = self.lateral_convs[i](features[i])
            y = self.output_convs[i](lateral + F.interpolate(y, size=lateral.shape[-2:], mode="nearest"))
        return NeckOutput(mask_features=self.mask_features(y), multi_scale_features=[decoder_input])


class TransformerEncoderPixelDecoder(BasePixelDecoder):
    """BasePixelDecoder with a transformer encoder on the coarsest level.

    The coarsest map is projected (1x1 conv) to conv_dim, encoded by `encoder_layers` post-norm encoder layers
    with sine positions, then enters the FPN; the encoder output (B, conv_dim, H/32, W/32) is the decoder
    input, so `out_channels` is conv_dim.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        in_strides: Sequence[int],
        conv_dim: int = 256,
        mask_dim: int = 256,
        encoder_layers: int = 6,
        num_heads: int = 8,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(in_channels, in_strides, conv_dim=conv_dim, mask_dim=mask_dim)
        self.out_channels = conv_dim
        self.output_convs[-1] = _conv_gn(conv_dim, conv_dim, 3, relu=True)  # now on the encoder output
        self.input_proj = nn.Conv2d(in_channels[-1], conv_dim, kernel_size=1)
        nn.init.kaiming_uniform_(self.input_proj.weight, a=1)
        nn.init.zeros_(self.input_proj.bias)
        self.position_embedding = PositionEmbeddingSine(conv_dim // 2, normalize=True)
        self.encoder_layers = nn.ModuleList(
            TransformerEncoderLayer(conv_dim, num_heads, dim_feedforward, dropout) for _ in range(encoder_layers)
        )
        for layer in self.encoder_layers:
            for p in layer.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)

    def encode_coarsest(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, h, w) -> encoder output (B, conv_dim, h, w)."""
        x = self.input_proj(x)
        batch, channels, height, width = x.shape
        pos = self.position_embedding(x).flatten(2).transpose(1, 2)
        src = x.flatten(2).transpose(1, 2)
        for layer in self.encoder_layers:
            src = layer(src, pos)
        return src.transpose(1, 2).reshape(batch, channels, height, width)
