"""Backbones with the Hugging Face backbone API: native ResNet, Swin, ConvNeXt, plain ViTs and any timm model."""

from . import convnext, resnet, swin, timm_backbone, vit  # noqa: F401  (each family registers itself in _registry)
from ._registry import list_backbones, register_backbone
from .auto import AutoBackbone
from .base import Backbone, BackboneOutput
from .checkpoint import LoadReport, load_backbone_state_dict
from .convnext import ConvNeXtBackbone
from .resnet import ResNetBackbone
from .selection import get_aligned_output_features_output_indices, verify_out_features_out_indices
from .swin import SwinBackbone
from .timm_backbone import TimmBackbone
from .vit import ViTBackbone

__all__ = [
    "AutoBackbone",
    "Backbone",
    "BackboneOutput",
    "ConvNeXtBackbone",
    "LoadReport",
    "ResNetBackbone",
    "SwinBackbone",
    "TimmBackbone",
    "ViTBackbone",
    "get_aligned_output_features_output_indices",
    "list_backbones",
    "load_backbone_state_dict",
    "register_backbone",
    "verify_out_features_out_indices",
]
