"""Convert a transformers `MaskFormerForInstanceSegmentation` checkpoint into our Segmenter config + weights.

`convert_maskformer(name_or_path)` reads `config.json` and the safetensors weights of a local folder or a
Hub repo (e.g. `facebook/maskformer-swin-base-coco`) and returns a config dict for `Segmenter.from_config`
(backbone, `BasePixelDecoder` neck, `MaskFormerHead`, `num_classes` and `class_names` from `id2label`)
and a state dict with `backbone.`, `neck.`, `head.` keys that loads into that model with strict=True.
Both the transformers v4 key layout (Hub files: `out_proj`, `fc1`) and the v5 one (`o_proj`, `mlp.fc1`)
are read.

transformers' MaskFormer always feeds its Swin backbone's four stages to the pixel decoder
(`MaskFormerSwinBackbone`, also when config.json says model_type "swin"), and the backbone's
`out_features` otherwise; the converted backbone selects the same stages.
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

NECK_TARGET = "densepred.necks.pixel_decoder.BasePixelDecoder"
HEAD_TARGET = "densepred.heads.maskformer.MaskFormerHead"

BACKBONE_PREFIX = "model.pixel_level_module.encoder."
NECK_PREFIX = "model.pixel_level_module.decoder."
HEAD_PREFIX = "model.transformer_module."
IGNORED = ("criterion.empty_weight",)  # the loss's class weights, not model weights
EXPECTED = "MaskFormerForInstanceSegmentation"
SWIN_STAGES = ["stage1", "stage2", "stage3", "stage4"]

# transformers' MaskFormerDetrConfig defaults, used where config.json leaves a key out (as transformers does).
DETR_DEFAULTS = {
    "d_model": 256,
    "num_queries": 100,
    "decoder_attention_heads": 8,
    "decoder_ffn_dim": 2048,
    "decoder_layers": 6,
    "dropout": 0.1,
    "activation_function": "relu",
    "position_embedding_type": "sine",
}


def hf_backbone_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The backbone config transformers' MaskFormer actually builds (a Swin is always MaskFormerSwin, 4 stages)."""
    backbone = config.get("backbone_config")
    if backbone is None:
        raise ValueError(
            "config.json of this MaskFormer checkpoint has no backbone_config (a timm or named backbone); only "
            "checkpoints with a transformers Swin or ResNet backbone_config can be converted"
        )
    backbone = dict(backbone)
    if backbone.get("model_type") in ("swin", "maskformer-swin"):
        backbone.update(model_type="maskformer-swin", out_features=SWIN_STAGES, out_indices=[1, 2, 3, 4])
    return backbone


def segmenter_config_from_hf(config: Mapping[str, Any]) -> dict[str, Any]:
    """transformers MaskFormerConfig (as a dict) -> config dict for `Segmenter.from_config`."""
    if config.get("model_type") != "maskformer":
        raise ValueError(
            f"expected a MaskFormer checkpoint (config.json model_type 'maskformer'), got "
            f"{config.get('model_type')!r}; Mask2Former checkpoints are converted by model.convert_mask2former"
        )
    decoder = {**DETR_DEFAULTS, **dict(config.get("decoder_config") or {})}
    for key in ("activation_function", "position_embedding_type"):
        if decoder[key] != DETR_DEFAULTS[key]:
            raise ValueError(
                f"config.json decoder_config sets {key}={decoder[key]!r}; only {DETR_DEFAULTS[key]!r} "
                "(the official MaskFormer) is supported"
            )
    names = class_names(config)
    target, kwargs = native_backbone_from_hf_config(hf_backbone_config(config))
    return {
        "backbone": {"_target_": target, **kwargs},
        "neck": {
            "_target_": NECK_TARGET,
            "conv_dim": config.get("fpn_feature_size", 256),
            "mask_dim": config.get("mask_feature_size", 256),
        },
        "head": {
            "_target_": HEAD_TARGET,
            "hidden_dim": decoder["d_model"],
            "num_queries": decoder["num_queries"],
            "num_heads": decoder["decoder_attention_heads"],
            "dim_feedforward": decoder["decoder_ffn_dim"],
            "num_layers": decoder["decoder_layers"],
            "dropout": decoder["dropout"],
        },
        "num_classes": len(names),
        "class_names": names,
    }


def _neck_rules(num_levels: int) -> list[Rule]:
    """(regex on the HF key after `NECK_PREFIX`, our key after `neck.`).

    transformers' FPN runs coarse to fine (`stem` on the coarsest map, then `layers.0` on the next finer
    one); our `lateral_convs` / `output_convs` are indexed fine to coarse like the backbone maps.
    """
    last = num_levels - 1
    return [
        (r"fpn\.stem\.(.*)", rf"output_convs.{last}.\1"),
        (r"fpn\.layers\.(\d+)\.proj\.(.*)", lambda m: f"lateral_convs.{last - 1 - int(m[1])}.{m[2]}"),
        (r"fpn\.layers\.(\d+)\.block\.(.*)", lambda m: f"output_convs.{last - 1 - int(m[1])}.{m[2]}"),
        (r"mask_projection\.(.*)", r"mask_features.\1"),
    ]


TRANSFORMER = re.escape(HEAD_PREFIX)
LAYER = TRANSFORMER + r"decoder\.layers\.(\d+)\."
HEAD_RULES: list[Rule] = [
    (TRANSFORMER + r"queries_embedder\.weight", "query_embed.weight"),
    (TRANSFORMER + r"input_projection\.(.*)", r"input_proj.\1"),
    (LAYER + r"self_attn\.(?:o|out)_proj\.(.*)", r"decoder.layers.\1.self_attn.out_proj.\2"),
    (LAYER + r"encoder_attn\.(?:o|out)_proj\.(.*)", r"decoder.layers.\1.cross_attn.out_proj.\2"),
    (LAYER + r"self_attn_layer_norm\.(.*)", r"decoder.layers.\1.norm1.\2"),
    (LAYER + r"encoder_attn_layer_norm\.(.*)", r"decoder.layers.\1.norm2.\2"),
    (LAYER + r"final_layer_norm\.(.*)", r"decoder.layers.\1.norm3.\2"),
    (LAYER + r"(?:mlp\.)?fc1\.(.*)", r"decoder.layers.\1.linear1.\2"),
    (LAYER + r"(?:mlp\.)?fc2\.(.*)", r"decoder.layers.\1.linear2.\2"),
    (TRANSFORMER + r"decoder\.layernorm\.(.*)", r"decoder.norm.\1"),
    (r"class_predictor\.(.*)", r"class_embed.\1"),
    (r"mask_embedder\.(\d+)\.0\.(.*)", r"mask_embed.layers.\1.\2"),
]
# Separate q/k/v projections become nn.MultiheadAttention's packed in_proj (order q, k, v).
QKV = re.compile(LAYER + r"(self_attn|encoder_attn)\.([qkv])_proj\.(weight|bias)")
ATTENTION_NAMES = {"self_attn": "self_attn", "encoder_attn": "cross_attn"}


def convert_maskformer_neck_head(
    state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """The pixel-decoder and transformer-module weights of a transformers MaskFormer -> `neck.` / `head.` keys.

    Backbone weights (`model.pixel_level_module.encoder.*`) are skipped; `convert_maskformer_state_dict`
    converts them.
    """
    fpn_layer = re.compile(re.escape(NECK_PREFIX) + r"fpn\.layers\.(\d+)\.")
    num_levels = 1 + len({m[1] for key in state_dict if (m := fpn_layer.match(key))})
    neck_rules = _neck_rules(num_levels)
    out = {}
    qkv: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if key in IGNORED or key.startswith(BACKBONE_PREFIX):
            continue
        if key.startswith(NECK_PREFIX):
            name = key[len(NECK_PREFIX) :]
            error = f"{source}: unexpected weight {name!r}; is this a {EXPECTED} checkpoint?"
            out["neck." + rename_key(name, neck_rules, error)] = value
        elif match := QKV.fullmatch(key):
            qkv.setdefault((match[1], ATTENTION_NAMES[match[2]], match[4]), {})[match[3]] = value
        else:
            error = f"{source}: unexpected weight {key!r}; is this a {EXPECTED} checkpoint?"
            out["head." + rename_key(key, HEAD_RULES, error)] = value
    for (layer, attention, kind), parts in sorted(qkv.items()):
        error = f"{source}: decoder layer {layer} lacks one of {attention} {{q,k,v}}_proj.{kind}"
        out[f"head.decoder.layers.{layer}.{attention}.in_proj_{kind}"] = pack_qkv(parts, error)
    return out


def convert_maskformer_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any], source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """transformers MaskFormerForInstanceSegmentation weights -> our `backbone.` / `neck.` / `head.` keys."""
    backbone = {k[len(BACKBONE_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(BACKBONE_PREFIX)}
    backbone, _ = split_hf_backbone_state_dict(backbone, hf_backbone_config(config)["model_type"], source)
    return {**{"backbone." + k: v for k, v in backbone.items()}, **convert_maskformer_neck_head(state_dict, source)}


def convert_maskformer(
    name_or_path: str, revision: str | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A transformers MaskFormer checkpoint (local folder or Hub id with config.json + safetensors) ->
    (config dict for `Segmenter.from_config`, state dict loading into it with strict=True)."""
    config, state_dict = read_hf_checkpoint(name_or_path, revision=revision)
    model_config = segmenter_config_from_hf(config)
    return model_config, convert_maskformer_state_dict(state_dict, config, source=name_or_path)
