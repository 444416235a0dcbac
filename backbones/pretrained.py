"""Pretrained backbones: `from_pretrained` (architecture and weights) and `load_pretrained` (weights only).

Sources, told apart by what they hold:

| source | config.json | becomes |
|---|---|---|
| transformers ResNet / Swin / ConvNeXt (Hub id or folder) | `model_type` | the native backbone, architecture from config.json |
| timm Hub repo (`timm/<name>`) or folder | `architecture` | `TimmBackbone`, loaded by timm |
| a folder written by `save_pretrained` | `densepred_backbone` | the saved backbone |
| a timm model name (`convnext_tiny.fb_in22k`) | - | `TimmBackbone(name, pretrained=True)` |
| a weights file (transformers, timm, torchvision, Microsoft Swin, ...) | - | `architecture=` names the model |
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm

from .auto import _REGISTRY, AutoBackbone
from .base import Backbone
from .checkpoint import Checkpoint, LoadReport, load_backbone_state_dict, read_weights, resolve_checkpoint
from .convnext import ConvNeXtBackbone
from .hf_conversion import native_backbone_from_hf_config
from .native_layout import to_native_state_dict
from .resnet import ResNetBackbone
from .swin import SwinBackbone
from .timm_backbone import TimmBackbone

logger = logging.getLogger(__name__)

# The only classes a config.json may name: a checkpoint never chooses arbitrary code to run.
TARGETS: dict[str, type[Backbone]] = {
    "densepred.backbones.ResNetBackbone": ResNetBackbone,
    "densepred.backbones.SwinBackbone": SwinBackbone,
    "densepred.backbones.ConvNeXtBackbone": ConvNeXtBackbone,
    "densepred.backbones.TimmBackbone": TimmBackbone,
}


def _selection(config_kwargs: dict[str, Any], out_indices, out_features) -> dict[str, Any]:
    """Constructor kwargs with the caller's selection replacing the saved one (if the caller gave one)."""
    if out_indices is None and out_features is None:
        return config_kwargs
    kwargs = {k: v for k, v in config_kwargs.items() if k not in ("out_indices", "out_features")}
    return {**kwargs, "out_indices": out_indices, "out_features": out_features}


def _build(target: str, kwargs: dict[str, Any], source: str) -> Backbone:
    if target not in TARGETS:
        raise ValueError(f"{source}: config.json names {target!r}; loadable backbone classes are {sorted(TARGETS)}")
    return TARGETS[target](**kwargs)


def _report(report: LoadReport) -> LoadReport:
    (logger.warning if report.missing else logger.info)(str(report))
    return report


def from_pretrained(
    name_or_path: str,
    out_indices: Sequence[int] | None = None,
    out_features: Sequence[str] | None = None,
    revision: str | None = None,
    architecture: str | None = None,
    **kwargs: Any,
) -> Backbone:
    """Build a backbone with pretrained weights from a Hub repo id, a local folder, a weights file or a timm
    model name (see the module docstring). `kwargs` override the checkpoint's constructor arguments
    (e.g. `drop_path_rate`, `freeze_at`); `architecture` names the model for a bare weights file."""
    if timm.is_model(name_or_path) and architecture is None and not _exists(name_or_path):
        return TimmBackbone(name_or_path, out_indices=out_indices, out_features=out_features, pretrained=True, **kwargs)
    checkpoint = resolve_checkpoint(name_or_path, revision)
    config = checkpoint.config or {}
    if "densepred_backbone" in config:
        saved = dict(config["densepred_backbone"])
        target = saved.pop("_target_", None)
        backbone = _build(target, _selection({**saved, **kwargs}, out_indices, out_features), name_or_path)
        _load(backbone, checkpoint, name_or_path, layout="native")
        return backbone
    if "architecture" in config:  # timm's config.json: timm reads its own source
        prefix = "local-dir:" if _exists(name_or_path) else "hf-hub:"
        model_name = prefix + name_or_path + (f"@{revision}" if revision and prefix == "hf-hub:" else "")
        return TimmBackbone(model_name, out_indices=out_indices, out_features=out_features, pretrained=True, **kwargs)
    if "model_type" in config:
        target, hf_kwargs = native_backbone_from_hf_config(config)
        backbone = _build(target, _selection({**hf_kwargs, **kwargs}, out_indices, out_features), name_or_path)
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
            f"one of {sorted(_REGISTRY)} or any timm model name"
        )
    if architecture in _REGISTRY:
        backbone = AutoBackbone.from_config(architecture, out_indices=out_indices, out_features=out_features, **kwargs)
        _load(backbone, checkpoint, name_or_path)
        return backbone
    if len(checkpoint.weight_files) != 1:
        raise ValueError(f"{name_or_path}: a timm model loads one weights file, found {len(checkpoint.weight_files)}")
    return TimmBackbone(
        architecture, out_indices=out_indices, out_features=out_features,
        pretrained=str(checkpoint.weight_files[0]), **kwargs,
    )


def load_pretrained(backbone: Backbone, name_or_path: str, revision: str | None = None) -> LoadReport:
    """Load the weights of any supported source into an already built native `backbone` (same architecture)."""
    if isinstance(backbone, TimmBackbone):
        raise ValueError("a TimmBackbone loads weights when built: TimmBackbone(model_name, pretrained=<source>)")
    checkpoint = resolve_checkpoint(name_or_path, revision)
    config = checkpoint.config or {}
    if "model_type" in config:
        target, _ = native_backbone_from_hf_config(config)
        if TARGETS.get(target) is not type(backbone):
            raise ValueError(
                f"{name_or_path} is a transformers {config['model_type']!r} checkpoint ({target}), "
                f"not a {type(backbone).__name__}"
            )
        return _load(backbone, checkpoint, name_or_path, hf_model_type=config["model_type"])
    saved_target = config.get("densepred_backbone", {}).get("_target_")
    if saved_target is not None and TARGETS.get(saved_target) is not type(backbone):
        raise ValueError(f"{name_or_path} was saved from {saved_target}, not a {type(backbone).__name__}")
    return _load(backbone, checkpoint, name_or_path, layout="native" if saved_target else None)


def _load(
    backbone: Backbone, checkpoint: Checkpoint, source: str, hf_model_type: str | None = None, layout: str | None = None
) -> LoadReport:
    state_dict = read_weights(checkpoint)
    skipped: list[str] = []
    if layout != "native":
        state_dict, skipped = to_native_state_dict(state_dict, backbone, source, hf_model_type)
    report = _report(load_backbone_state_dict(backbone, state_dict, source, skipped))
    backbone.load_report = report
    return report


def _exists(name: str) -> bool:
    return Path(name).expanduser().exists()
