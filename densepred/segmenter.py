"""Segmenter: backbone -> neck -> head, each part built from the description of the part before it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from densepred.backbones.base import Backbone


class Segmenter(nn.Module):
    """A MaskFormer-style model.

    `neck` and `head` are factories (Hydra `_partial_` objects or classes): the neck is called with the
    backbone's `channels` and `strides`, the head with the neck's `out_channels`, `mask_dim` and the
    number of classes, so no channel count is written by hand in a config.
    """

    def __init__(
        self,
        backbone: Backbone,
        neck: Callable[..., nn.Module],
        head: Callable[..., nn.Module],
        num_classes: int,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone = backbone
        self.neck = neck(in_channels=list(backbone.channels), in_strides=list(backbone.strides))
        self.head = head(in_channels=self.neck.out_channels, mask_dim=self.neck.mask_dim, num_classes=num_classes)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Segmenter:
        """Build from a dict with `backbone`, `neck`, `head` (Hydra `_target_` dicts) and `num_classes`."""
        from hydra.utils import instantiate

        backbone = instantiate(dict(config["backbone"]))
        neck = instantiate(dict(config["neck"]), _partial_=True)
        head = instantiate(dict(config["head"]), _partial_=True)
        return cls(backbone, neck, head, num_classes=int(config["num_classes"]))

    def forward(self, images: torch.Tensor) -> dict[str, Any]:
        """images (B, 3, H, W), normalised -> head output (`pred_logits`, `pred_masks`, `aux_outputs`)."""
        features = list(self.backbone(images).feature_maps)
        return self.head(self.neck(features))
