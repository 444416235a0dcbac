"""ResNet 18/34/50/101 backbones (torchvision / HF "v1.5": the stride sits in the 3x3 conv).

Built on timm's ResNet modules; the state-dict layout is timm's and torchvision's
(`conv1`, `bn1`, `layer1.0.conv1`, ...) without the classifier.

Stages: stem (conv7x7 + BN + ReLU + maxpool, stride 4) and stage1..stage4 (strides 4, 8, 16, 32).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.layers import freeze_batch_norm_2d
from timm.models.resnet import BasicBlock, Bottleneck
from timm.models.resnet import ResNet as TimmResNet
from torch import nn

from .auto import register_backbone
from .base import Backbone

NORMS = ("frozen_bn", "bn", "syncbn")


class ResNetBackbone(Backbone):
    def __init__(
        self,
        block: type[nn.Module],
        layers: Sequence[int],
        out_features: Sequence[str] | None = None,
        out_indices: Sequence[int] | None = None,
        norm: str = "frozen_bn",
        drop_path_rate: float = 0.0,
        freeze_at: int = -1,
        in_channels: int = 3,
    ) -> None:
        """`norm`: "frozen_bn" (the fine-tuning default), "bn" or "syncbn"."""
        if norm not in NORMS:
            raise ValueError(f"norm={norm!r} is not supported; choose one of {NORMS}")
        expansion = block.expansion
        channels = [64] + [width * expansion for width in (64, 128, 256, 512)]
        super().__init__(
            stage_names=["stem", "stage1", "stage2", "stage3", "stage4"],
            stage_channels=channels,
            stage_strides=[4, 4, 8, 16, 32],
            out_features=out_features,
            out_indices=out_indices,
            in_channels=in_channels,
        )
        net = TimmResNet(
            block=block,
            layers=tuple(layers),
            in_chans=in_channels,
            num_classes=0,
            global_pool="",
            drop_path_rate=drop_path_rate,
        )
        if norm == "frozen_bn":
            net = freeze_batch_norm_2d(net)
        elif norm == "syncbn":
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        # Keep timm's / torchvision's module names so their state dicts load as they are.
        self.conv1, self.bn1, self.act1, self.maxpool = net.conv1, net.bn1, net.act1, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.freeze_stages(freeze_at)

    def stage_modules(self) -> list[list[nn.Module]]:
        return [[self.conv1, self.bn1, self.act1, self.maxpool], [self.layer1], [self.layer2], [self.layer3], [self.layer4]]

    def forward_features(self, pixel_values: torch.Tensor, positions: list[int]) -> tuple[torch.Tensor, ...]:
        outputs = []
        x = pixel_values
        for position, modules in enumerate(self.stage_modules()[: positions[-1] + 1]):
            for module in modules:
                x = module(x)
            if position in positions:
                outputs.append(x)
        return tuple(outputs)


@register_backbone
def resnet18(**kwargs) -> ResNetBackbone:
    return ResNetBackbone(BasicBlock, (2, 2, 2, 2), **kwargs)


@register_backbone
def resnet34(**kwargs) -> ResNetBackbone:
    return ResNetBackbone(BasicBlock, (3, 4, 6, 3), **kwargs)


@register_backbone
def resnet50(**kwargs) -> ResNetBackbone:
    return ResNetBackbone(Bottleneck, (3, 4, 6, 3), **kwargs)


@register_backbone
def resnet101(**kwargs) -> ResNetBackbone:
    return ResNetBackbone(Bottleneck, (3, 4, 23, 3), **kwargs)
