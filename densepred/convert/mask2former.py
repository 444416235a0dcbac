"""Convert a transformers `Mask2FormerForUniversalSegmentation` checkpoint into our Segmenter config + weights.

`convert_mask2former(name_or_path)` reads `config.json` and the safetensors weights of a local folder or a
Hub repo (e.g. `facebook/mask2former-swin-tiny-coco-panoptic`) and returns a config dict for
`Segmenter.from_config` (with `num_classes` and `class_names` from `id2label`) and a state dict with
`backbone.`, `neck.`, `head.` keys that loads into that model with strict=True.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from densepred.backbones.checkpoint import read_hf_checkpoint
from densepred.backbones.hf_conversion import native_backbone_from_hf_config, split_hf_backbone_state_dict
from densepred.convert.labels import class_names
from densepred.utils.state_dict import Rule, pack_qkv, rename_key

NECK_TARGET = "densepred.necks.msdeform_pixel_decoder.MSDeformAttnPixelDecoder"
HEAD_TARGET = "densepred.heads.mask2former.Mask2FormerHead"

BACKBONE_PREFIX = "model.pixel_level_module.encoder."
NECK_PREFIX = "model.pixel_level_module.decoder."
HEAD_PREFIX = "model.transformer_module."
# HF keys that are not model weights (the loss's class weights).
IGNORED = ("criterion.empty_weight",)
EXPECTED = "Mask2FormerForUniversalSegmentation"


# transformers' Mask2FormerConfig defaults: config.json may leave out keys that keep them.
HF_DEFAULTS: dict[str, Any] = {
    "feature_size": 256,
    "mask_feature_size": 256,
    "hidden_dim": 256,
    "encoder_feedforward_dim": 1024,
    "activation_function": "relu",
    "encoder_layers": 6,
    "decoder_layers": 10,
    "num_attention_heads": 8,
    "dropout": 0.0,
    "dim_feedforward": 2048,
    "pre_norm": False,
    "enforce_input_projection": False,
    "common_stride": 4,
    "num_queries": 100,
}


def segmenter_config_from_hf(config: Mapping[str, Any]) -> dict[str, Any]:
    """transformers Mask2FormerConfig (as a dict) -> config dict for `Segmenter.from_config`."""
    if config.get("model_type") != "mask2former":
        raise ValueError(
            f"expected a Mask2Former checkpoint (config.json model_type 'mask2former'), got "
            f"{config.get('model_type')!r}; MaskFormer checkpoints are converted by model.convert_maskformer"
        )
    if config.get("backbone_config") is None:
        raise ValueError(
            "config.json of this Mask2Former checkpoint has no backbone_config (a timm or named backbone); "
            "only checkpoints with a transformers Swin / ResNet / ConvNeXt backbone_config can be converted"
        )
    names = class_names(config)
    config = {**HF_DEFAULTS, **config}
    for key, supported in (("pre_norm", False), ("activation_function", "relu")):
        if config[key] != supported:
            raise ValueError(
                f"config.json sets {key}={config[key]!r}; only {key}={supported!r} (the official model) is supported"
            )
    target, kwargs = native_backbone_from_hf_config(dict(config["backbone_config"]))
    return {
        "backbone": {"_target_": target, **kwargs},
        "neck": {
            "_target_": NECK_TARGET,
            "conv_dim": config["feature_size"],
            "mask_dim": config["mask_feature_size"],
            "encoder_layers": config["encoder_layers"],
            "num_heads": config["num_attention_heads"],
            "dim_feedforward": config["encoder_feedforward_dim"],
            "dropout": config["dropout"],
            "common_stride": config["common_stride"],
        },
        "head": {
            "_target_": HEAD_TARGET,
            "hidden_dim": config["hidden_dim"],
            "num_queries": config["num_queries"],
            "num_heads": config["num_attention_heads"],
            "dim_feedforward": config["dim_feedforward"],
            "num_layers": config["decoder_layers"] - 1,  # HF counts the prediction from the learned queries
            "dropout": config["dropout"],
            "enforce_input_project": config["enforce_input_projection"],
        },
        "num_classes": len(names),
        "class_names": names,
    }


def _neck_rules(num_fpn_levels: int) -> list[Rule]:
    """(regex on the HF key after `NECK_PREFIX`, our key after `neck.`)."""
    return [
        (r"level_embed", "level_embed"),
        (r"input_projections\.(\d+)\.(.*)", r"input_proj.\1.\2"),
        (r"encoder\.layers\.(\d+)\.self_attn\.(.*)", r"encoder_layers.\1.self_attn.\2"),
        (r"encoder\.layers\.(\d+)\.self_attn_layer_norm\.(.*)", r"encoder_layers.\1.norm1.\2"),
        (r"encoder\.layers\.(\d+)\.fc1\.(.*)", r"encoder_layers.\1.linear1.\2"),
        (r"encoder\.layers\.(\d+)\.fc2\.(.*)", r"encoder_layers.\1.linear2.\2"),
        (r"encoder\.layers\.(\d+)\.final_layer_norm\.(.*)", r"encoder_layers.\1.norm2.\2"),
        (r"mask_projection\.(.*)", r"mask_features.\1"),
        # HF numbers the FPN levels fine to coarse from 1; ours are coarse to fine from 0
        (r"adapter_(\d+)\.(.*)", lambda m: f"lateral_convs.{num_fpn_levels - int(m[1])}.{m[2]}"),
        (r"layer_(\d+)\.(.*)", lambda m: f"output_convs.{num_fpn_levels - int(m[1])}.{m[2]}"),
    ]


HEAD_RULES: list[Rule] = [
    (r"queries_embedder\.weight", "query_embed.weight"),
    (r"queries_features\.weight", "query_feat.weight"),
    (r"level_embed\.weight", "level_embed.weight"),
    (r"input_projections\.(\d+)\.(.*)", r"input_proj.\1.\2"),
    (r"decoder\.layers\.(\d+)\.self_attn\.out_proj\.(.*)", r"layers.\1.self_attn.out_proj.\2"),
    (r"decoder\.layers\.(\d+)\.self_attn_layer_norm\.(.*)", r"layers.\1.self_attn_norm.\2"),
    (r"decoder\.layers\.(\d+)\.cross_attn\.(.*)", r"layers.\1.cross_attn.\2"),
    (r"decoder\.layers\.(\d+)\.cross_attn_layer_norm\.(.*)", r"layers.\1.cross_attn_norm.\2"),
    (r"decoder\.layers\.(\d+)\.fc1\.(.*)", r"layers.\1.linear1.\2"),
    (r"decoder\.layers\.(\d+)\.fc2\.(.*)", r"layers.\1.linear2.\2"),
    (r"decoder\.layers\.(\d+)\.final_layer_norm\.(.*)", r"layers.\1.ffn_norm.\2"),
    (r"decoder\.layernorm\.(.*)", r"decoder_norm.\1"),
    (r"decoder\.mask_predictor\.mask_embedder\.(\d+)\.0\.(.*)", r"mask_embed.layers.\1.\2"),
]
# The self-attention's separate q/k/v projections become nn.MultiheadAttention's packed in_proj.
SELF_ATTN_QKV = re.compile(r"decoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")


def convert_mask2former_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any], source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """transformers Mask2FormerForUniversalSegmentation weights -> our `backbone.` / `neck.` / `head.` keys."""
    num_fpn_levels = len({m[1] for k in state_dict if (m := re.match(NECK_PREFIX + r"adapter_(\d+)\.", k))})
    neck_rules = _neck_rules(num_fpn_levels)
    backbone, out = {}, {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if key in IGNORED:
            continue
        if key.startswith(BACKBONE_PREFIX):
            backbone[key[len(BACKBONE_PREFIX) :]] = value
        elif key.startswith(NECK_PREFIX):
            name = key[len(NECK_PREFIX) :]
            error = f"{source}: unexpected weight {name!r}; is this a {EXPECTED} checkpoint?"
            out["neck." + rename_key(name, neck_rules, error)] = value
        elif key.startswith("class_predictor."):
            out["head.class_embed." + key[len("class_predictor.") :]] = value
        elif key.startswith(HEAD_PREFIX) and (match := SELF_ATTN_QKV.fullmatch(key[len(HEAD_PREFIX) :])):
            qkv.setdefault((match[1], match[3]), {})[match[2]] = value
        elif key.startswith(HEAD_PREFIX):
            name = key[len(HEAD_PREFIX) :]
            error = f"{source}: unexpected weight {name!r}; is this a {EXPECTED} checkpoint?"
            out["head." + rename_key(name, HEAD_RULES, error)] = value
        else:
            raise ValueError(f"{source}: unexpected weight {key!r}; is this a {EXPECTED} checkpoint?")
    for (layer, kind), parts in sorted(qkv.items()):
        error = f"{source}: decoder layer {layer} lacks one of self_attn.{{q,k,v}}_proj.{kind}"
        out[f"head.layers.{layer}.self_attn.in_proj_{kind}"] = pack_qkv(parts, error)
    backbone, _ = split_hf_backbone_state_dict(backbone, config["backbone_config"].get("model_type"), source)
    return {**{"backbone." + k: v for k, v in backbone.items()}, **out}


def convert_mask2former(
    name_or_path: str, revision: str | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A transformers Mask2Former checkpoint (local folder or Hub id with config.json + safetensors) ->
    (config dict for `Segmenter.from_config`, state dict loading into it with strict=True)."""
    config, state_dict = read_hf_checkpoint(name_or_path, revision=revision)
    model_config = segmenter_config_from_hf(config)
    return model_config, convert_mask2former_state_dict(state_dict, config, source=name_or_path)
