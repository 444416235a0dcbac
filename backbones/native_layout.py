"""Bring a state dict of any known layout to the native layout of a ResNet / Swin / ConvNeXt / ViT backbone.

Recognised layouts (after unwrapping `backbone.` prefixes of detection / segmentation checkpoints):

- native and timm (`conv1`, `layer1.0.conv1`; `patch_embed`, `layers.1.downsample`; `stem`, `stages`),
  which is also torchvision's ResNet layout: classifier and final norm are skipped;
- transformers (bare, classification or *Backbone class, v4 or v5 names), see `hf_conversion`;
- the original Microsoft Swin (patch merging at the end of stage N, `attn_mask` buffers) and the
  official Mask2Former / Detectron2 Swin (`norm0..norm3` output norms);
- the original Facebook ConvNeXt (`downsample_layers`, `stages.S.B.dwconv`);
- ViTs: timm's layout and what timm's own checkpoint filters read (the original DINOv2 / DINOv3 / EVA-02
  releases; position embeddings resampled to the model's grid), classifier and pooling norm skipped. A key
  with no place in the timm model is refused by name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from timm.models import eva, vision_transformer
from torch import nn

from densepred.utils.state_dict import rename_key

from .hf_conversion import hf_family, hf_model_type_of, split_hf_backbone_state_dict

# Entries of classification / pretraining checkpoints that are not backbone weights, per `Backbone.family`.
SKIPPED = {
    "resnet": re.compile(r"fc\..*"),
    "swin": re.compile(r"(head|norm)\..*|head|.*\.relative_position_index|.*\.attn_mask"),
    "convnext": re.compile(r"(head|norm)\..*"),
    "vit": re.compile(r"(head|fc_norm|head_drop|attn_pool|lm_head)\..*|head|mask_token|.*\.k_bias"),
}
ORIGINAL_CONVNEXT_RULES = [
    (r"downsample_layers\.0\.(\d)\.(.*)", r"stem.\1.\2"),
    (r"downsample_layers\.(\d+)\.(\d)\.(.*)", r"stages.\1.downsample.\2.\3"),
    (r"stages\.(\d+)\.(\d+)\.dwconv\.(.*)", r"stages.\1.blocks.\2.conv_dw.\3"),
    (r"stages\.(\d+)\.(\d+)\.(norm|gamma)(.*)", r"stages.\1.blocks.\2.\3\4"),
    (r"stages\.(\d+)\.(\d+)\.pwconv([12])\.(.*)", r"stages.\1.blocks.\2.mlp.fc\3.\4"),
]


def _strip_backbone_prefix(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Keep the `backbone.` part of a detector / segmenter checkpoint (prefix removed), skipping the rest."""
    if not any(k.startswith("backbone.") for k in state_dict):
        return dict(state_dict), []
    inner = {k[len("backbone.") :]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    return inner, [k for k in state_dict if not k.startswith("backbone.")]


def to_native_state_dict(
    state_dict: Mapping[str, torch.Tensor], backbone: nn.Module, source: str, hf_model_type: str | None = None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(weights in the native layout of `backbone`, a native `Backbone`; checkpoint keys skipped as
    non-backbone entries).

    `hf_model_type` (config.json's model_type) marks a transformers checkpoint; without it the layout is
    recognised from the keys. A checkpoint of another family is refused.
    """
    family = getattr(backbone, "family", None)
    if family not in SKIPPED:
        raise ValueError(f"{type(backbone).__name__} is not a native ResNet / Swin / ConvNeXt / ViT backbone")
    state_dict, skipped = _strip_backbone_prefix(state_dict)
    hf_model_type = hf_model_type or hf_model_type_of(state_dict)
    if hf_model_type is not None:
        if hf_family(hf_model_type) != family:
            raise ValueError(
                f"{source} holds a transformers {hf_model_type!r} model, but {type(backbone).__name__} is a "
                f"{family} backbone; build the backbone that matches the checkpoint"
            )
        if family == "swin" and any(k.startswith("model.embeddings.") for k in state_dict):
            hf_model_type = "maskformer-swin"
        converted, dropped = split_hf_backbone_state_dict(state_dict, hf_model_type, source)
        return converted, skipped + dropped
    if family == "vit":
        return _from_timm_vit(state_dict, backbone, source, skipped)
    skip = SKIPPED[family]
    converted = {}
    for key, value in state_dict.items():
        if skip.fullmatch(key):
            skipped.append(key)
        else:
            converted[key] = value
    if family == "swin":
        converted = _from_original_swin(converted)
    if family == "convnext" and any(k.startswith("downsample_layers.") for k in converted):
        # keys no rule renames are left for the loader to report as having no place in the backbone
        converted = {rename_key(k, ORIGINAL_CONVNEXT_RULES): v for k, v in converted.items()}
    return converted, skipped


def _from_original_swin(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Microsoft's layout: patch merging at the end of stage N (ours: start of N + 1); Mask2Former's `normI`."""
    original = any(k.startswith("layers.0.downsample.") for k in state_dict)
    out = {}
    for key, value in state_dict.items():
        if original:
            key = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m[1]) + 1}.downsample.", key)
        key = re.sub(r"^norm(\d)\.", lambda m: f"out_norms.stage{int(m[1]) + 1}.", key)
        out[key] = value
    return out


def _from_timm_vit(
    state_dict: dict[str, torch.Tensor], backbone: nn.Module, source: str, skipped: list[str]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """timm-layout (or original-release) ViT weights -> `vit.<name>`, through the timm model's own filter."""
    vit = backbone.vit
    filter_fn = eva.checkpoint_filter_fn if isinstance(vit, eva.Eva) else vision_transformer.checkpoint_filter_fn
    state_dict = filter_fn(state_dict, vit)
    if "fc_norm.weight" in state_dict and "norm.weight" not in state_dict:  # timm moves MIM models' norm there
        state_dict = {re.sub(r"^fc_norm\.", "norm.", k): v for k, v in state_dict.items()}
    own = vit.state_dict()
    converted = {}
    for key, value in state_dict.items():
        if SKIPPED["vit"].fullmatch(key):
            skipped.append(key)
        elif key.endswith("num_batches_tracked"):  # BatchNorm counters are no weights (the loader ignores them)
            continue
        elif key in own:
            converted[f"vit.{key}"] = value
        else:
            raise ValueError(
                f"{source}: {key!r} is not a weight of {type(backbone).__name__}({backbone.config['model_name']!r}), "
                f"a timm {type(vit).__name__}; the checkpoint is of another architecture (its keys e.g. "
                f"{', '.join([k for k in state_dict if not k.endswith('num_batches_tracked')][:3])})"
            )
    return converted, skipped
