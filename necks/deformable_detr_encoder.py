"""Deformable DETR's neck: input projections, extra coarse levels and the multi-scale deformable encoder.

The last `backbone_levels` backbone maps (Deformable DETR: strides 8, 16, 32) are projected to `hidden_dim`
(1x1 conv + GroupNorm(32)); `num_feature_levels - backbone_levels` extra levels come from 3x3 stride-2 convs
(+ GroupNorm), the first on the coarsest backbone map, the next ones on the previous extra level. Each level
gets DETR's sine position embedding of the pixel centres plus a learned level embedding, and all levels are
refined jointly by `encoder_layers` deformable self-attention layers (`MSDeformAttnEncoderLayer`, reference
points at the pixel centres). As transformers' `DeformableDetrModel` with a pixel mask of ones: the model sees
the padded image, like the segmentation models.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from densepred.layers import NeckOutput, PositionEmbeddingSine
from densepred.necks.msdeform_pixel_decoder import MSDeformAttnEncoderLayer, encode_levels


def _projection(in_channels: int, hidden_dim: int, kernel_size: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden_dim, kernel_size, stride=stride, padding=kernel_size // 2),
        nn.GroupNorm(32, hidden_dim),
    )


class DeformableDetrEncoder(nn.Module):
    """Backbone maps -> `num_feature_levels` encoded maps (fine to coarse), `NeckOutput(mask_features=None)`.

    `out_channels` = `hidden_dim`, `out_strides` the stride of each level, `mask_dim` None (no mask features).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        in_strides: Sequence[int],
        hidden_dim: int = 256,
        num_feature_levels: int = 4,
        backbone_levels: int = 3,
        encoder_layers: int = 6,
        num_heads: int = 8,
        num_points: int = 4,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        implementation: str = "auto",
    ) -> None:
        """`backbone_levels`: how many of the backbone's coarsest maps are used (at most `num_feature_levels`
        and the backbone's count)."""
        super().__init__()
        if len(in_channels) != len(in_strides) or not in_channels:
            raise ValueError(f"in_channels {list(in_channels)} and in_strides {list(in_strides)}: one per backbone map")
        used = min(backbone_levels, num_feature_levels, len(in_channels))
        if used < 1:
            raise ValueError(f"backbone_levels={backbone_levels}, num_feature_levels={num_feature_levels}: need >= 1")
        self.backbone_levels = used
        self.num_feature_levels = num_feature_levels
        self.hidden_dim = hidden_dim
        channels = list(in_channels)[-used:]
        strides = list(in_strides)[-used:]
        projections = [_projection(c, hidden_dim, 1, 1) for c in channels]
        extra_in = channels[-1]
        for _ in range(num_feature_levels - used):
            projections.append(_projection(extra_in, hidden_dim, 3, 2))
            extra_in = hidden_dim
            strides.append(strides[-1] * 2)
        self.input_proj = nn.ModuleList(projections)
        self.out_strides = strides
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, hidden_dim))
        self.position_embedding = PositionEmbeddingSine(hidden_dim // 2, normalize=True, offset=-0.5)
        self.encoder_layers = nn.ModuleList(
            MSDeformAttnEncoderLayer(
                hidden_dim, dim_feedforward, dropout, num_feature_levels, num_heads, num_points, implementation
            )
            for _ in range(encoder_layers)
        )
        self.reset_parameters()

    @property
    def out_channels(self) -> int:
        return self.hidden_dim

    @property
    def mask_dim(self) -> None:
        return None

    def reset_parameters(self) -> None:
        """The original initialisation: Xavier (uniform) for the projections and encoder, N(0, 1) level embedding."""
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        for layer in self.encoder_layers:
            for p in layer.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
            layer.self_attn.reset_parameters()
        nn.init.normal_(self.level_embed)

    def repeated_blocks(self) -> list[nn.Module]:
        """The deformable encoder layers, the units of activation checkpointing (`utils.checkpointing`)."""
        return list(self.encoder_layers)

    def forward(self, features: list[torch.Tensor]) -> NeckOutput:
        """features: the backbone's maps, fine to coarse -> NeckOutput with `num_feature_levels` maps
        (B, hidden_dim, h_l, w_l), fine to coarse, and their `strides`."""
        inputs = features[-self.backbone_levels :]
        srcs = [proj(x) for proj, x in zip(self.input_proj, inputs, strict=False)]
        for level in range(self.backbone_levels, self.num_feature_levels):
            srcs.append(self.input_proj[level](inputs[-1] if level == self.backbone_levels else srcs[-1]))
        maps = encode_levels(srcs, self.position_embedding, self.level_embed, self.encoder_layers)
        return NeckOutput(mask_features=None, multi_scale_features=maps, strides=list(self.out_strides))
