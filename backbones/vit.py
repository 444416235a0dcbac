"""Plain ViT backbones: DINOv2, DINOv2 with registers, DINOv3, EVA-02, and any timm VisionTransformer / Eva.

The transformers ViT backbone API (`Dinov2Backbone`, `Dinov2WithRegistersBackbone`, `DINOv3ViTBackbone`):
`stage_names = ["stem", "stage1", ..., "stageN"]` (N = depth; the stem is the embedding output), each
stage with the embedding width and the patch stride; every selected stage is returned as an NCHW map with
the class and register tokens dropped, after the ViT's final LayerNorm when `apply_layernorm` (as
transformers' option of that name).

The model is timm's (`timm.create_model(model_name, **timm_kwargs)`; state-dict layout `vit.<timm name>`).
The blocks run here one by one: the embeddings are a stage, only the blocks up to the last selected one
run, and each block is a stage (`activation_checkpointing=[backbone]` recomputes it). Any input size: the input is
zero-padded bottom/right to a multiple of the patch size, the absolute position embeddings are resampled
to the grid bicubically, without antialiasing as DINOv2 does, or with it (`pos_embed_antialias=True`, the
default of the DINOv2-with-registers models, as their release and transformers do, and timm's
`dynamic_img_size` resampling), and rotary embeddings (DINOv3, EVA-02) are made for the grid. Maps are
ceil(H / p) x ceil(W / p) for patch size p.

`pyramid` (`SimpleFeaturePyramid` arguments: `mode`, `strides`, `channels`) turns the selected maps into
the multi-scale levels necks read; `channels` and `strides` then describe those levels. `layer_decay` is
this backbone's layer-wise learning-rate decay, read by the optimizer builder (`densepred.engine.optim`)
with `num_layers` and `lr_layer_id`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.models import model_entrypoint, split_model_name_tag
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ._registry import register_backbone, register_class
from .base import Backbone, TokenContinuation
from .pyramid import SimpleFeaturePyramid

# The timm modules whose models are VisionTransformer / Eva.
VIT_MODULES = ("timm.models.vision_transformer", "timm.models.eva")
# Parameters of the embedding stage besides the patch embedding's (timm names, on the timm model).
EMBEDDING_PARAMETERS = ("cls_token", "reg_token", "pos_embed")


def _pyramid_config(pyramid: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The pyramid settings as plain JSON values (a Hydra DictConfig included); unknown keys are refused."""
    if not pyramid:
        return None
    unknown = set(pyramid) - {"mode", "strides", "channels"}
    if unknown:
        raise ValueError(f"pyramid takes the keys mode, strides and channels; got {sorted(unknown)}")
    return {
        "mode": str(pyramid.get("mode", "simple")),
        "strides": [int(s) for s in pyramid.get("strides", (4, 8, 16, 32))],
        "channels": int(pyramid.get("channels", 256)),
    }


@register_class
class ViTBackbone(Backbone):
    family = "vit"
    config_target = "densepred.backbones.ViTBackbone"

    def __init__(
        self,
        model_name: str,
        out_features: Sequence[str] | None = None,
        out_indices: Sequence[int] | None = None,
        apply_layernorm: bool = True,
        pyramid: Mapping[str, Any] | None = None,
        layer_decay: float = 1.0,
        drop_path_rate: float = 0.0,
        freeze_at: int = -1,
        pos_embed_antialias: bool = False,
        in_channels: int = 3,
        **timm_kwargs: Any,
    ) -> None:
        """`model_name`: a timm VisionTransformer / Eva architecture (`vit_small_patch14_dinov2`); `timm_kwargs`
        override its arguments (`depth`, `embed_dim`, `img_size`, ...). `pyramid`: None (the ViT's own maps) or
        {"mode": "simple" | "per_block", "strides": [4, 8, 16, 32], "channels": 256}; `freeze_at`: -1 nothing,
        0 the embeddings, N the embeddings and blocks 1..N."""
        if not timm.is_model(model_name):
            raise ValueError(f"unknown timm model {model_name!r}: ViTBackbone takes a timm ViT architecture")
        module = model_entrypoint(split_model_name_tag(model_name)[0]).__module__
        if module not in VIT_MODULES:
            raise ValueError(
                f"{model_name!r} is a model of {module}: ViTBackbone takes timm VisionTransformer or Eva models "
                "(timm.models.vision_transformer, timm.models.eva)"
            )
        vit = timm.create_model(
            model_name,
            pretrained=False,
            num_classes=0,
            global_pool="",
            dynamic_img_size=True,
            drop_path_rate=drop_path_rate,
            in_chans=in_channels,
            **timm_kwargs,
        )
        patch = tuple(vit.patch_embed.patch_size)
        if not isinstance(vit, (VisionTransformer, Eva)) or patch[0] != patch[1] or getattr(vit, "rope_mixed", False):
            raise ValueError(
                f"{model_name!r} ({type(vit).__name__}): ViTBackbone takes timm VisionTransformer or Eva models "
                "with square patches and one rotary embedding for all blocks"
            )
        depth = len(vit.blocks)
        super().__init__(
            stage_names=["stem", *(f"stage{i}" for i in range(1, depth + 1))],
            stage_channels=[vit.embed_dim] * (depth + 1),
            stage_strides=[patch[0]] * (depth + 1),
            out_features=out_features,
            out_indices=out_indices,
            in_channels=in_channels,
        )
        pyramid = _pyramid_config(pyramid)
        self._set_config(
            model_name=model_name,
            apply_layernorm=apply_layernorm,
            pyramid=pyramid,
            layer_decay=layer_decay,
            drop_path_rate=drop_path_rate,
            freeze_at=freeze_at,
            pos_embed_antialias=pos_embed_antialias,
            in_channels=in_channels,
            **timm_kwargs,
        )
        self.vit = vit
        self.patch_size = patch[0]
        self.apply_layernorm = apply_layernorm
        self.layer_decay = layer_decay
        self.pos_embed_antialias = pos_embed_antialias
        self.pyramid = SimpleFeaturePyramid(vit.embed_dim, patch[0], **pyramid) if pyramid else None
        if not apply_layernorm:  # the final norm is then unused: kept for loading, not trained (DDP needs that)
            vit.norm.requires_grad_(False)
        self._check_pyramid_inputs()
        self.freeze_stages(freeze_at)

    # ---- selection and description --------------------------------------------------------------
    def _check_pyramid_inputs(self) -> None:
        if self.pyramid is not None and len(self._out_features) != self.pyramid.inputs_needed():
            raise ValueError(
                f"the {self.pyramid.mode!r} pyramid takes {self.pyramid.inputs_needed()} selected stage(s), got "
                f"out_features={self._out_features}: 'simple' builds every level from one block "
                "(e.g. out_features=['stage12']), 'per_block' one level per block (e.g. out_indices=[3, 6, 9, 12])"
            )

    def set_outputs(self, out_features: Sequence[str] | None = None, out_indices: Sequence[int] | None = None) -> None:
        """Select other blocks; with a pyramid, the selection must still feed it (else ValueError, unchanged)."""
        previous = self._out_features, self._out_indices
        super().set_outputs(out_features, out_indices)
        try:
            self._check_pyramid_inputs()
        except ValueError:
            self._out_features, self._out_indices = previous
            raise

    @property
    def channels(self) -> list[int]:
        """Channels of each output: the pyramid's levels, else the selected stages'."""
        return list(self.pyramid.channels) if self.pyramid is not None else super().channels

    @property
    def strides(self) -> list[int]:
        """Stride of each output: the pyramid's levels, else the patch size for every selected stage."""
        return list(self.pyramid.strides) if self.pyramid is not None else super().strides

    @property
    def pixel_mean(self) -> tuple[float, ...]:
        """The timm `pretrained_cfg` mean of the architecture (ImageNet's for DINOv2 / DINOv3, CLIP's for EVA-02)."""
        return tuple(float(v) for v in self.vit.pretrained_cfg.get("mean") or super().pixel_mean)

    @property
    def pixel_std(self) -> tuple[float, ...]:
        return tuple(float(v) for v in self.vit.pretrained_cfg.get("std") or super().pixel_std)

    # ---- fine-tuning: freezing and layer-wise lr decay ------------------------------------------
    def _embedding_parameters(self) -> list[nn.Parameter]:
        return [p for p in (getattr(self.vit, name, None) for name in EMBEDDING_PARAMETERS) if p is not None]

    def stage_modules(self) -> list[list[nn.Module]]:
        return [[self.vit.patch_embed, self.vit.norm_pre], *([block] for block in self.vit.blocks)]

    def freeze_stages(self, freeze_at: int) -> None:
        """As `Backbone.freeze_stages`; freezing the stem also freezes the class / register tokens and the
        position embeddings."""
        super().freeze_stages(freeze_at)
        if freeze_at >= 0:
            for parameter in self._embedding_parameters():
                parameter.requires_grad_(False)

    @property
    def num_layers(self) -> int:
        """Blocks of the ViT (the layers of layer-wise lr decay are 0..num_layers + 1)."""
        return len(self.vit.blocks)

    def lr_layer_id(self, name: str) -> int:
        """Layer of parameter `name` (relative to this backbone) for layer-wise lr decay: 0 the embeddings,
        i block i (1-based), num_layers + 1 the rest (final norm, pyramid)."""
        if name.startswith("vit.blocks."):
            return int(name.split(".")[2]) + 1
        if name.startswith(("vit.patch_embed.", "vit.norm_pre.")) or name.removeprefix("vit.") in EMBEDDING_PARAMETERS:
            return 0
        return self.num_layers + 1

    def adapt_pretrained(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Weights of this ViT at another patch size or position grid (DINOv2's 14 px patches at 518 px for a
        16 px ViT at 640 px, as EoMT trains) resampled to its own, as timm's loader does
        (`vision_transformer.checkpoint_filter_fn`): the patch embedding by FlexiViT's pseudo-inverse resize,
        the position embeddings bicubically, both antialiased. Weights of other widths are left to fail."""
        vit = self.vit
        patch = state_dict.get("vit.patch_embed.proj.weight")
        own = vit.patch_embed.proj.weight
        if patch is not None and patch.shape[:2] == own.shape[:2] and patch.shape[2:] != own.shape[2:]:
            state_dict["vit.patch_embed.proj.weight"] = resample_patch_embed(
                patch, list(own.shape[2:]), interpolation="bicubic", antialias=True
            )
        pos_embed = state_dict.get("vit.pos_embed")
        if pos_embed is not None and vit.pos_embed is not None and pos_embed.shape[2:] == vit.pos_embed.shape[2:]:
            if pos_embed.shape[1] != vit.pos_embed.shape[1]:
                state_dict["vit.pos_embed"] = resample_abs_pos_embed(
                    pos_embed,
                    new_size=vit.patch_embed.grid_size,
                    num_prefix_tokens=0 if vit.no_embed_class else vit.num_prefix_tokens,
                    interpolation="bicubic",
                    antialias=True,
                )
        return state_dict

    # ---- forward --------------------------------------------------------------------------------
    def _embed(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int]]:
        """(B, C, H, W), H and W multiples of the patch -> (tokens (B, prefix + h * w, D), rotary embedding
        or None, grid (h, w))."""
        vit = self.vit
        x = vit.patch_embed(pixel_values)  # (B, h, w, D): timm's patch embedding is NHWC with dynamic_img_size
        batch, height, width, dim = x.shape
        x = x.reshape(batch, height * width, dim)
        pos_embed = None
        if vit.pos_embed is not None:
            pos_embed = resample_abs_pos_embed(
                vit.pos_embed,
                new_size=(height, width),
                old_size=vit.patch_embed.grid_size,
                num_prefix_tokens=0 if vit.no_embed_class else vit.num_prefix_tokens,
                antialias=self.pos_embed_antialias,
            )
        prefix = [token.expand(batch, -1, -1) for token in (vit.cls_token, vit.reg_token) if token is not None]
        if pos_embed is not None and vit.no_embed_class:  # DINOv2-reg: the position embeddings skip the prefix
            x = x + pos_embed
        x = torch.cat([*prefix, x], dim=1)
        if pos_embed is not None and not vit.no_embed_class:
            x = x + pos_embed
        rope = vit.rope.get_embed(shape=(height, width)) if getattr(vit, "rope", None) is not None else None
        return vit.norm_pre(vit.pos_drop(x)), rope, (height, width)

    def _map(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, prefix + h * w, D) tokens -> (B, D, h, w) map of the patch tokens (normed if `apply_layernorm`)."""
        patches = tokens[:, self.vit.num_prefix_tokens :]
        if self.apply_layernorm:
            patches = self.vit.norm(patches)
        return patches.reshape(patches.shape[0], *grid, -1).permute(0, 3, 1, 2)

    def _pad(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Zero-pad (B, C, H, W) bottom/right to multiples of the patch size."""
        height, width = pixel_values.shape[-2:]
        p = self.patch_size
        if torch.compiler.is_exporting() or height % p or width % p:  # exported: sizes symbolic, pad always
            pixel_values = F.pad(pixel_values, (0, (-width) % p, 0, (-height) % p))
        return pixel_values

    def continuation(self, pixel_values: torch.Tensor, num_blocks: int) -> TokenContinuation:
        """The embeddings and the first depth - `num_blocks` blocks run; the last `num_blocks` blocks, the tokens
        and the final norm handed over (`base.TokenContinuation`). ViTs with absolute position embeddings
        only: a head's extra tokens have no place in a rotary embedding (EVA-02, DINOv3)."""
        if isinstance(self.vit, Eva):
            raise ValueError(
                f"{self.config['model_name']!r} uses rotary position embeddings: a head that continues the backbone "
                "takes a ViT with absolute position embeddings (DINOv2, DINOv2 with registers)"
            )
        depth = len(self.vit.blocks)
        if not 0 < num_blocks <= depth:
            raise ValueError(
                f"backbone_blocks={num_blocks}: choose 1 to {depth}, the depth of {self.config['model_name']!r}"
            )
        tokens, _, grid = self._embed(self._pad(pixel_values))
        for block in self.vit.blocks[: depth - num_blocks]:
            tokens = block(tokens)
        return TokenContinuation(
            tokens=tokens,
            num_prefix_tokens=self.vit.num_prefix_tokens,
            grid=grid,
            patch_size=self.patch_size,
            input_size=(pixel_values.shape[-2], pixel_values.shape[-1]),
            blocks=list(self.vit.blocks[depth - num_blocks :]),
            norm=self.vit.norm,
        )

    def forward_features(self, pixel_values: torch.Tensor, positions: list[int]) -> tuple[torch.Tensor, ...]:
        height, width = pixel_values.shape[-2:]
        tokens, rope, grid = self._embed(self._pad(pixel_values))
        block_kwargs = {"rope": rope} if isinstance(self.vit, Eva) else {}
        maps = [self._map(tokens, grid)] if 0 in positions else []
        for position, block in enumerate(self.vit.blocks[: positions[-1]], start=1):
            tokens = block(tokens, **block_kwargs)
            if position in positions:
                maps.append(self._map(tokens, grid))
        if self.pyramid is None:
            return tuple(maps)
        return tuple(self.pyramid(maps, (height, width)))


# ---- named architectures (timm's; pretrained weights: `pretrained=` a transformers / timm checkpoint) -------
@register_backbone
def dinov2_small(**kwargs) -> ViTBackbone:
    """DINOv2 ViT-S/14 (facebook/dinov2-small)."""
    return ViTBackbone("vit_small_patch14_dinov2", **kwargs)


@register_backbone
def dinov2_base(**kwargs) -> ViTBackbone:
    """DINOv2 ViT-B/14 (facebook/dinov2-base)."""
    return ViTBackbone("vit_base_patch14_dinov2", **kwargs)


@register_backbone
def dinov2_large(**kwargs) -> ViTBackbone:
    """DINOv2 ViT-L/14 (facebook/dinov2-large)."""
    return ViTBackbone("vit_large_patch14_dinov2", **kwargs)


@register_backbone
def dinov2_small_reg(**kwargs) -> ViTBackbone:
    """DINOv2 ViT-S/14 with 4 registers (facebook/dinov2-with-registers-small)."""
    return ViTBackbone("vit_small_patch14_reg4_dinov2", **{"pos_embed_antialias": True, **kwargs})


@register_backbone
def dinov2_base_reg(**kwargs) -> ViTBackbone:
    """DINOv2 ViT-B/14 with 4 registers (facebook/dinov2-with-registers-base)."""
    return ViTBackbone("vit_base_patch14_reg4_dinov2", **{"pos_embed_antialias": True, **kwargs})


@register_backbone
def dinov2_large_reg(**kwargs) -> ViTBackbone:
    """DINOv2 ViT-L/14 with 4 registers (facebook/dinov2-with-registers-large)."""
    return ViTBackbone("vit_large_patch14_reg4_dinov2", **{"pos_embed_antialias": True, **kwargs})


@register_backbone
def dinov3_small(**kwargs) -> ViTBackbone:
    """DINOv3 ViT-S/16, 4 registers, RoPE (facebook/dinov3-vits16-pretrain-lvd1689m)."""
    return ViTBackbone("vit_small_patch16_dinov3_qkvb", **kwargs)


@register_backbone
def dinov3_base(**kwargs) -> ViTBackbone:
    """DINOv3 ViT-B/16 (facebook/dinov3-vitb16-pretrain-lvd1689m)."""
    return ViTBackbone("vit_base_patch16_dinov3_qkvb", **kwargs)


@register_backbone
def dinov3_large(**kwargs) -> ViTBackbone:
    """DINOv3 ViT-L/16 (facebook/dinov3-vitl16-pretrain-lvd1689m)."""
    return ViTBackbone("vit_large_patch16_dinov3_qkvb", **kwargs)


@register_backbone
def eva02_small(**kwargs) -> ViTBackbone:
    """EVA-02 S/14, MIM-pretrained (timm/eva02_small_patch14_224.mim_in22k)."""
    return ViTBackbone("eva02_small_patch14_224", **kwargs)


@register_backbone
def eva02_base(**kwargs) -> ViTBackbone:
    """EVA-02 B/14, MIM-pretrained (timm/eva02_base_patch14_224.mim_in22k)."""
    return ViTBackbone("eva02_base_patch14_224", **kwargs)


@register_backbone
def eva02_large(**kwargs) -> ViTBackbone:
    """EVA-02 L/14, MIM-pretrained (timm/eva02_large_patch14_224.mim_in22k)."""
    return ViTBackbone("eva02_large_patch14_224", **kwargs)
