"""Convert a transformers `RTDetrForObjectDetection` checkpoint (v1, config.json model_type `rt_detr`) into our
Segmenter config + weights: the backbone natively (RT-DETR's ResNet-vd -> `ResNetBackbone(variant="d")`, or
any backbone `native_backbone_from_hf_config` reads), `HybridEncoder` neck, `RTDetrHead`.

`convert_rtdetr(name_or_path)` reads `config.json` and the safetensors weights of a local folder or a Hub repo
(e.g. `PekingU/rtdetr_r50vd`) and returns a config dict for `Segmenter.from_config` and a state dict with
`backbone.`, `neck.`, `head.` keys that loads into it with strict=True. Both key layouts are read: the Hub
files' (`encoder.encoder.N`, `out_proj`, `layers.N.fc1`) and transformers 5's (`encoder.aifi.N`, `o_proj`,
`layers.N.mlp.fc1`).

The input normalisation is RTDetrImageProcessor's: pixels / 255, no mean / std (`pixel_mean` 0, `pixel_std` 1),
unless a local folder's `preprocessor_config.json` sets `do_normalize` with `image_mean` / `image_std`.

Two transformers settings are not copied: `anchor_image_size` (transformers then uses anchors precomputed for
that size in eval; here they are computed for the actual input, the same at that size) and `eval_size`
(transformers then drops AIFI's position embedding in eval; here it is always added, as in the original).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from densepred.backbones.checkpoint import read_hf_checkpoint
from densepred.backbones.hf_conversion import native_backbone_from_hf_config, split_hf_backbone_state_dict
from densepred.convert.labels import class_names
from densepred.utils.state_dict import Rule, pack_qkv, rename_key

NECK_TARGET = "densepred.necks.hybrid_encoder.HybridEncoder"
HEAD_TARGET = "densepred.heads.rtdetr.RTDetrHead"
BACKBONE_PREFIX = "model.backbone.model."
EXPECTED = "RTDetrForObjectDetection"

logger = logging.getLogger(__name__)

# transformers' RTDetrConfig defaults: config.json may leave out keys that keep them.
HF_DEFAULTS: dict[str, Any] = {
    "layer_norm_eps": 1e-5,
    "batch_norm_eps": 1e-5,
    "freeze_backbone_batch_norms": True,
    "encoder_hidden_dim": 256,
    "encoder_in_channels": [512, 1024, 2048],
    "encoder_layers": 1,
    "encoder_ffn_dim": 1024,
    "encoder_attention_heads": 8,
    "dropout": 0.0,
    "encode_proj_layers": [2],
    "positional_encoding_temperature": 10000,
    "encoder_activation_function": "gelu",
    "activation_function": "silu",
    "normalize_before": False,
    "hidden_expansion": 1.0,
    "d_model": 256,
    "num_queries": 300,
    "decoder_in_channels": [256, 256, 256],
    "decoder_ffn_dim": 1024,
    "num_feature_levels": 3,
    "decoder_n_points": 4,
    "decoder_layers": 6,
    "decoder_attention_heads": 8,
    "decoder_activation_function": "relu",
    "num_denoising": 100,
    "label_noise_ratio": 0.5,
    "box_noise_scale": 1.0,
    "learn_initial_query": False,
    "initializer_bias_prior_prob": None,
    "anchor_image_size": None,
    "eval_size": None,
}


def _check(config: Mapping[str, Any]) -> None:
    """Refuse settings the native model does not reproduce, naming the config.json key."""
    if config.get("model_type") != "rt_detr":
        raise ValueError(
            f"expected an RT-DETR checkpoint (config.json model_type 'rt_detr'), got {config.get('model_type')!r}"
        )
    if config.get("backbone_config") is None or config.get("use_timm_backbone"):
        raise ValueError(
            "config.json of this RT-DETR checkpoint has no transformers backbone_config (a timm or named "
            "backbone); only checkpoints with an RT-DETR ResNet / ResNet / Swin / ConvNeXt backbone_config convert"
        )
    if not isinstance(config["decoder_n_points"], int):
        raise ValueError(f"config.json sets decoder_n_points={config['decoder_n_points']!r}; RT-DETR v1 has one int")
    if config["batch_norm_eps"] != 1e-5:  # transformers' encoder input projections ignore it
        raise ValueError(f"config.json sets batch_norm_eps={config['batch_norm_eps']}; only 1e-5 is supported")
    if any(c != config["encoder_hidden_dim"] for c in config["decoder_in_channels"]):
        raise ValueError(
            f"config.json sets decoder_in_channels={config['decoder_in_channels']}; they must all equal "
            f"encoder_hidden_dim={config['encoder_hidden_dim']} (the hybrid encoder's output)"
        )
    if config["num_feature_levels"] - len(config["decoder_in_channels"]) > 1:
        raise ValueError(
            "config.json asks for more than one extra decoder level (num_feature_levels - len(decoder_in_channels) "
            "> 1): transformers builds those from the encoder output, the original from the level before; not "
            "supported"
        )
    for key in ("anchor_image_size", "eval_size"):
        if config[key] is not None:
            logger.warning(
                "config.json sets %s=%s; it is not used (see densepred.convert.rtdetr): the converted model "
                "computes anchors and position embeddings for the actual input size",
                key,
                config[key],
            )


def segmenter_config_from_hf(config: Mapping[str, Any]) -> dict[str, Any]:
    """transformers RTDetrConfig (as a dict) -> config dict for `Segmenter.from_config`."""
    names = class_names(config)
    config = {**HF_DEFAULTS, **config}
    _check(config)
    target, kwargs = native_backbone_from_hf_config(dict(config["backbone_config"]))
    if target == "densepred.backbones.ResNetBackbone":
        kwargs["norm"] = "frozen_bn" if config["freeze_backbone_batch_norms"] else "bn"
    prior_prob = config["initializer_bias_prior_prob"] or 1 / (len(names) + 1)
    return {
        "backbone": {"_target_": target, **kwargs},
        "neck": {
            "_target_": NECK_TARGET,
            "hidden_dim": config["encoder_hidden_dim"],
            "num_levels": len(config["encoder_in_channels"]),
            "aifi_levels": list(config["encode_proj_layers"]),
            "encoder_layers": config["encoder_layers"],
            "num_heads": config["encoder_attention_heads"],
            "dim_feedforward": config["encoder_ffn_dim"],
            "dropout": config["dropout"],
            "encoder_activation": config["encoder_activation_function"],
            "normalize_before": config["normalize_before"],
            "temperature": config["positional_encoding_temperature"],
            "activation": config["activation_function"],
            "expansion": config["hidden_expansion"],
            "layer_norm_eps": config["layer_norm_eps"],
        },
        "head": {
            "_target_": HEAD_TARGET,
            "hidden_dim": config["d_model"],
            "num_queries": config["num_queries"],
            "num_layers": config["decoder_layers"],
            "num_heads": config["decoder_attention_heads"],
            "num_points": config["decoder_n_points"],
            "dim_feedforward": config["decoder_ffn_dim"],
            "dropout": config["dropout"],
            "activation": config["decoder_activation_function"],
            "num_feature_levels": config["num_feature_levels"],
            "num_input_levels": len(config["decoder_in_channels"]),
            "num_denoising": config["num_denoising"],
            "label_noise_ratio": config["label_noise_ratio"],
            "box_noise_scale": config["box_noise_scale"],
            "learn_initial_query": config["learn_initial_query"],
            "prior_prob": prior_prob,
            "layer_norm_eps": config["layer_norm_eps"],
        },
        "num_classes": len(names),
        "class_names": names,
    }


# Encoder / decoder layer parts: Hub files (v4) and transformers 5 names -> ours.
_ATTN_OUT = r"self_attn\.(?:o_proj|out_proj)\.(.*)"
_FC = r"(?:mlp\.)?fc([12])\.(.*)"
NECK_RULES: list[Rule] = [
    (r"model\.encoder_input_proj\.(\d+)\.(.*)", r"input_proj.\1.\2"),
    (r"model\.encoder\.(?:aifi|encoder)\.(\d+)\.layers\.(\d+)\." + _ATTN_OUT, r"aifi.\1.\2.self_attn.out_proj.\3"),
    (r"model\.encoder\.(?:aifi|encoder)\.(\d+)\.layers\.(\d+)\.self_attn_layer_norm\.(.*)", r"aifi.\1.\2.norm1.\3"),
    (r"model\.encoder\.(?:aifi|encoder)\.(\d+)\.layers\.(\d+)\." + _FC, r"aifi.\1.\2.linear\3.\4"),
    (r"model\.encoder\.(?:aifi|encoder)\.(\d+)\.layers\.(\d+)\.final_layer_norm\.(.*)", r"aifi.\1.\2.norm2.\3"),
    (r"model\.encoder\.((?:lateral_convs|fpn_blocks|downsample_convs|pan_blocks)\..*)", r"\1"),
]
DECODER_LAYER = r"model\.decoder\.layers\.(\d+)\."
HEAD_RULES: list[Rule] = [
    (r"model\.decoder_input_proj\.(\d+)\.(.*)", r"input_proj.\1.\2"),
    (r"model\.denoising_class_embed\.weight", "denoising_class_embed.weight"),
    (r"model\.weight_embedding\.weight", "query_embed.weight"),
    (r"model\.(enc_output|enc_score_head|enc_bbox_head)\.(.*)", r"\1.\2"),
    (r"model\.decoder\.(query_pos_head|class_embed|bbox_embed)\.(.*)", r"\1.\2"),
    (DECODER_LAYER + _ATTN_OUT, r"layers.\1.self_attn.out_proj.\2"),
    (DECODER_LAYER + r"self_attn_layer_norm\.(.*)", r"layers.\1.norm1.\2"),
    (DECODER_LAYER + r"encoder_attn\.(.*)", r"layers.\1.cross_attn.\2"),
    (DECODER_LAYER + r"encoder_attn_layer_norm\.(.*)", r"layers.\1.norm2.\2"),
    (DECODER_LAYER + _FC, r"layers.\1.linear\2.\3"),
    (DECODER_LAYER + r"final_layer_norm\.(.*)", r"layers.\1.norm3.\2"),
]
# Separate q / k / v projections of the self-attentions -> nn.MultiheadAttention's packed in_proj.
QKV = re.compile(
    r"model\.(?:encoder\.(?:aifi|encoder)\.(\d+)\.layers\.(\d+)|decoder\.layers\.(\d+))\.self_attn\.([qkv])_proj\."
    r"(weight|bias)"
)


def convert_rtdetr_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any], source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """transformers RTDetrForObjectDetection weights -> our `backbone.` / `neck.` / `head.` keys."""
    backbone, out = {}, {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        error = f"{source}: unexpected weight {key!r}; is this an {EXPECTED} checkpoint?"
        if key.startswith(BACKBONE_PREFIX):
            backbone[key[len(BACKBONE_PREFIX) :]] = value
        elif match := QKV.fullmatch(key):
            prefix = f"neck.aifi.{match[1]}.{match[2]}" if match[1] is not None else f"head.layers.{match[3]}"
            qkv.setdefault((prefix, match[5]), {})[match[4]] = value
        elif key.startswith(("model.encoder_input_proj.", "model.encoder.")):
            out["neck." + rename_key(key, NECK_RULES, error)] = value
        else:
            out["head." + rename_key(key, HEAD_RULES, error)] = value
    for (prefix, kind), parts in sorted(qkv.items()):
        out[f"{prefix}.self_attn.in_proj_{kind}"] = pack_qkv(parts, f"{source}: {prefix} lacks one of q/k/v {kind}")
    backbone, _ = split_hf_backbone_state_dict(backbone, config["backbone_config"].get("model_type"), source)
    return {**{"backbone." + k: v for k, v in backbone.items()}, **out}


def normalization(name_or_path: str) -> dict[str, list[float]]:
    """{"pixel_mean", "pixel_std"} (0-1 units) of the checkpoint's image processor (see the module doc)."""
    path = Path(name_or_path).expanduser() / "preprocessor_config.json"
    processor = json.loads(path.read_text()) if path.is_file() else {}
    if processor.get("do_normalize"):
        return {"pixel_mean": list(processor["image_mean"]), "pixel_std": list(processor["image_std"])}
    return {"pixel_mean": [0.0, 0.0, 0.0], "pixel_std": [1.0, 1.0, 1.0]}


def convert_rtdetr(name_or_path: str, revision: str | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A transformers RT-DETR checkpoint (local folder or Hub id with config.json + safetensors) ->
    (config dict for `Segmenter.from_config`, with the input normalisation, and a state dict loading into it
    with strict=True)."""
    config, state_dict = read_hf_checkpoint(name_or_path, revision=revision)
    model_config = {**segmenter_config_from_hf(config), **normalization(name_or_path)}
    return model_config, convert_rtdetr_state_dict(state_dict, config, source=name_or_path)
