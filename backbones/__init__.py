"""Backbones with the Hugging Face backbone API: native ResNet, Swin, ConvNeXt and any timm model."""

from . import convnext, resnet, swin  # noqa: F401  (registers the native architectures)
from .auto import AutoBackbone, list_backbones, register_backbone
from .base import Backbone, BackboneOutput
from .selection import get_aligned_output_features_output_indices, verify_out_features_out_indices
from .timm_backbone import TimmBackbone

__all__ = [
    "AutoBackbone",
    "Backbone",
    "BackboneOutput",
    "TimmBackbone",
    "get_aligned_output_features_output_indices",
    "list_backbones",
    "register_backbone",
    "verify_out_features_out_indices",
]
