"""Convert a transformers `EomtForUniversalSegmentation` checkpoint into our Segmenter config + weights.

`convert_eomt(name_or_path)` reads `config.json` and the safetensors weights of a local folder or a Hub repo
(e.g. `tue-mps/coco_panoptic_eomt_large_640`; transformers v4 and v5 name the weights alike) and returns a
config dict for `Segmenter.from_config`: a `ViTBackbone` (timm's DINOv2-with-registers architecture at the
config's sizes, patch size and register count, layer scale from `layerscale_value`), the identity neck and
an `EoMTHead`, with `num_classes` and `class_names` from `id2label`, and a state dict with `backbone.`,
`head.` keys that loads into that model with strict=True. The DINOv2-style ViT maps onto timm's: q / k / v
packed into `attn.qkv`, `layer_scale{1,2}.lambda1` -> `ls{1,2}.gamma`, the patch-only position embedding
(an `nn.Embedding` of the grid) -> `pos_embed` (no class-token entry: timm's `no_embed_class`), resampled to
other grids at run time as timm's dynamic image size does.

transformers keeps the masked-attention probabilities of its last training step (`attn_mask_probs`) and applies
the mask at inference while one is above 0; this head, as the paper's inference, applies none (a warning says
so when a checkpoint's probabilities are not all 0).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import torch

from densepred.backbones.checkpoint import read_hf_checkpoint
from densepred.convert.labels import class_names
from densepred.utils.state_dict import Rule, pack_qkv, rename_key

BACKBONE_TARGET = "densepred.backbones.ViTBackbone"
NECK_TARGET = "densepred.necks.identity.IdentityNeck"
HEAD_TARGET = "densepred.heads.eomt.EoMTHead"
EXPECTED = "EomtForUniversalSegmentation"
# The DINOv2-with-registers timm architecture; the config's sizes override its own.
TIMM_MODEL = "vit_small_patch14_reg4_dinov2"

# transformers' EomtConfig defaults: config.json may leave out keys that keep them.
HF_DEFAULTS: dict[str, Any] = {
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.0,
    "attention_dropout": 0.0,
    "layer_norm_eps": 1e-6,
    "image_size": 640,
    "patch_size": 16,
    "num_channels": 3,
    "mlp_ratio": 4,
    "layerscale_value": 1.0,
    "drop_path_rate": 0.0,
    "num_upscale_blocks": 2,
    "use_swiglu_ffn": False,
    "num_blocks": 4,
    "num_queries": 200,
    "num_register_tokens": 4,
}

BLOCK = r"layers\.(\d+)\."
RULES: list[Rule] = [
    (r"embeddings\.cls_token", "backbone.vit.cls_token"),
    (r"embeddings\.register_tokens", "backbone.vit.reg_token"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"backbone.vit.patch_embed.proj.\1"),
    (BLOCK + r"(norm[12])\.(weight|bias)", r"backbone.vit.blocks.\1.\2.\3"),
    (BLOCK + r"attention\.out_proj\.(weight|bias)", r"backbone.vit.blocks.\1.attn.proj.\2"),
    (BLOCK + r"layer_scale([12])\.lambda1", r"backbone.vit.blocks.\1.ls\2.gamma"),
    (BLOCK + r"mlp\.(fc[12])\.(weight|bias)", r"backbone.vit.blocks.\1.mlp.\2.\3"),
    (r"layernorm\.(weight|bias)", r"backbone.vit.norm.\1"),
    (r"query\.weight", "head.query.weight"),
    (r"upscale_block\.block\.(\d+)\.(conv[12])\.(weight|bias)", r"head.upscale_blocks.\1.\2.\3"),
    (r"upscale_block\.block\.(\d+)\.layernorm2d\.(weight|bias)", r"head.upscale_blocks.\1.norm.\2"),
    (r"mask_head\.(fc[123])\.(weight|bias)", r"head.mask_head.\1.\2"),
    (r"class_predictor\.(weight|bias)", r"head.class_embed.\1"),
]
QKV = re.compile(BLOCK + r"attention\.([qkv])_proj\.(weight|bias)")
POSITION_EMBEDDING = "embeddings.position_embeddings.weight"
MASK_PROBS = "attn_mask_probs"
# Not model weights: the loss's class weights, the recomputed position ids.
IGNORED = ("criterion.empty_weight", "embeddings.position_ids")

logger = logging.getLogger(__name__)


def segmenter_config_from_hf(config: Mapping[str, Any]) -> dict[str, Any]:
    """transformers EomtConfig (as a dict) -> config dict for `Segmenter.from_config`."""
    if config.get("model_type") != "eomt":
        raise ValueError(
            f"expected an EoMT checkpoint (config.json model_type 'eomt'), got {config.get('model_type')!r}"
        )
    names = class_names(config)
    config = {**HF_DEFAULTS, **config}
    for key, supported in (("hidden_act", "gelu"), ("use_swiglu_ffn", False), ("layer_norm_eps", 1e-6)):
        if config[key] != supported:
            raise ValueError(
                f"config.json sets {key}={config[key]!r}; the ViT backbone converts only {key}={supported!r} "
                "(the released EoMT models)"
            )
    depth = int(config["num_hidden_layers"])
    backbone = {
        "_target_": BACKBONE_TARGET,
        "model_name": TIMM_MODEL,
        "embed_dim": config["hidden_size"],
        "depth": depth,
        "num_heads": config["num_attention_heads"],
        "mlp_ratio": config["mlp_ratio"],
        "patch_size": config["patch_size"],
        "img_size": config["image_size"],
        "init_values": config["layerscale_value"],
        "reg_tokens": config["num_register_tokens"],
        "pos_drop_rate": config["hidden_dropout_prob"],
        "attn_drop_rate": config["attention_dropout"],
        "drop_path_rate": config["drop_path_rate"],
        "in_channels": config["num_channels"],
        "pos_embed_antialias": True,
        "out_features": [f"stage{depth}"],
    }
    head = {
        "_target_": HEAD_TARGET,
        "num_queries": config["num_queries"],
        "num_blocks": config["num_blocks"],
        "num_upscale_blocks": config["num_upscale_blocks"],
    }
    return {
        "backbone": backbone,
        "neck": {"_target_": NECK_TARGET},
        "head": head,
        "num_classes": len(names),
        "class_names": names,
    }


def convert_eomt_state_dict(
    state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """transformers EomtForUniversalSegmentation weights -> our `backbone.` / `head.` keys."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if key in IGNORED:
            continue
        if key == MASK_PROBS:
            if bool((value != 0).any()):
                logger.warning(
                    "%s: attn_mask_probs=%s: transformers applies masked attention at inference with these "
                    "probabilities; EoMTHead (the paper's inference) applies none",
                    source,
                    [round(float(v), 4) for v in value],
                )
        elif match := QKV.fullmatch(key):
            qkv.setdefault((match[1], match[3]), {})[match[2]] = value
        elif key == POSITION_EMBEDDING:
            out["backbone.vit.pos_embed"] = value[None]
        elif key == "embeddings.register_tokens" and value.numel() == 0:
            continue  # no registers: timm has no reg_token
        else:
            error = f"{source}: unexpected weight {key!r}; is this an {EXPECTED} checkpoint?"
            out[rename_key(key, RULES, error)] = value
    for (block, kind), parts in sorted(qkv.items()):
        error = f"{source}: ViT block {block} lacks one of attention.{{q,k,v}}_proj.{kind}"
        out[f"backbone.vit.blocks.{block}.attn.qkv.{kind}"] = pack_qkv(parts, error)
    return out


def convert_eomt(name_or_path: str, revision: str | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A transformers EoMT checkpoint (local folder or Hub id with config.json + safetensors) -> (config dict
    for `Segmenter.from_config`, state dict loading into it with strict=True)."""
    config, state_dict = read_hf_checkpoint(name_or_path, revision=revision)
    return segmenter_config_from_hf(config), convert_eomt_state_dict(state_dict, source=name_or_path)
