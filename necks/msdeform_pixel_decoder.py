"""Mask2Former's multi-scale deformable-attention pixel decoder (`MSDeformAttnPixelDecoder`).

The three coarsest backbone maps (strides 8, 16, 32) are projected to `conv_dim` (1x1 conv + GroupNorm),
given a sine position encoding plus a learned level embedding and refined jointly by a stack of
deformable-attention encoder layers. Finer maps (stride 4) are added FPN-style (lateral 1x1 conv, bilinear
upsampling of the level above, 3x3 output conv, GroupNorm), and a 1x1 conv turns the finest level into the
mask features. Like the original, the whole decoder runs in float32, also under autocast.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from densepred.layers import NeckOutput, PositionEmbeddingSine
from densepred.necks.ms_deform_attn import MSDeformAttn, flatten_levels
from densepred.utils.recompute import feed_forward


class MSDeformAttnEncoderLayer(nn.Module):
    """Deformable self-attention over all levels, then an FFN; post-norm, ReLU."""

    def __init__(
        self,
        embed_dim: int = 256,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        num_levels: int = 3,
        num_heads: int = 8,
        num_points: int = 4,
        implementation: str = "auto",
    ) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(embed_dim, num_levels, num_heads, num_points, implementation)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(embed_dim)
        self.linear1 = nn.Linear(embed_dim, dim_feedforward)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, embed_dim)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(embed_dim)

    def forward(
        self,
        src: torch.Tensor,
        pos: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
        level_start_index: Sequence[int],
    ) -> torch.Tensor:
        """src, pos (B, S, C); reference_points (B, S, num_levels, 2) -> (B, S, C)."""
        attended = self.self_attn(src, reference_points, src, spatial_shapes, level_start_index, query_pos=pos)
        src = self.norm1(src + self.dropout1(attended))
        if self.dropout2.p and self.training:
            ffn = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        else:  # the same FFN, its (B, S, dim_feedforward) hidden recomputed in backward instead of saved
            ffn = feed_forward(src, self.linear1, self.linear2, "relu")
        return self.norm2(src + self.dropout3(ffn))


def reference_points(spatial_shapes: Sequence[tuple[int, int]], batch: int, device: torch.device) -> torch.Tensor:
    """Pixel centres of every level as (x, y) in [0, 1]: (B, S, num_levels, 2), the same point on every level
    (no padding, so every valid ratio is 1). The centres i + 1/2 as `arange` (exact, as the original's
    `linspace`), which keeps symbolic sizes symbolic in an exported graph."""
    points = []
    for height, width in spatial_shapes:
        ref_y, ref_x = torch.meshgrid(
            (torch.arange(height, dtype=torch.float32, device=device) + 0.5) / height,
            (torch.arange(width, dtype=torch.float32, device=device) + 0.5) / width,
            indexing="ij",
        )
        points.append(torch.stack((ref_x.reshape(-1), ref_y.reshape(-1)), -1))
    points = torch.cat(points, 0)  # (S, 2)
    return points[None, :, None, :].expand(batch, -1, len(spatial_shapes), -1)


def encode_levels(
    srcs: Sequence[torch.Tensor], position_embedding: nn.Module, level_embed: torch.Tensor, layers: Sequence[nn.Module]
) -> list[torch.Tensor]:
    """Deformable encoding of projected levels (B, C, h_l, w_l): flattened together, each position embedded
    (`position_embedding` plus its row of `level_embed`), refined by the `MSDeformAttnEncoderLayer`s with pixel
    centre references -> the levels again, same shapes."""
    batch, channels = srcs[0].shape[:2]
    src, spatial_shapes, starts = flatten_levels(srcs)  # (B, S, C)
    pos = torch.cat(
        [position_embedding(x).flatten(2).transpose(1, 2) + level_embed[i].view(1, 1, -1) for i, x in enumerate(srcs)],
        1,
    )
    points = reference_points(spatial_shapes, batch, src.device)
    for layer in layers:
        src = layer(src, pos, points, spatial_shapes, starts)
    return [
        x.transpose(1, 2).reshape(batch, channels, h, w)
        for x, (h, w) in zip(src.split([h * w for h, w in spatial_shapes], dim=1), spatial_shapes, strict=True)
    ]


class MSDeformAttnPixelDecoder(nn.Module):
    """Pixel decoder of Mask2Former.

    in_channels / in_strides: the selected backbone stages, fine to coarse, with strides doubling from
    `common_stride` (e.g. 4, 8, 16, 32). The last `num_feature_levels` go through the deformable encoder;
    the finer ones become FPN levels. forward: list of (B, C_i, H/s_i, W/s_i) maps -> NeckOutput with
    mask_features (B, mask_dim, H/common_stride, W/common_stride) and multi_scale_features = the encoder
    outputs (B, conv_dim, H/s, W/s) coarse to fine (strides 32, 16, 8).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        in_strides: Sequence[int],
        conv_dim: int = 256,
        mask_dim: int = 256,
        num_feature_levels: int = 3,
        encoder_layers: int = 6,
        num_heads: int = 8,
        num_points: int = 4,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        num_groups: int = 32,
        common_stride: int = 4,
        implementation: str = "auto",
    ) -> None:
        super().__init__()
        in_channels, in_strides = list(in_channels), list(in_strides)
        num_fpn_levels = len(in_channels) - num_feature_levels
        expected = [common_stride * 2**i for i in range(len(in_strides))]
        if len(in_channels) != len(in_strides) or num_fpn_levels < 1 or in_strides != expected:
            raise ValueError(
                f"MSDeformAttnPixelDecoder needs backbone stages with strides {expected[: num_feature_levels + 1]} "
                f"or more levels doubling from common_stride={common_stride} ({num_feature_levels} for the "
                f"deformable encoder and at least one finer FPN level); got in_strides={in_strides}, "
                f"in_channels={in_channels}. Select them with backbone.out_features, e.g. "
                "['stage1', 'stage2', 'stage3', 'stage4']."
            )
        if conv_dim % num_groups:
            raise ValueError(f"conv_dim={conv_dim} must be divisible by num_groups={num_groups} (GroupNorm)")
        self.mask_dim = mask_dim
        self.out_channels = conv_dim
        self.num_feature_levels = num_feature_levels
        self.conv_dim = conv_dim

        # coarse to fine, as the encoder sees them
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, conv_dim, kernel_size=1), nn.GroupNorm(num_groups, conv_dim))
            for channels in in_channels[num_fpn_levels:][::-1]
        )
        self.position_embedding = PositionEmbeddingSine(conv_dim // 2, normalize=True)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, conv_dim))
        self.encoder_layers = nn.ModuleList(
            MSDeformAttnEncoderLayer(
                conv_dim, dim_feedforward, dropout, num_feature_levels, num_heads, num_points, implementation
            )
            for _ in range(encoder_layers)
        )
        # extra FPN levels, coarse to fine
        self.lateral_convs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, conv_dim, kernel_size=1, bias=False), nn.GroupNorm(num_groups, conv_dim))
            for channels in in_channels[:num_fpn_levels][::-1]
        )
        self.output_convs = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(conv_dim, conv_dim, kernel_size=3, padding=1, bias=False),
                nn.GroupNorm(num_groups, conv_dim),
                nn.ReLU(),
            )
            for _ in range(num_fpn_levels)
        )
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, kernel_size=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The original initialisation: Xavier for the encoder, Caffe2 Xavier for the convs, N(0, 1) level embedding."""
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight)
            nn.init.zeros_(proj[0].bias)
        for layer in self.encoder_layers:
            for p in layer.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
            layer.self_attn.reset_parameters()
        nn.init.normal_(self.level_embed)
        for conv in [*(m[0] for m in self.lateral_convs), *(m[0] for m in self.output_convs), self.mask_features]:
            nn.init.kaiming_uniform_(conv.weight, a=1)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)

    def repeated_blocks(self) -> list[nn.Module]:
        """The deformable encoder layers, the units of activation checkpointing (`utils.checkpointing`)."""
        return list(self.encoder_layers)

    def forward(self, features: list[torch.Tensor]) -> NeckOutput:
        """features: one map per backbone stage, fine to coarse -> NeckOutput (float32)."""
        with torch.autocast(device_type=features[0].device.type, enabled=False):
            return self._forward(features)

    def _forward(self, features: list[torch.Tensor]) -> NeckOutput:
        features = [f.float() for f in features]
        levels = self.num_feature_levels
        coarse = features[-levels:][::-1]  # strides 32, 16, 8
        srcs = [proj(x) for proj, x in zip(self.input_proj, coarse, strict=True)]
        outputs = encode_levels(srcs, self.position_embedding, self.level_embed, self.encoder_layers)
        multi_scale_features = list(outputs)
        fine = features[: len(self.lateral_convs)][::-1]  # the FPN levels, coarse to fine
        for lateral, output_conv, x in zip(self.lateral_convs, self.output_convs, fine, strict=True):
            y = lateral(x)
            y = y + F.interpolate(outputs[-1], size=y.shape[-2:], mode="bilinear", align_corners=False)
            outputs.append(output_conv(y))
        return NeckOutput(mask_features=self.mask_features(outputs[-1]), multi_scale_features=multi_scale_features)
