"""ViTDet's simple feature pyramid: single-stride ViT maps -> levels at strides 4, 8, 16, 32 (configurable).

Li et al., "Exploring Plain Vision Transformer Backbones for Object Detection" (ECCV 2022), as in Detectron2's
`SimpleFeaturePyramid`: a level 2^k times finer than the ViT's patch stride is reached with k stride-2
transposed convolutions (LayerNorm + GELU between them, each halving the channels), a coarser one with
stride-2 max-pools; every level then gets a 1x1 and a 3x3 convolution (each followed by a channels-first
LayerNorm) to `channels`.

Two modes: `simple` (ViTDet) builds every level from one map, the last selected block's; `per_block`
takes one selected block per level (BEiT / ViT-Adapter-less Mask2Former style), in order, the shallowest
for the finest level. Each level is then brought to the geometry of the other backbones, ceil(H / s) x
ceil(W / s) for an H x W input: cropped when its stride is exactly `s` (patch 16), else bilinearly
resampled to that size (patch 14: the rounded power of two gives strides 3.5, 7, 14, 28).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn

MODES = ("simple", "per_block")


def _scale(in_stride: int, stride: int) -> int:
    """k such that in_stride / 2**k is the nearest power-of-two resampling of `in_stride` to `stride`."""
    return round(math.log2(in_stride / stride))


def _resample(in_channels: int, k: int) -> tuple[nn.Module, int]:
    """(module, out channels): k > 0 transposed convs (x 2**k), k < 0 max-pools (/ 2**-k), k = 0 identity."""
    if k <= 0:
        pools = [nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True) for _ in range(-k)]
        return (nn.Sequential(*pools) if pools else nn.Identity()), in_channels
    layers: list[nn.Module] = []
    channels = in_channels
    for i in range(k):
        if i:
            layers += [LayerNorm2d(channels), nn.GELU()]
        layers.append(nn.ConvTranspose2d(channels, channels // 2, kernel_size=2, stride=2))
        channels //= 2
    return nn.Sequential(*layers), channels


class SimpleFeaturePyramid(nn.Module):
    """Maps at `in_stride` with `in_channels` -> one map per entry of `strides`, each with `channels`."""

    def __init__(
        self,
        in_channels: int,
        in_stride: int,
        strides: Sequence[int] = (4, 8, 16, 32),
        channels: int = 256,
        mode: str = "simple",
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"pyramid mode={mode!r} is not supported; choose one of {MODES}")
        if list(strides) != sorted(set(strides)) or not strides:
            raise ValueError(f"pyramid strides must be increasing, got {list(strides)}")
        self.mode = mode
        self.in_stride = in_stride
        self.strides = [int(s) for s in strides]
        self.channels = [int(channels)] * len(self.strides)
        self.scales = [_scale(in_stride, s) for s in self.strides]
        self.resample = nn.ModuleList()
        self.output = nn.ModuleList()
        for k in self.scales:
            module, width = _resample(in_channels, k)
            self.resample.append(module)
            self.output.append(
                nn.Sequential(
                    nn.Conv2d(width, channels, kernel_size=1, bias=False),
                    LayerNorm2d(channels),
                    nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False),
                    LayerNorm2d(channels),
                )
            )

    def inputs_needed(self) -> int:
        """How many maps `forward` takes: 1 (simple) or one per level (per_block)."""
        return 1 if self.mode == "simple" else len(self.strides)

    def forward(self, maps: Sequence[torch.Tensor], image_size: tuple[int, int]) -> list[torch.Tensor]:
        """`maps`: (B, C, h, w) at `in_stride` (simple: the last one is used); `image_size`: the input's (H, W).
        Returns one (B, channels, ceil(H / s), ceil(W / s)) map per stride s."""
        sources = [maps[-1]] * len(self.strides) if self.mode == "simple" else list(maps)
        height, width = image_size
        levels = []
        for x, stride, k, resample, output in zip(
            sources, self.strides, self.scales, self.resample, self.output, strict=True
        ):
            x = resample(x)
            size = (-(-height // stride), -(-width // stride))
            if self.in_stride == stride * 2**k:  # the exact stride: only the padding's cells go
                x = x[..., : size[0], : size[1]]
            else:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            levels.append(output(x))
        return levels
