"""Any timm model with `features_only` support as a backbone (HF TimmBackbone semantics).

`stage_names` are the module names of timm's `feature_info` (e.g. resnet: act1, layer1..layer4;
swin: layers.0..layers.3), `out_indices` are in timm's index space, `channels` / `strides` come from
`feature_info`. Outputs are always NCHW (timm's Swin-family features are NHWC and are permuted).
Models built for a fixed input size (Swin, ViT, ...) are created with `dynamic_img_size=True` and
their input is zero-padded at the bottom/right to a multiple of the patch size, so any H, W works.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from functools import partial

import timm
import torch
import torch.nn.functional as F
from timm.models import get_pretrained_cfg
from torch import nn

from .base import Backbone


def _has_fixed_input_size(model_name: str) -> bool:
    cfg = get_pretrained_cfg(model_name)
    return bool(cfg is not None and cfg.fixed_input_size)


def _create_features_model(model_name: str, pretrained: bool, timm_kwargs: dict) -> nn.Module:
    if not timm.is_model(model_name):
        close = difflib.get_close_matches(model_name, timm.list_models(), n=5)
        raise ValueError(f"unknown timm model {model_name!r}" + (f"; did you mean {close}?" if close else ""))
    create = partial(timm.create_model, model_name, pretrained=pretrained, features_only=True)
    try:
        if _has_fixed_input_size(model_name) and not {"dynamic_img_size", "strict_img_size"} & set(timm_kwargs):
            try:  # accept any input size (Swin, ViT, ...)
                return create(dynamic_img_size=True, **timm_kwargs)
            except TypeError as error:
                if "dynamic_img_size" not in str(error):
                    raise
                # this model has no dynamic size: it only takes its pretrained input size
        return create(**timm_kwargs)
    except (RuntimeError, AssertionError, NotImplementedError) as error:
        raise ValueError(
            f"timm model {model_name!r} cannot be used as a backbone with {timm_kwargs or 'default arguments'}: "
            f"timm.create_model(features_only=True) failed ({type(error).__name__}: {str(error) or 'no message'})"
        ) from error


class TimmBackbone(Backbone):
    """Wrap `timm.create_model(model_name, features_only=True, **timm_kwargs)`."""

    def __init__(
        self,
        model_name: str,
        out_indices: Sequence[int] | None = None,
        pretrained: bool = False,
        out_features: Sequence[str] | None = None,
        **timm_kwargs,
    ) -> None:
        model = _create_features_model(model_name, pretrained, timm_kwargs)
        info = model.feature_info.info
        if len(model.feature_info.out_indices) != len(info):  # extract every level so any can be selected
            model = _create_features_model(
                model_name, pretrained, {**timm_kwargs, "out_indices": tuple(range(len(info)))}
            )
        super().__init__(
            stage_names=[level["module"] for level in info],
            stage_channels=[level["num_chs"] for level in info],
            stage_strides=[level["reduction"] for level in info],
            out_features=out_features,
            out_indices=out_indices,
            in_channels=timm_kwargs.get("in_chans", 3),
        )
        self.model_name = model_name
        self.model = model
        self.channels_last_output = getattr(model, "output_fmt", "NCHW") == "NHWC"
        self.pad_multiple = info[0]["reduction"] if _has_fixed_input_size(model_name) else 1

    def stage_modules(self) -> list[list[nn.Module]]:
        raise NotImplementedError(
            "freeze_at is available for native backbones; for a timm backbone set requires_grad_(False) "
            "on the modules of TimmBackbone.model you want frozen"
        )

    def forward_features(self, pixel_values: torch.Tensor, positions: list[int]) -> tuple[torch.Tensor, ...]:
        height, width = pixel_values.shape[-2:]
        m = self.pad_multiple
        if height % m or width % m:
            pixel_values = F.pad(pixel_values, (0, (-width) % m, 0, (-height) % m))
        levels = self.model(pixel_values)
        maps = tuple(levels[i] for i in positions)
        if self.channels_last_output:
            maps = tuple(m.permute(0, 3, 1, 2) for m in maps)
        return maps
