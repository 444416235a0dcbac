"""ResNet 18/34/50/101 backbones (torchvision / HF "v1.5": the stride sits in the 3x3 conv), and their "-vd" variant.

Built from timm's ResNet blocks (`timm.models.resnet.make_blocks`); the state-dict layout is timm's and
torchvision's (`conv1`, `bn1`, `layer1.0.conv1`, ...) without the classifier. Stage widths and the
stem width are arguments, so transformers ResNet configs of any size (`hidden_sizes`,
`embedding_size`) are rebuilt exactly.

Stages: stem (conv7x7 + BN + ReLU + maxpool, stride 4) and stage1..stage4 (strides 4, 8, 16, 32).

`variant="d"` (ResNet-D of "Bag of Tricks", RT-DETR's ResNet-vd, transformers' `RTDetrResNetBackbone`):
a deep stem of three 3x3 convs (widths stem_channels / 2, stem_channels / 2, stem_channels; timm's
`stem_type="deep"` layout `conv1.{0,3,6}`), shortcuts that downsample by 2x2 average pooling before their
1x1 conv (timm's `avg_down`), and, as RT-DETR's PResNet, a projection shortcut on the first block of
stage1 also for basic blocks (ResNet-18/34-vd). For bottleneck blocks this is timm's `resnet50d` layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchvision
from timm.layers import freeze_batch_norm_2d
from timm.models.resnet import BasicBlock, Bottleneck, make_blocks
from torch import nn

from densepred.utils.recompute import scaled_conv2d

from ._registry import register_backbone, register_class
from .base import Backbone

NORMS = ("frozen_bn", "bn", "syncbn")
VARIANTS = ("b", "d")


class FrozenBatchNorm2d(torchvision.ops.FrozenBatchNorm2d):
    """torchvision's FrozenBatchNorm2d computed in its input's dtype, as Detectron2's (Mask2Former's reference).

    Under autocast a bfloat16 convolution output stays bfloat16 instead of being promoted by the float32 statistics,
    and so do the ReLU and the residual sum after it: the next convolution reads it without a cast copy, and the
    backbone saves half the bytes. A float32 input gives torchvision's values exactly.
    """

    def scale_and_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(C,) float32 scale and shift: the layer computes x * scale + shift per channel."""
        # Copied from torchvision.ops.misc.FrozenBatchNorm2d.forward, per channel
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self.scale_and_shift()
        return x * scale.to(x.dtype).view(1, -1, 1, 1) + shift.to(x.dtype).view(1, -1, 1, 1)


class FoldedFrozenBatchNorm2d(FrozenBatchNorm2d):
    """A frozen BatchNorm that the convolution before it applies (`FrozenBNConv2d`): it passes its input on.

    Its buffers stay here, where checkpoints have them; only the computation moved into the convolution.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class FrozenBNConv2d(nn.Conv2d):
    """A Conv2d and the frozen BatchNorm after it as one convolution: conv(x, W * scale) + shift.

    The same function as the two layers (per output channel, conv(x, W) * scale + shift), up to float rounding,
    without the two elementwise passes over the convolution's output in forward and the one in backward. The
    weight gradient flows through `W * scale` to W, which `scaled_conv2d` recomputes in backward rather than
    keep a second copy of the weights. `frozen_bn` is not a submodule (it stays where it was).
    """

    frozen_bn: FrozenBatchNorm2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self.frozen_bn.scale_and_shift()
        bias = shift if self.bias is None else self.bias * scale + shift
        return scaled_conv2d(x, self.weight, scale, bias, self.stride, self.padding, self.dilation, self.groups)


def freeze_batch_norms(module: nn.Module) -> None:
    """timm's `freeze_batch_norm_2d` (every BatchNorm2d / SyncBatchNorm below `module` becomes torchvision's
    FrozenBatchNorm2d, its statistics and affine parameters as buffers), with this subclass's forward."""
    freeze_batch_norm_2d(module)
    for frozen in module.modules():
        if type(frozen) is torchvision.ops.FrozenBatchNorm2d:
            frozen.__class__ = FrozenBatchNorm2d  # a subclass with no state of its own: only forward differs


def fold_frozen_batch_norms(module: nn.Module) -> None:
    """Let every Conv2d directly followed by a FrozenBatchNorm2d apply it (`FrozenBNConv2d`,
    `FoldedFrozenBatchNorm2d`); the state dict is unchanged.

    The pairs are those of the ResNet layout: `convN` and `bnN` of one module (timm's blocks and the stem; for the
    deep stem, the last conv of the `conv1` Sequential and `bn1`), and a conv followed by a BN in a Sequential
    (the shortcuts, the deep stem), zero-padded by ints. A frozen BN in no such pair keeps its own forward.
    """
    for parent in module.modules():
        children = dict(parent.named_children())
        pairs = [
            (child, children[f"bn{name[4:]}"])
            for name, child in children.items()
            if name.startswith("conv") and f"bn{name[4:]}" in children
        ]
        if isinstance(parent, nn.Sequential):
            pairs += zip(parent[:-1], parent[1:], strict=True)
        for conv, norm in pairs:
            if isinstance(conv, nn.Sequential) and len(conv):
                conv = conv[-1]
            foldable = type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            if foldable and type(norm) is FrozenBatchNorm2d:
                conv.__class__, norm.__class__ = FrozenBNConv2d, FoldedFrozenBatchNorm2d  # no state of their own
                object.__setattr__(conv, "frozen_bn", norm)  # a plain attribute, not a second registration


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


@register_class
class ResNetBackbone(Backbone):
    family = "resnet"
    convolutional = True
    config_target = "densepred.backbones.ResNetBackbone"

    def __init__(
        self,
        block: str | type[nn.Module],
        layers: Sequence[int],
        out_features: Sequence[str] | None = None,
        out_indices: Sequence[int] | None = None,
        norm: str = "frozen_bn",
        drop_path_rate: float = 0.0,
        freeze_at: int = -1,
        in_channels: int = 3,
        stage_channels: Sequence[int] | None = None,
        stem_channels: int = 64,
        variant: str = "b",
    ) -> None:
        """`block`: "basic" or "bottleneck" (or timm's block class); `norm`: "frozen_bn" (the fine-tuning
        default), "bn" or "syncbn"; `stage_channels`: output channels of stage1..4 (default 64, 128, 256,
        512 times the block expansion); `stem_channels`: width of the 7x7 stem conv (of the deep stem's last
        conv for variant "d"); `variant`: "b" (torchvision) or "d" (deep stem, average-pool shortcuts)."""
        if norm not in NORMS:
            raise ValueError(f"norm={norm!r} is not supported; choose one of {NORMS}")
        if variant not in VARIANTS:
            raise ValueError(f"variant={variant!r} is not supported; choose one of {VARIANTS}")
        block_name = block if isinstance(block, str) else {v: k for k, v in BLOCKS.items()}.get(block)
        if block_name not in BLOCKS:
            raise ValueError(f"block={block!r} is not supported; choose one of {list(BLOCKS)}")
        block = BLOCKS[block_name]
        if stage_channels is None:
            stage_channels = [width * block.expansion for width in (64, 128, 256, 512)]
        if len(stage_channels) != 4 or len(layers) != 4 or any(c % block.expansion for c in stage_channels):
            raise ValueError(
                f"ResNetBackbone takes 4 stages: layers={list(layers)}, stage_channels={list(stage_channels)} "
                f"(each a multiple of {block.expansion} for {block_name} blocks)"
            )
        super().__init__(
            stage_names=["stem", "stage1", "stage2", "stage3", "stage4"],
            stage_channels=[stem_channels, *stage_channels],
            stage_strides=[4, 4, 8, 16, 32],
            out_features=out_features,
            out_indices=out_indices,
            in_channels=in_channels,
        )
        self._set_config(
            block=block_name,
            layers=list(layers),
            norm=norm,
            drop_path_rate=drop_path_rate,
            freeze_at=freeze_at,
            in_channels=in_channels,
            stage_channels=list(stage_channels),
            stem_channels=stem_channels,
            variant=variant,
        )
        if variant == "d":
            self.conv1 = _deep_stem(in_channels, stem_channels)
        else:
            self.conv1 = nn.Conv2d(in_channels, stem_channels, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_channels)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        stages, _ = make_blocks(
            (block,) * 4,
            tuple(c // block.expansion for c in stage_channels),
            tuple(layers),
            inplanes=stem_channels,
            drop_path_rate=drop_path_rate,
            avg_down=variant == "d",
            act_layer=nn.ReLU,
            norm_layer=nn.BatchNorm2d,
        )
        for name, stage in stages:  # layer1..layer4: timm's / torchvision's names
            self.add_module(name, stage)
        if variant == "d" and self.layer1[0].downsample is None:  # basic blocks: PResNet's stage1 projection
            channels = stage_channels[0]
            self.layer1[0].downsample = nn.Sequential(
                nn.Identity(), nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels)
            )
        self._init_weights()
        if norm == "frozen_bn":
            freeze_batch_norms(self)
            fold_frozen_batch_norms(self)
        elif norm == "syncbn":
            nn.SyncBatchNorm.convert_sync_batchnorm(self)
        self.freeze_stages(freeze_at)

    def _init_weights(self) -> None:
        """timm's ResNet initialisation: Kaiming-normal convs, zero last BN of each residual branch."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if hasattr(module, "zero_init_last"):
                module.zero_init_last()

    def stage_modules(self) -> list[list[nn.Module]]:
        return [
            [self.conv1, self.bn1, self.act1, self.maxpool],
            [self.layer1],
            [self.layer2],
            [self.layer3],
            [self.layer4],
        ]

    def forward_features(self, pixel_values: torch.Tensor, positions: list[int]) -> tuple[torch.Tensor, ...]:
        outputs = []
        x = pixel_values
        for position, modules in enumerate(self.stage_modules()[: positions[-1] + 1]):
            for module in modules:
                x = module(x)
            if position in positions:
                outputs.append(x)
        return tuple(outputs)


def _deep_stem(in_channels: int, stem_channels: int) -> nn.Sequential:
    """The "-vd" stem before `bn1`: 3x3 convs (stride 2, 1, 1) to stem_channels / 2, stem_channels / 2 and
    stem_channels, the first two with BN + ReLU (timm's `stem_type="deep"` layout)."""
    width = stem_channels // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.Conv2d(width, width, 3, stride=1, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.Conv2d(width, stem_channels, 3, stride=1, padding=1, bias=False),
    )


@register_backbone
def resnet18(**kwargs) -> ResNetBackbone:
    return ResNetBackbone("basic", (2, 2, 2, 2), **kwargs)


@register_backbone
def resnet34(**kwargs) -> ResNetBackbone:
    return ResNetBackbone("basic", (3, 4, 6, 3), **kwargs)


@register_backbone
def resnet50(**kwargs) -> ResNetBackbone:
    return ResNetBackbone("bottleneck", (3, 4, 6, 3), **kwargs)


@register_backbone
def resnet101(**kwargs) -> ResNetBackbone:
    return ResNetBackbone("bottleneck", (3, 4, 23, 3), **kwargs)


@register_backbone
def resnet18_vd(**kwargs) -> ResNetBackbone:
    return ResNetBackbone("basic", (2, 2, 2, 2), variant="d", **kwargs)


@register_backbone
def resnet34_vd(**kwargs) -> ResNetBackbone:
    return ResNetBackbone("basic", (3, 4, 6, 3), variant="d", **kwargs)


@register_backbone
def resnet50_vd(**kwargs) -> ResNetBackbone:
    return ResNetBackbone("bottleneck", (3, 4, 6, 3), variant="d", **kwargs)


@register_backbone
def resnet101_vd(**kwargs) -> ResNetBackbone:
    return ResNetBackbone("bottleneck", (3, 4, 23, 3), variant="d", **kwargs)
