"""Convert a transformers `DeformableDetrForObjectDetection` checkpoint into our Segmenter config + weights.

`convert_deformable_detr(name_or_path)` reads `config.json` and the safetensors weights of a local folder or a
Hub repo (e.g. `SenseTime/deformable-detr`, `SenseTime/deformable-detr-with-box-refine-two-stage`) and returns
a config dict for `Segmenter.from_config` (backbone, `necks.deformable_detr_encoder`, `heads.deformable_detr`,
`num_classes` and `class_names` from `id2label`) and a state dict with `backbone.`, `neck.`, `head.` keys
loading into it with strict=True. The backbone is a timm model (`use_timm_backbone`, the Hub checkpoints':
`backbones.TimmBackbone`) or a transformers ResNet / Swin / ConvNeXt (`backbone_config`, native). Files written
by transformers 4 (the Hub's) and 5 name some weights differently; both are read.
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

NECK_TARGET = "densepred.necks.deformable_detr_encoder.DeformableDetrEncoder"
HEAD_TARGET = "densepred.heads.deformable_detr.DeformableDetrHead"
TIMM_TARGET = "densepred.backbones.TimmBackbone"
EXPECTED = "DeformableDetrForObjectDetection"

# transformers' DeformableDetrConfig defaults: config.json may leave out keys that keep them.
HF_DEFAULTS: dict[str, Any] = {
    "d_model": 256,
    "encoder_layers": 6,
    "decoder_layers": 6,
    "encoder_attention_heads": 8,
    "decoder_attention_heads": 8,
    "encoder_ffn_dim": 1024,
    "decoder_ffn_dim": 1024,
    "encoder_n_points": 4,
    "decoder_n_points": 4,
    "num_feature_levels": 4,
    "num_queries": 300,
    "two_stage_num_proposals": 300,
    "dropout": 0.1,
    "activation_function": "relu",
    "position_embedding_type": "sine",
    "with_box_refine": False,
    "two_stage": False,
    "dilation": False,
    "backbone": "resnet50",
}
# transformers 5 names (what its modules hold) -> transformers 4 names (what its files hold, the Hub's).
V5_TO_V4: list[tuple[str, str]] = [
    (r"^model\.backbone\.model\.", "model.backbone.conv_encoder.model."),
    (r"self_attn\.o_proj\.", "self_attn.out_proj."),
    (r"layers\.(\d+)\.mlp\.fc([12])\.", r"layers.\1.fc\2."),
]
BACKBONE_PREFIX = "model.backbone.conv_encoder.model."
LAYER_RULES: list[Rule] = [  # an encoder / decoder layer's weights after `layers.{i}.`
    (r"self_attn_layer_norm\.(.*)", r"self_attn_norm.\1"),
    (r"encoder_attn\.(.*)", r"cross_attn.\1"),
    (r"encoder_attn_layer_norm\.(.*)", r"cross_attn_norm.\1"),
    (r"fc1\.(.*)", r"linear1.\1"),
    (r"fc2\.(.*)", r"linear2.\1"),
    (r"final_layer_norm\.(.*)", r"ffn_norm.\1"),
    (r"self_attn\.out_proj\.(.*)", r"self_attn.out_proj.\1"),
]
ENCODER_RULES: list[Rule] = [
    (r"self_attn\.(sampling_offsets|attention_weights|value_proj|output_proj)\.(.*)", r"self_attn.\1.\2"),
    (r"self_attn_layer_norm\.(.*)", r"norm1.\1"),
    (r"fc1\.(.*)", r"linear1.\1"),
    (r"fc2\.(.*)", r"linear2.\1"),
    (r"final_layer_norm\.(.*)", r"norm2.\1"),
]
MODEL_RULES: list[Rule] = [  # after `model.`
    (r"input_proj\.(\d+)\.([01])\.(.*)", r"neck.input_proj.\1.\2.\3"),
    (r"level_embed", "neck.level_embed"),
    (r"query_position_embeddings\.weight", "head.query_embed.weight"),
    (r"(reference_points|enc_output|enc_output_norm|pos_trans|pos_trans_norm)\.(.*)", r"head.\1.\2"),
]
SELF_ATTN_QKV = re.compile(r"self_attn\.([qkv])_proj\.(weight|bias)")
PREDICTION = re.compile(r"(?:model\.decoder\.)?(class_embed|bbox_embed)\.(\d+)\.(.*)")


def segmenter_config_from_hf(config: Mapping[str, Any]) -> dict[str, Any]:
    """transformers DeformableDetrConfig (as a dict) -> config dict for `Segmenter.from_config`."""
    if config.get("model_type") != "deformable_detr":
        raise ValueError(
            f"expected a Deformable DETR checkpoint (config.json model_type 'deformable_detr'), got "
            f"{config.get('model_type')!r}"
        )
    names = class_names(config)
    config = {**HF_DEFAULTS, **config}
    for key, supported in (("activation_function", "relu"), ("position_embedding_type", "sine"), ("dilation", False)):
        if config[key] != supported:
            raise ValueError(
                f"config.json sets {key}={config[key]!r}; only {key}={supported!r} (the official model) is supported"
            )
    backbone_config = dict(config.get("backbone_config") or {})
    if not backbone_config or backbone_config.get("model_type") == "timm_backbone":
        out_indices = backbone_config.get("out_indices") or ([2, 3, 4] if config["num_feature_levels"] > 1 else [4])
        name = backbone_config.get("backbone") or config["backbone"]
        backbone = {"_target_": TIMM_TARGET, "model_name": name, "out_indices": list(out_indices)}
        num_maps = len(out_indices)
    else:
        target, kwargs = native_backbone_from_hf_config(backbone_config)
        backbone = {"_target_": target, **kwargs}
        num_maps = len(backbone_config.get("out_features") or backbone_config.get("out_indices") or ["stage4"])
    levels = config["num_feature_levels"]
    return {
        "backbone": backbone,
        "neck": {
            "_target_": NECK_TARGET,
            "hidden_dim": config["d_model"],
            "num_feature_levels": levels,
            "backbone_levels": num_maps,  # transformers projects every map the backbone gives
            "encoder_layers": config["encoder_layers"],
            "num_heads": config["encoder_attention_heads"],
            "num_points": config["encoder_n_points"],
            "dim_feedforward": config["encoder_ffn_dim"],
            "dropout": config["dropout"],
        },
        "head": {
            "_target_": HEAD_TARGET,
            "num_queries": config["two_stage_num_proposals"] if config["two_stage"] else config["num_queries"],
            "num_layers": config["decoder_layers"],
            "num_heads": config["decoder_attention_heads"],
            "num_points": config["decoder_n_points"],
            "num_feature_levels": levels,
            "dim_feedforward": config["decoder_ffn_dim"],
            "dropout": config["dropout"],
            "with_box_refine": bool(config["with_box_refine"]),
            "two_stage": bool(config["two_stage"]),
        },
        "num_classes": len(names),
        "class_names": names,
    }


def _v4_name(key: str) -> str:
    for pattern, replacement in V5_TO_V4:
        key = re.sub(pattern, replacement, key)
    return key


def _prediction_heads(
    found: Mapping[tuple[str, int], dict[str, torch.Tensor]], layers: int, refine: bool, two_stage: bool, source: str
) -> dict[str, torch.Tensor]:
    """transformers' per-layer class / box heads (tied ones saved once: index 0 stands for all) -> ours."""
    out = {}
    targets = [(i, f"{{kind}}.{i}") for i in range(layers if refine else 1)]
    if two_stage:
        targets.append((layers, "enc_{kind}"))
    for index, name in targets:
        for kind in ("class_embed", "bbox_embed"):
            weights = found.get((kind, index)) or found.get((kind, 0))
            if weights is None:
                raise ValueError(f"{source}: no {kind} weights; is this a {EXPECTED} checkpoint?")
            out.update({f"head.{name.format(kind=kind)}.{k}": v for k, v in weights.items()})
    return out


def convert_deformable_detr_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any], source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """transformers DeformableDetrForObjectDetection weights -> our `backbone.` / `neck.` / `head.` keys."""
    config = {**HF_DEFAULTS, **config}
    backbone, out = {}, {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    heads: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    for original, value in state_dict.items():
        key = _v4_name(original)
        error = f"{source}: unexpected weight {original!r}; is this a {EXPECTED} checkpoint?"
        if key.startswith(BACKBONE_PREFIX):
            backbone[key[len(BACKBONE_PREFIX) :]] = value
        elif match := PREDICTION.fullmatch(key):
            heads.setdefault((match[1], int(match[2])), {})[match[3]] = value
        elif match := re.fullmatch(r"model\.encoder\.layers\.(\d+)\.(.*)", key):
            out[f"neck.encoder_layers.{match[1]}." + rename_key(match[2], ENCODER_RULES, error)] = value
        elif match := re.fullmatch(r"model\.decoder\.layers\.(\d+)\.(.*)", key):
            if qkv_match := SELF_ATTN_QKV.fullmatch(match[2]):
                qkv.setdefault((match[1], qkv_match[2]), {})[qkv_match[1]] = value
            else:
                out[f"head.layers.{match[1]}." + rename_key(match[2], LAYER_RULES, error)] = value
        elif key.startswith("model."):
            out[rename_key(key[len("model.") :], MODEL_RULES, error)] = value
        else:
            raise ValueError(error)
    for (layer, kind), parts in sorted(qkv.items()):
        error = f"{source}: decoder layer {layer} lacks one of self_attn.{{q,k,v}}_proj.{kind}"
        out[f"head.layers.{layer}.self_attn.in_proj_{kind}"] = pack_qkv(parts, error)
    refine, two_stage = bool(config["with_box_refine"]), bool(config["two_stage"])
    out.update(_prediction_heads(heads, config["decoder_layers"], refine, two_stage, source))
    backbone_config = dict(config.get("backbone_config") or {})
    if backbone_config and backbone_config.get("model_type") != "timm_backbone":
        backbone, _ = split_hf_backbone_state_dict(backbone, backbone_config.get("model_type"), source)
    else:
        backbone = {f"model.{k}": v for k, v in backbone.items()}
    # transformers freezes the backbone's BatchNorms (FrozenBatchNorm2d: no batch counter); ours count
    for key in [k for k in backbone if k.endswith(".running_mean")]:
        backbone.setdefault(key[: -len("running_mean")] + "num_batches_tracked", torch.tensor(0))
    return {**{"backbone." + k: v for k, v in backbone.items()}, **out}


def convert_deformable_detr(
    name_or_path: str, revision: str | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A transformers Deformable DETR checkpoint (local folder or Hub id with config.json + safetensors) ->
    (config dict for `Segmenter.from_config`, state dict loading into it with strict=True)."""
    config, state_dict = read_hf_checkpoint(name_or_path, revision=revision)
    model_config = segmenter_config_from_hf(config)
    return model_config, convert_deformable_detr_state_dict(state_dict, config, source=name_or_path)
