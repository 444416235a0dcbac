"""transformers ResNet / Swin / ConvNeXt / DINOv2 / DINOv3-ViT checkpoints -> native backbones (architecture
and weights).

`native_backbone_from_hf_config` reads a transformers backbone config (`config.json` as a dict) and
returns the native class and its constructor arguments; `split_hf_backbone_state_dict` renames the
weights to the native (timm) layout. Both key layouts are read:

- v4, what Hub files hold: Swin `attention.self.{query,key,value}`, `attention.output.dense`,
  `intermediate.dense`, `output.dense`; `SwinBackbone` weights without the `swin.` prefix;
- v5, what transformers 5 models hold in memory: `attention.{q,k,v,o}_proj`,
  `attention.relative_position_bias.relative_position_bias_table`, `mlp.fc{1,2}`.

ResNet and ConvNeXt names are the same in both. RT-DETR's ResNet-vd (`rt_detr_resnet`, `RTDetrResNetBackbone`)
becomes the native ResNet with `variant="d"`: its three stem convs `embedder.embedder.{0,1,2}` are timm's deep
stem `conv1.{0,3,6}` + `bn1`, its shortcuts (`shortcut[.1].{convolution,normalization}`, after the average pool)
`downsample.{1,2}`. The plain ViTs (`dinov2`, `dinov2_with_registers`,
`dinov3_vit`) become `ViTBackbone` on the matching timm architecture: DINOv2 v4 `attention.attention.{query,
key,value}` / `attention.output.dense`, v5 `attention.{q,k,v,o}_proj`; DINOv3 `layer.N` on disk,
`model.layer.N` in transformers 5 models. DINOv2-with-registers' class-token position embedding is folded
into the class token (timm's `no_embed_class` layout, as timm's own DINOv2 converter does).

The bare model, the classification model (prefix `resnet.` / `swin.` / `convnext.` / `dinov2.`, plus a
classifier) and the `*Backbone` class (plus `hidden_states_norms`, our `out_norms`) are accepted;
MaskFormer's Swin (`maskformer-swin`, prefix `model.`, `hidden_states_norms.0..3`) too. Swin's patch
merging sits at the end of stage N in transformers and at the start of stage N + 1 here (timm's layout);
q, k, v become one `qkv` projection.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from densepred.utils.state_dict import Rule, pack_qkv, rename_key

# Where each family's weights sit inside the transformers classes (stripped before renaming).
PREFIXES = {
    "resnet": ("resnet.",),
    "rt_detr_resnet": ("resnet.",),
    "swin": ("swin.",),
    "maskformer-swin": ("model.",),
    "convnext": ("convnext.",),
}
# Weights of transformers models that are not part of the backbone (or are recomputed buffers).
NOT_BACKBONE = re.compile(
    r"(classifier|pooler|layernorm|decoder|embeddings\.mask_token)\..*|classifier|embeddings\.mask_token"
    r"|.*\.relative_position_index|.*\.attn_mask"
)


def _resnet_layer(m: re.Match) -> str:
    """`encoder.stages.S.layers.L.{shortcut | layer.J}.{convolution | normalization}.*` -> timm's names."""
    stage, layer, part, kind, rest = int(m[1]) + 1, m[2], m[3], m[4], m[5]
    if part == "shortcut":
        name = "downsample.0" if kind == "convolution" else "downsample.1"
    else:
        index = int(part[-1]) + 1
        name = f"conv{index}" if kind == "convolution" else f"bn{index}"
    return f"layer{stage}.{layer}.{name}.{rest}"


RESNET_RULES: list[Rule] = [
    (r"embedder\.embedder\.convolution\.(.*)", r"conv1.\1"),
    (r"embedder\.embedder\.normalization\.(.*)", r"bn1.\1"),
    (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.(shortcut|layer\.\d)\.(convolution|normalization)\.(.*)", _resnet_layer),
]


def _resnet_vd_stem(m: re.Match) -> str:
    """`embedder.embedder.I.{convolution | normalization}.*` -> timm's deep stem `conv1.{0,1,3,4,6}` / `bn1`."""
    index, kind, rest = int(m[1]), m[2], m[3]
    if kind == "normalization" and index == 2:
        return f"bn1.{rest}"
    return f"conv1.{3 * index + (kind == 'normalization')}.{rest}"


RESNET_VD_RULES: list[Rule] = [
    (r"embedder\.embedder\.(\d)\.(convolution|normalization)\.(.*)", _resnet_vd_stem),
    (
        r"encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.(?:1\.)?(convolution|normalization)\.(.*)",
        lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.{1 if m[3] == 'convolution' else 2}.{m[4]}",
    ),
    *RESNET_RULES[2:],
]

SWIN_BLOCK = r"encoder\.layers\.(\d+)\.blocks\.(\d+)\."
SWIN_RULES: list[Rule] = [
    (r"embeddings\.patch_embeddings\.projection\.(.*)", r"patch_embed.proj.\1"),
    (r"embeddings\.norm\.(.*)", r"patch_embed.norm.\1"),
    (SWIN_BLOCK + r"layernorm_before\.(.*)", r"layers.\1.blocks.\2.norm1.\3"),
    (SWIN_BLOCK + r"layernorm_after\.(.*)", r"layers.\1.blocks.\2.norm2.\3"),
    (
        SWIN_BLOCK + r"attention\.(?:self|relative_position_bias)\.relative_position_bias_table",
        r"layers.\1.blocks.\2.attn.relative_position_bias_table",
    ),
    (SWIN_BLOCK + r"attention\.(?:output\.dense|o_proj)\.(.*)", r"layers.\1.blocks.\2.attn.proj.\3"),
    (SWIN_BLOCK + r"(?:intermediate\.dense|mlp\.fc1)\.(.*)", r"layers.\1.blocks.\2.mlp.fc1.\3"),
    (SWIN_BLOCK + r"(?:output\.dense|mlp\.fc2)\.(.*)", r"layers.\1.blocks.\2.mlp.fc2.\3"),
    (r"encoder\.layers\.(\d+)\.downsample\.(.*)", lambda m: f"layers.{int(m[1]) + 1}.downsample.{m[2]}"),
    # MaskFormer's Swin keeps one norm per stage in a list (index 0 = stage1).
    (r"hidden_states_norms\.(\d+)\.(.*)", lambda m: f"out_norms.stage{int(m[1]) + 1}.{m[2]}"),
    (r"hidden_states_norms\.(.*)", r"out_norms.\1"),
]
# q, k, v projections: v4 `attention.self.query`, v5 `attention.q_proj`; packed into timm's `attn.qkv`.
SWIN_QKV = re.compile(SWIN_BLOCK + r"attention\.(?:self\.(query|key|value)|([qkv])_proj)\.(weight|bias)")

CONVNEXT_BLOCK = r"encoder\.stages\.(\d+)\.layers\.(\d+)\."
CONVNEXT_RULES: list[Rule] = [
    (r"embeddings\.patch_embeddings\.(.*)", r"stem.0.\1"),
    (r"embeddings\.layernorm\.(.*)", r"stem.1.\1"),
    (r"encoder\.stages\.(\d+)\.downsampling_layer\.(\d)\.(.*)", r"stages.\1.downsample.\2.\3"),
    (CONVNEXT_BLOCK + r"dwconv\.(.*)", r"stages.\1.blocks.\2.conv_dw.\3"),
    (CONVNEXT_BLOCK + r"layernorm\.(.*)", r"stages.\1.blocks.\2.norm.\3"),
    (CONVNEXT_BLOCK + r"pwconv1\.(.*)", r"stages.\1.blocks.\2.mlp.fc1.\3"),
    (CONVNEXT_BLOCK + r"pwconv2\.(.*)", r"stages.\1.blocks.\2.mlp.fc2.\3"),
    (CONVNEXT_BLOCK + r"layer_scale_parameter", r"stages.\1.blocks.\2.gamma"),
    (r"hidden_states_norms\.(.*)", r"out_norms.\1"),
]

VIT_BLOCK = r"(?:encoder\.|model\.)?layer\.(\d+)\."
VIT_RULES: list[Rule] = [
    (r"embeddings\.cls_token", "vit.cls_token"),
    (r"embeddings\.register_tokens", "vit.reg_token"),
    (r"embeddings\.position_embeddings", "vit.pos_embed"),
    (r"embeddings\.patch_embeddings(?:\.projection)?\.(weight|bias)", r"vit.patch_embed.proj.\1"),
    (VIT_BLOCK + r"(norm[12])\.(.*)", r"vit.blocks.\1.\2.\3"),
    (VIT_BLOCK + r"attention\.(?:output\.dense|o_proj)\.(.*)", r"vit.blocks.\1.attn.proj.\2"),
    (VIT_BLOCK + r"mlp\.(?:fc1|up_proj)\.(.*)", r"vit.blocks.\1.mlp.fc1.\2"),
    (VIT_BLOCK + r"mlp\.(?:fc2|down_proj)\.(.*)", r"vit.blocks.\1.mlp.fc2.\2"),
    (r"(?:layernorm|norm)\.(.*)", r"vit.norm.\1"),
]
# Layer scale: timm's VisionTransformer `ls1.gamma`, its Eva (DINOv3) `gamma_1`.
VIT_LAYER_SCALE = re.compile(VIT_BLOCK + r"layer_scale([12])\.lambda1")
# q, k, v: DINOv2 v4 `attention.attention.query`, v5 and DINOv3 `attention.q_proj`.
VIT_QKV = re.compile(VIT_BLOCK + r"attention\.(?:attention\.(query|key|value)|([qkv])_proj)\.(weight|bias)")
VIT_NOT_BACKBONE = re.compile(r"embeddings\.mask_token|classifier\..*|rope_embeddings\..*")
VIT_TYPES = ("dinov2", "dinov2_with_registers", "dinov3_vit")

RULES = {
    "resnet": RESNET_RULES,
    "rt_detr_resnet": RESNET_VD_RULES,
    "swin": SWIN_RULES,
    "maskformer-swin": SWIN_RULES,
    "convnext": CONVNEXT_RULES,
}
# Keys only one family has: used to tell a bare transformers state dict's family (the ViTs first: DINOv2
# shares Swin's patch-embedding name).
SIGNATURES = {
    "dinov3_vit": ".mlp.up_proj.",
    "dinov2_with_registers": "embeddings.register_tokens",
    "dinov2": ".layer_scale1.lambda1",
    "resnet": "embedder.embedder.",
    "swin": "embeddings.patch_embeddings.projection.",
    "convnext": "encoder.stages.",
}


def _require(config: Mapping[str, Any], key: str, supported: Any, default: Any) -> None:
    value = config.get(key, default)
    if value != supported:
        raise ValueError(
            f"config.json of this {config.get('model_type')} checkpoint sets {key}={value!r}; the native backbone "
            f"supports only {key}={supported!r}. Use backbones.TimmBackbone or a checkpoint with {key}={supported!r}."
        )


def _selection(config: Mapping[str, Any]) -> dict[str, Any]:
    return {"out_features": list(config["out_features"])} if config.get("out_features") else {}


def hf_family(model_type: str) -> str:
    """The `Backbone.family` a transformers model type loads into ("maskformer-swin" -> "swin", "dinov2" -> "vit")."""
    if model_type == "rt_detr_resnet":
        return "resnet"
    return "vit" if model_type in VIT_TYPES else model_type.removeprefix("maskformer-")


def _vit_from_hf_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A transformers DINOv2 / DINOv2-with-registers / DINOv3-ViT config -> `ViTBackbone` kwargs: the timm
    architecture of that family with the config's sizes."""
    model_type = config["model_type"]
    _require(config, "hidden_act", "gelu", "gelu")
    hidden = config.get("hidden_size", 768)
    kwargs = {
        "embed_dim": hidden,
        "depth": config.get("num_hidden_layers", 12),
        "num_heads": config.get("num_attention_heads", 12),
        "patch_size": config.get("patch_size", 14 if model_type != "dinov3_vit" else 16),
        "img_size": config.get("image_size", 224),
        "init_values": config.get("layerscale_value", 1.0),
        "drop_path_rate": config.get("drop_path_rate", 0.0),
        "in_channels": config.get("num_channels", 3),
        "apply_layernorm": config.get("apply_layernorm", True),
    }
    if model_type == "dinov3_vit":
        _require(config, "use_gated_mlp", False, False)
        _require(config, "layer_norm_eps", 1e-5, 1e-5)
        _require(config, "key_bias", False, False)
        _require(config, "proj_bias", True, True)
        _require(config, "mlp_bias", True, True)
        qkv_bias = config.get("query_bias", True)
        _require(config, "value_bias", qkv_bias, True)  # timm's Eva has both q and v biases, or neither
        model_name = "vit_small_patch16_dinov3_qkvb" if qkv_bias else "vit_small_patch16_dinov3"
        kwargs |= {
            "mlp_ratio": config.get("intermediate_size", 4 * hidden) / hidden,
            "num_reg_tokens": config.get("num_register_tokens", 0),
            "rope_temperature": config.get("rope_theta", 100.0),
        }
    else:
        _require(config, "use_swiglu_ffn", False, False)
        _require(config, "layer_norm_eps", 1e-6, 1e-6)
        kwargs |= {"mlp_ratio": config.get("mlp_ratio", 4), "qkv_bias": config.get("qkv_bias", True)}
        model_name = "vit_small_patch14_dinov2"
        if model_type == "dinov2_with_registers":
            model_name = "vit_small_patch14_reg4_dinov2"
            kwargs |= {"reg_tokens": config.get("num_register_tokens", 4), "pos_embed_antialias": True}
    return {"model_name": model_name, **kwargs, **_selection(config)}


def native_backbone_from_hf_config(config: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """A transformers ResNet / Swin / ConvNeXt (or MaskFormer-Swin) config dict -> (`_target_`, constructor kwargs).

    The kwargs rebuild the same architecture natively (with the config's `out_features`), e.g.
    `("densepred.backbones.SwinBackbone", {"embed_dim": 96, "depths": [2, 2, 6, 2], ...})`. Settings the native
    models do not implement (e.g. Swin absolute position embeddings) raise a ValueError naming the key.
    """
    model_type = config.get("model_type")
    if model_type in VIT_TYPES:
        return "densepred.backbones.ViTBackbone", _vit_from_hf_config(config)
    if model_type in ("resnet", "rt_detr_resnet"):
        _require(config, "downsample_in_first_stage", False, False)
        _require(config, "downsample_in_bottleneck", False, False)
        _require(config, "hidden_act", "relu", "relu")
        layer_type = config.get("layer_type", "bottleneck")
        if layer_type not in ("basic", "bottleneck"):
            raise ValueError(f"config.json sets layer_type={layer_type!r}; expected 'basic' or 'bottleneck'")
        return "densepred.backbones.ResNetBackbone", {
            "block": layer_type,
            "layers": list(config.get("depths", [3, 4, 6, 3])),
            "stage_channels": list(config.get("hidden_sizes", [256, 512, 1024, 2048])),
            "stem_channels": config.get("embedding_size", 64),
            "in_channels": config.get("num_channels", 3),
            **({"variant": "d"} if model_type == "rt_detr_resnet" else {}),
            **_selection(config),
        }
    if model_type in ("swin", "maskformer-swin"):
        _require(config, "patch_size", 4, 4)
        _require(config, "use_absolute_embeddings", False, False)
        _require(config, "hidden_act", "gelu", "gelu")
        _require(config, "layer_norm_eps", 1e-5, 1e-5)
        return "densepred.backbones.SwinBackbone", {
            "embed_dim": config.get("embed_dim", 96),
            "depths": list(config.get("depths", [2, 2, 6, 2])),
            "num_heads": list(config.get("num_heads", [3, 6, 12, 24])),
            "window_size": config.get("window_size", 7),
            "mlp_ratio": config.get("mlp_ratio", 4.0),
            "qkv_bias": config.get("qkv_bias", True),
            "drop_path_rate": config.get("drop_path_rate", 0.1),
            "in_channels": config.get("num_channels", 3),
            **_selection(config),
        }
    if model_type == "convnext":
        _require(config, "patch_size", 4, 4)
        _require(config, "hidden_act", "gelu", "gelu")
        depths = list(config.get("depths", [3, 3, 9, 3]))
        _require(config, "num_stages", len(depths), len(depths))
        return "densepred.backbones.ConvNeXtBackbone", {
            "depths": depths,
            "dims": list(config.get("hidden_sizes", [96, 192, 384, 768])),
            "layer_scale_init_value": config.get("layer_scale_init_value", 1e-6) or None,
            "drop_path_rate": config.get("drop_path_rate", 0.0),
            "in_channels": config.get("num_channels", 3),
            **_selection(config),
        }
    raise ValueError(
        f"config.json has model_type={model_type!r}; transformers backbones that load natively are "
        "'resnet', 'rt_detr_resnet', 'swin', 'maskformer-swin', 'convnext', 'dinov2', 'dinov2_with_registers' "
        "and 'dinov3_vit'. "
        "Any timm model loads through backbones.TimmBackbone."
    )


def hf_model_type_of(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The family ('resnet', 'swin', 'convnext') of a transformers state dict without config.json, else None."""
    for model_type, signature in SIGNATURES.items():
        if any(signature in key for key in state_dict):
            return model_type
    return None


def split_hf_backbone_state_dict(
    state_dict: Mapping[str, torch.Tensor], model_type: str, source: str = "checkpoint"
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """transformers ResNet / Swin / ConvNeXt weights (bare, classification or *Backbone class, v4 or v5 names,
    with or without the model prefix) of `model_type` -> (native weights, keys left out as non-backbone
    weights: classifier, pooler, final norm, recomputed buffers)."""
    if model_type in VIT_TYPES:
        return _split_hf_vit_state_dict(state_dict, model_type, source)
    if model_type not in RULES:
        native_backbone_from_hf_config({"model_type": model_type})  # raises the unsupported-type error
    rules, prefixes = RULES[model_type], PREFIXES[model_type]
    converted: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}
    dropped = []
    for key, value in state_dict.items():
        name = next((key[len(p) :] for p in prefixes if key.startswith(p)), key)
        if NOT_BACKBONE.fullmatch(name):
            dropped.append(key)
        elif match := SWIN_QKV.fullmatch(name):
            qkv.setdefault((match[1], match[2], match[5]), {})[(match[3] or match[4])[0]] = value
        else:
            error = (
                f"{source}: {key!r} is not a weight of a transformers {model_type} model; is this checkpoint "
                f"(config.json model_type {model_type!r}) really a {model_type} model?"
            )
            converted[rename_key(name, rules, error)] = value
    for (stage, block, kind), parts in qkv.items():
        error = f"{source}: Swin stage {stage} block {block} lacks one of its query/key/value {kind}s"
        converted[f"layers.{stage}.blocks.{block}.attn.qkv.{kind}"] = pack_qkv(parts, error)
    return converted, dropped


def _split_hf_vit_state_dict(
    state_dict: Mapping[str, torch.Tensor], model_type: str, source: str
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """transformers DINOv2 / DINOv2-with-registers / DINOv3-ViT weights -> `ViTBackbone` weights (timm layout
    under `vit.`), keys left out (mask token, classifier, RoPE buffers)."""
    eva = model_type == "dinov3_vit"  # timm's Eva: `gamma_1`, separate q / v biases, no k bias
    prefix = f"{model_type}."
    converted: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    dropped = []
    for key, value in state_dict.items():
        name = key.removeprefix(prefix)
        if VIT_NOT_BACKBONE.fullmatch(name):
            dropped.append(key)
        elif match := VIT_QKV.fullmatch(name):
            part = (match[2] or match[3])[0]
            if eva and match[4] == "bias":
                converted[f"vit.blocks.{match[1]}.attn.{part}_bias"] = value
            else:
                qkv.setdefault((match[1], match[4]), {})[part] = value
        elif match := VIT_LAYER_SCALE.fullmatch(name):
            converted[f"vit.blocks.{match[1]}." + (f"gamma_{match[2]}" if eva else f"ls{match[2]}.gamma")] = value
        else:
            error = (
                f"{source}: {key!r} is not a weight of a transformers {model_type} model; is this checkpoint "
                f"(config.json model_type {model_type!r}) really a {model_type} model?"
            )
            converted[rename_key(name, VIT_RULES, error)] = value
    for (block, kind), parts in qkv.items():
        error = f"{source}: ViT block {block} lacks one of its query / key / value tensors ({kind})"
        converted[f"vit.blocks.{block}.attn.qkv.{kind}"] = pack_qkv(parts, error)
    if model_type == "dinov2_with_registers" and "vit.pos_embed" in converted:
        pos_embed = converted["vit.pos_embed"]
        converted["vit.cls_token"] = converted["vit.cls_token"] + pos_embed[:, :1]
        converted["vit.pos_embed"] = pos_embed[:, 1:]
    return converted, dropped
