"""Any timm model with `features_only` support as a backbone (HF TimmBackbone semantics).

`stage_names` are the module names of timm's `feature_info` (e.g. resnet: act1, layer1..layer4;
swin: layers.0..layers.3), `out_indices` are in timm's index space, `channels` / `strides` come from
`feature_info`. Outputs are always NCHW (timm's Swin-family features are NHWC and are permuted).
Models built for a fixed input size (Swin, ViT, ...) are created with `dynamic_img_size=True` and
their input is zero-padded at the bottom/right to a multiple of the patch size, so any H, W works.

Pretrained weights load through timm's own machinery (its checkpoint filters, classifier removal,
input-channel adaptation): `pretrained=True` takes the model's default weights, a string names a
weights file or a Hub repo holding timm weights, and `model_name` may be a timm source such as
`hf-hub:timm/convnext_tiny.fb_in22k` or `local-dir:/path/to/folder` (config.json + weights).
"""

from __future__ import annotations

import difflib
import pickle
from collections.abc import Sequence
from functools import partial
from typing import Any

import timm
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from timm.models import get_pretrained_cfg, load_model_config_from_hf, parse_model_name
from timm.models._hub import load_model_config_from_path
from torch import nn

from ._registry import register_class
from .base import Backbone
from .checkpoint import timm_pretrained_overlay

# What a failed weights download / read / load raises inside timm.
WEIGHT_ERRORS = (ValueError, OSError, RuntimeError, AssertionError, KeyError, pickle.UnpicklingError, SafetensorError)


def _resolve(model_name: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(architecture, pretrained config, saved model arguments) of a timm name or `hf-hub:` / `local-dir:` source."""
    source, model_id = parse_model_name(model_name)
    if source == "hf-hub":
        cfg, architecture, model_args = load_model_config_from_hf(model_id)
        return architecture, cfg, dict(model_args or {})
    if source == "local-dir":
        cfg, architecture, model_args = load_model_config_from_path(model_id)
        return architecture, cfg, dict(model_args or {})
    if not timm.is_model(model_name):
        close = difflib.get_close_matches(model_name, timm.list_models(), n=5)
        raise ValueError(f"unknown timm model {model_name!r}" + (f"; did you mean {close}?" if close else ""))
    cfg = get_pretrained_cfg(model_name)
    return model_name.split(".")[0], (cfg.to_dict() if cfg is not None else {}), {}


def _create_features_model(model_name: str, fixed_size: bool, pretrained: bool, timm_kwargs: dict) -> nn.Module:
    create = partial(timm.create_model, model_name, pretrained=pretrained, features_only=True)
    try:
        if fixed_size and not {"dynamic_img_size", "strict_img_size"} & set(timm_kwargs):
            try:  # accept any input size (Swin, ViT, ...)
                return create(dynamic_img_size=True, **timm_kwargs)
            except TypeError as error:
                if "dynamic_img_size" not in str(error):
                    raise
                # this model has no dynamic size: it only takes its pretrained input size
        return create(**timm_kwargs)
    except (RuntimeError, AssertionError, NotImplementedError) as error:
        if pretrained:  # TimmBackbone reports it as a weights problem
            raise
        raise ValueError(
            f"timm model {model_name!r} cannot be used as a backbone with {timm_kwargs or 'default arguments'}: "
            f"timm.create_model(features_only=True) failed ({type(error).__name__}: {str(error) or 'no message'})"
        ) from error


@register_class
class TimmBackbone(Backbone):
    """Wrap `timm.create_model(model_name, features_only=True, pretrained=..., **timm_kwargs)`."""

    family = "timm"
    config_target = "densepred.backbones.TimmBackbone"

    @property
    def convolutional(self) -> bool:  # type: ignore[override]
        """True unless the timm model has attention blocks (a CNN such as a ResNet, ConvNeXt, EfficientNet)."""
        return not any("Attention" in type(module).__name__ for module in self.modules())

    def __init__(
        self,
        model_name: str,
        out_indices: Sequence[int] | None = None,
        pretrained: bool | str | None = False,
        out_features: Sequence[str] | None = None,
        **timm_kwargs,
    ) -> None:
        """`pretrained`: False / None (random weights), True (timm's default weights for `model_name`), or a
        weights file / Hub repo id (`timm/<name>`, optionally `@revision`) whose timm weights are loaded."""
        try:
            architecture, pretrained_cfg, model_args = _resolve(model_name)
        except (OSError, RuntimeError) as error:  # a Hub or folder source that cannot be read
            raise ValueError(f"cannot read the timm model config of {model_name!r}: {error}") from error
        build_kwargs = dict(timm_kwargs)
        if isinstance(pretrained, str):
            overlay = {**build_kwargs.pop("pretrained_cfg_overlay", {}), **timm_pretrained_overlay(pretrained)}
            build_kwargs["pretrained_cfg_overlay"] = overlay
        fixed_size = bool(pretrained_cfg.get("fixed_input_size"))
        build = partial(_create_features_model, model_name, fixed_size, bool(pretrained))
        try:
            model = build(build_kwargs)
            info = model.feature_info.info
            if len(model.feature_info.out_indices) != len(info):  # extract every level so any can be selected
                model = build({**build_kwargs, "out_indices": tuple(range(len(info)))})
        except WEIGHT_ERRORS as error:
            if not pretrained:
                raise
            weights = pretrained if isinstance(pretrained, str) else "timm's default weights"
            raise ValueError(
                f"loading pretrained weights ({weights}) into timm model {model_name!r} failed: "
                f"{type(error).__name__}: {error}"
            ) from error
        super().__init__(
            stage_names=[level["module"] for level in info],
            stage_channels=[level["num_chs"] for level in info],
            stage_strides=[level["reduction"] for level in info],
            out_features=out_features,
            out_indices=out_indices,
            in_channels=timm_kwargs.get("in_chans", 3),
        )
        saved = {k: v for k, v in timm_kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay")}
        self._set_config(model_name=architecture, **{**model_args, **saved})
        self.model_name = model_name
        self.model = model
        self.pretrained_cfg = dict(getattr(model, "pretrained_cfg", None) or pretrained_cfg)
        self.channels_last_output = getattr(model, "output_fmt", "NCHW") == "NHWC"
        self.pad_multiple = info[0]["reduction"] if fixed_size else 1

    @property
    def pixel_mean(self) -> tuple[float, ...]:
        """The timm `pretrained_cfg` mean (0-1 units), ImageNet's where the config has none."""
        return tuple(float(v) for v in self.pretrained_cfg.get("mean") or super().pixel_mean)

    @property
    def pixel_std(self) -> tuple[float, ...]:
        """The timm `pretrained_cfg` std (0-1 units), ImageNet's where the config has none."""
        return tuple(float(v) for v in self.pretrained_cfg.get("std") or super().pixel_std)

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
