"""FPN neck on torchvision's FeaturePyramidNetwork (lateral 1x1 + output 3x3 convs, nearest top-down)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork

from densepred.layers import NeckOutput

from .pixel_decoder import check_pyramid


class FPN(nn.Module):
    """Feature pyramid over the selected backbone stages.

    in: backbone maps fine to coarse, (B, in_channels[i], H/in_strides[i], W/in_strides[i]), finest at stride 4.
    out: NeckOutput(mask_features = the stride-4 FPN level projected (1x1 conv) to mask_dim,
    multi_scale_features = the other FPN levels coarse to fine, e.g. strides 32, 16, 8, each out_channels wide),
    so a MaskFormer head (coarsest map) or a Mask2Former head (three maps) can sit on it.
    """

    def __init__(
        self, in_channels: Sequence[int], in_strides: Sequence[int], out_channels: int = 256, mask_dim: int = 256
    ) -> None:
        super().__init__()
        check_pyramid(in_channels, in_strides, type(self).__name__)
        if len(in_channels) < 2:
            raise ValueError(
                f"FPN needs at least two backbone stages (stride 4 and a coarser one), got strides {list(in_strides)}"
            )
        self.in_strides = list(in_strides)
        self.out_channels = out_channels
        self.mask_dim = mask_dim
        self.fpn = FeaturePyramidNetwork(list(in_channels), out_channels)
        self.mask_features = nn.Conv2d(out_channels, mask_dim, kernel_size=1)
        nn.init.kaiming_uniform_(self.mask_features.weight, a=1)
        nn.init.zeros_(self.mask_features.bias)

    def forward(self, features: list[torch.Tensor]) -> NeckOutput:
        if len(features) != len(self.in_strides):
            raise ValueError(
                f"FPN was built for {len(self.in_strides)} backbone maps (strides {self.in_strides}), "
                f"got {len(features)}"
            )
        levels = list(self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features))).values())
        return NeckOutput(mask_features=self.mask_features(levels[0]), multi_scale_features=levels[:0:-1])
