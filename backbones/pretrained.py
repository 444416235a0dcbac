"""Pretrained backbones: `from_pretrained` (architecture and weights) and `load_pretrained` (weights only).

Sources, told apart by what they hold:

| source | config.json | becomes |
|---|---|---|
| transformers ResNet / Swin / ConvNeXt (Hub id or folder) | `model_type` | the native backbone config.json describes |
| timm Hub repo (`timm/<name>`) or folder | `architecture` | `TimmBackbone`, loaded by timm |
| a folder written by `save_pretrained` | `densepred_backbone` | the saved backbone |
| a timm model name (`convnext_tiny.fb_in22k`) | - | `TimmBackbone(name, pretrained=True)` |
| a weights file (transformers, timm, torchvision, Microsoft Swin, ...) | - | `architecture=` names the model |

Classes come from `_registry` (this module imports no model module, nor `base`, which imports it for
`Backbone.load_pretrained`); backbones are typed `nn.Module` here for that reason.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import timm
from torch import nn

from ._registry import backbone_class, create_backbone, family_class, list_backbones
from .checkpoint import Checkpoint, LoadReport, load_backbone_state_dict, read_weights, resolve_checkpoint
from .hf_conversion import native_backbone_from_hf_config
from .native_layout import to_native_state_dict

logger = logging.getLogger(__name__)


def _selection(config_kwargs: dict[str, Any], out_indices, out_features) -> dict[str, Any]:
    """Constructor kwargs with the caller's selection replacing the saved one (if the caller gave one)."""
    if out_indices is None and out_features is None:
        return config_kwargs
    kwargs = {k: v for k, v in config_kwargs.items() if k not in ("out_indices", "out_features")}
    return {**kwargs, "out_indices": out_indices, "out_features": out_features}


def from_pretrained(
    name_or_path: str,
    out_indices: Sequence[int] | None = None,
    out_features: Sequence[str] | None = None,
    revision: str | None = None,
    architecture: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a `Backbone` with pretrained weights from a Hub repo id, a local folder, a weights file or a timm
    model name (see the module docstring). `kwargs` override the checkpoint's constructor arguments
    (e.g. `drop_path_rate`, `freeze_at`); `architecture` names the model for a bare weights file."""
    timm_backbone = partial(family_class("timm"), out_indices=out_indices, out_features=out_features)
    local = Path(name_or_path).expanduser().exists()
    if timm.is_model(name_or_path) and architecture is None and not local:
        return timm_backbone(name_or_path, pretrained=True, **kwargs)
    checkpoint = resolve_checkpoint(name_or_path, revision)
    config = checkpoint.config or {}
    if "densepred_backbone" in config:
        saved = dict(config["densepred_backbone"])
        cls = backbone_class(saved.pop("_target_", None), name_or_path)
        backbone = cls(**_selection({**saved, **kwargs}, out_indices, out_features))
        _load(backbone, checkpoint, name_or_path, layout="native")
        return backbone
    if "architecture" in config:  # timm's config.json: timm reads its own source
        prefix = "local-dir:" if local else "hf-hub:"
        model_name = prefix + name_or_path + (f"@{revision}" if revision and prefix == "hf-hub:" else "")
        return timm_backbone(model_name, pretrained=True, **kwargs)
    if "model_type" in config:
        target, hf_kwargs = native_backbone_from_hf_config(config)
        cls = backbone_class(target, name_or_path)
        backbone = cls(**_selection({**hf_kwargs, **kwargs}, out_indices, out_features))
        _load(backbone, checkpoint, name_or_path, hf_model_type=config["model_type"])
        return backbone
    if config:
        raise ValueError(
            f"{name_or_path}: config.json is neither a transformers config (model_type), a timm config "
            "(architecture) nor one written by save_pretrained (densepred_backbone)"
        )
    if architecture is None:
        raise ValueError(
            f"{name_or_path} has no config.json, so its architecture is unknown: pass architecture=<name>, "
            f"one of {list_backbones()} or any timm model name"
        )
    if architecture in list_backbones():
        backbone = create_backbone(architecture, out_indices=out_indices, out_features=out_features, **kwargs)
        _load(backbone, checkpoint, name_or_path)
        return backbone
    if len(checkpoint.weight_files) != 1:
        raise ValueError(f"{name_or_path}: a timm model loads one weights file, found {len(checkpoint.weight_files)}")
    return timm_backbone(architecture, pretrained=str(checkpoint.weight_files[0]), **kwargs)


def load_pretrained(backbone: nn.Module, name_or_path: str, revision: str | None = None) -> LoadReport:
    """Load the weights of any supported source into an already built native `Backbone` (same architecture)."""
    if backbone.family == "timm":
        raise ValueError("a TimmBackbone loads weights when built: TimmBackbone(model_name, pretrained=<source>)")
    checkpoint = resolve_checkpoint(name_or_path, revision)
    config = checkpoint.config or {}
    if "model_type" in config:
        target, _ = native_backbone_from_hf_config(config)
        if target != type(backbone).config_target:
            raise ValueError(
                f"{name_or_path} is a transformers {config['model_type']!r} checkpoint ({target}), "
                f"not a {type(backbone).__name__}"
            )
        return _load(backbone, checkpoint, name_or_path, hf_model_type=config["model_type"])
    saved_target = config.get("densepred_backbone", {}).get("_target_")
    if saved_target is not None and saved_target != type(backbone).config_target:
        raise ValueError(f"{name_or_path} was saved from {saved_target}, not a {type(backbone).__name__}")
    return _load(backbone, checkpoint, name_or_path, layout="native" if saved_target else None)


def _load(
    backbone: nn.Module,
    checkpoint: Checkpoint,
    source: str,
    hf_model_type: str | None = None,
    layout: str | None = None,
) -> LoadReport:
    state_dict = read_weights(checkpoint)
    skipped: list[str] = []
    if layout != "native":
        state_dict, skipped = to_native_state_dict(state_dict, backbone, source, hf_model_type)
    state_dict = backbone.adapt_pretrained(dict(state_dict))
    report = load_backbone_state_dict(backbone, state_dict, source, skipped)
    (logger.warning if report.missing else logger.info)(str(report))
    backbone.load_report = report
    return report
