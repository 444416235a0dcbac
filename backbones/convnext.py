"""ConvNeXt tiny/small/base/large backbones.

Built on timm's ConvNeXt modules (state-dict layout `stem.*`, `stages.N.*` as in timm); each selected
output gets a channels-first LayerNorm (`out_norms.<stage>`), as HF's ConvNextBackbone does.

Stages: stem (4x4 patchify conv + LayerNorm, stride 4) and stage1..stage4 (strides 4, 8, 16, 32).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from timm.layers import LayerNorm2d
from timm.models.convnext import ConvNeXt as TimmConvNeXt
from torch import nn

from ._registry import register_backbone, register_class
from .base import Backbone, OutputNorms


@register_class
class ConvNeXtBackbone(Backbone):
    family = "convnext"
    convolutional = True
    config_target = "densepred.backbones.ConvNeXtBackbone"

    def __init__(
        self,
        depths: Sequence[int],
        dims: Sequence[int],
        out_features: Sequence[str] | None = None,
        out_indices: Sequence[int] | None = None,
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float | None = 1e-6,
        freeze_at: int = -1,
        in_channels: int = 3,
    ) -> None:
        super().__init__(
            stage_names=["stem", "stage1", "stage2", "stage3", "stage4"],
            stage_channels=[dims[0], *dims],
            stage_strides=[4, 4, 8, 16, 32],
            out_features=out_features,
            out_indices=out_indices,
            in_channels=in_channels,
        )
        self._set_config(
            depths=list(depths),
            dims=list(dims),
            drop_path_rate=drop_path_rate,
            layer_scale_init_value=layer_scale_init_value,
            freeze_at=freeze_at,
            in_channels=in_channels,
        )
        net = TimmConvNeXt(
            in_chans=in_channels,
            num_classes=0,
            depths=tuple(depths),
            dims=tuple(dims),
            drop_path_rate=drop_path_rate,
            ls_init_value=layer_scale_init_value or None,  # None or 0: no layer scale
        )
        self.stem, self.stages = net.stem, net.stages
        self.out_norms = OutputNorms(
            partial(LayerNorm2d, eps=1e-6), {n: self.out_feature_channels[n] for n in self._out_features}
        )
        self.freeze_stages(freeze_at)

    def stage_modules(self) -> list[list[nn.Module]]:
        return [[self.stem], *([stage] for stage in self.stages)]

    def forward_features(self, pixel_values: torch.Tensor, positions: list[int]) -> tuple[torch.Tensor, ...]:
        outputs = []
        x = pixel_values
        for position, (module,) in enumerate(self.stage_modules()[: positions[-1] + 1]):
            x = module(x)
            if position in positions:
                outputs.append(self.out_norms[self.stage_names[position]](x))
        return tuple(outputs)


@register_backbone
def convnext_tiny(**kwargs) -> ConvNeXtBackbone:
    return ConvNeXtBackbone((3, 3, 9, 3), (96, 192, 384, 768), **kwargs)


@register_backbone
def convnext_small(**kwargs) -> ConvNeXtBackbone:
    return ConvNeXtBackbone((3, 3, 27, 3), (96, 192, 384, 768), **kwargs)


@register_backbone
def convnext_base(**kwargs) -> ConvNeXtBackbone:
    return ConvNeXtBackbone((3, 3, 27, 3), (128, 256, 512, 1024), **kwargs)


@register_backbone
def convnext_large(**kwargs) -> ConvNeXtBackbone:
    return ConvNeXtBackbone((3, 3, 27, 3), (192, 384, 768, 1536), **kwargs)
