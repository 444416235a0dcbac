"""Swin Transformer tiny/small/base/large backbones (patch 4; window 7, and window 12 for base/large).

timm provides the parts (patch embedding, window attention with relative position bias, MLP, patch
merging) and the state-dict layout (`patch_embed.*`, `layers.N.downsample.*`, `layers.N.blocks.M.*`).
The block and stage forward are written here because timm fixes each block's window and shift when
the model is built (for one image size, shrinking them on small maps) and rolls before padding. Here,
as in the official Mask2Former Swin and transformers' SwinBackbone (`always_partition=True`), every
block pads its map to a multiple of the window, then odd blocks roll by window // 2, at any input
size: nothing depends on the size the model was built for, and a forward pass mutates nothing.

Each selected output gets a LayerNorm (`out_norms.<stage>`), as HF's SwinBackbone and the official
Mask2Former Swin do. Stages: stem (patch embedding, stride 4), stage1..stage4 (strides 4, 8, 16, 32);
sizes follow ceil(H / 4), then ceil halving.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed
from timm.models.swin_transformer import PatchMerging, WindowAttention, window_partition, window_reverse
from torch import nn

from densepred.utils.recompute import feed_forward

from ._registry import register_backbone, register_class
from .base import Backbone, OutputNorms


def shifted_window_mask(height: int, width: int, window: int, shift: int, device: torch.device) -> torch.Tensor:
    """Attention mask (num_windows, window**2, window**2) for a padded (height, width) map rolled by `shift`.

    Tokens that came from different regions of the unrolled map must not attend to each other:
    0 where allowed, -100 where not (the value transformers and the official code use).
    """

    def regions(size: int) -> torch.Tensor:  # 0, 1, 2 for [0, size-window), [size-window, size-shift), rest
        index = torch.arange(size, device=device)
        return (index >= size - window).long() + (index >= size - shift).long()

    region = (regions(height)[:, None] * 3 + regions(width)[None, :])[None, :, :, None]  # (1, H, W, 1)
    windows = window_partition(region, (window, window)).reshape(-1, window * window)
    different = windows[:, None, :] != windows[:, :, None]
    return torch.zeros(different.shape, device=device).masked_fill(different, -100.0)


class SwinBlock(nn.Module):
    """(Shifted) window attention + MLP, pre-norm, on (B, H, W, C) maps."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shifted: bool,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.shifted = shifted
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads=num_heads, window_size=window_size, qkv_bias=qkv_bias)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)  # no dropout
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """x: (B, H, W, C); `attn_mask` is the stage's shifted-window mask (used by shifted blocks only)."""
        _, height, width, channels = x.shape
        window = self.window_size
        shift = window // 2 if self.shifted else 0
        shortcut = x
        x = self.norm1(x)
        x = F.pad(x, (0, 0, 0, (-width) % window, 0, (-height) % window))
        padded_height, padded_width = x.shape[1], x.shape[2]
        if shift:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        windows = window_partition(x, (window, window)).reshape(-1, window * window, channels)
        windows = self.attn(windows, mask=attn_mask if shift else None)
        x = window_reverse(windows.reshape(-1, window, window, channels), (window, window), padded_height, padded_width)
        if shift:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        x = shortcut + self.drop_path1(x[:, :height, :width])
        # = self.mlp(...): fc1 -> GELU -> fc2, its hidden activations recomputed in backward instead of saved
        return x + self.drop_path2(feed_forward(self.norm2(x), self.mlp.fc1, self.mlp.fc2, "gelu"))


class SwinStage(nn.Module):
    """Optional patch merging (stride 2), then blocks alternating regular and shifted windows."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        downsample: bool,
        drop_path: Sequence[float],
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.downsample = PatchMerging(in_dim, out_dim=dim) if downsample else nn.Identity()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window_size, i % 2 == 1, mlp_ratio, qkv_bias, drop_path[i]) for i in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C_in) -> (B, ceil(H/2), ceil(W/2), C) when downsampling, else (B, H, W, C)."""
        x = self.downsample(x)
        height, width = x.shape[1], x.shape[2]
        window = self.window_size
        attn_mask = None
        if len(self.blocks) > 1:
            padded = (height + (-height) % window, width + (-width) % window)
            attn_mask = shifted_window_mask(*padded, window, window // 2, x.device)
        for block in self.blocks:
            x = block(x, attn_mask)
        return x


@register_class
class SwinBackbone(Backbone):
    family = "swin"
    config_target = "densepred.backbones.SwinBackbone"

    def __init__(
        self,
        embed_dim: int,
        depths: Sequence[int],
        num_heads: Sequence[int],
        window_size: int = 7,
        out_features: Sequence[str] | None = None,
        out_indices: Sequence[int] | None = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        freeze_at: int = -1,
        in_channels: int = 3,
    ) -> None:
        dims = [embed_dim * 2**i for i in range(len(depths))]
        super().__init__(
            stage_names=["stem", *(f"stage{i + 1}" for i in range(len(depths)))],
            stage_channels=[embed_dim, *dims],
            stage_strides=[4, *(4 * 2**i for i in range(len(depths)))],
            out_features=out_features,
            out_indices=out_indices,
            in_channels=in_channels,
        )
        self._set_config(
            embed_dim=embed_dim,
            depths=list(depths),
            num_heads=list(num_heads),
            window_size=window_size,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            drop_path_rate=drop_path_rate,
            freeze_at=freeze_at,
            in_channels=in_channels,
        )
        self.patch_embed = PatchEmbed(
            img_size=None,
            patch_size=4,
            in_chans=in_channels,
            embed_dim=embed_dim,
            norm_layer=nn.LayerNorm,
            output_fmt="NHWC",
            strict_img_size=False,
            dynamic_img_pad=True,
        )
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(
            list(depths)
        )  # floats, on any device
        self.layers = nn.ModuleList(
            SwinStage(
                in_dim=dims[max(i - 1, 0)],
                dim=dims[i],
                depth=depths[i],
                num_heads=num_heads[i],
                window_size=window_size,
                downsample=i > 0,
                drop_path=rates[i].tolist(),
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
            )
            for i in range(len(depths))
        )
        self.out_norms = OutputNorms(nn.LayerNorm, {n: self.out_feature_channels[n] for n in self._out_features})
        self.apply(_init_weights)
        self.freeze_stages(freeze_at)

    def stage_modules(self) -> list[list[nn.Module]]:
        return [[self.patch_embed], *([layer] for layer in self.layers)]

    def _output(self, position: int, x: torch.Tensor) -> torch.Tensor:
        """Normalise a (B, H, W, C) stage output and return it as (B, C, H, W)."""
        return self.out_norms[self.stage_names[position]](x).permute(0, 3, 1, 2)

    def forward_features(self, pixel_values: torch.Tensor, positions: list[int]) -> tuple[torch.Tensor, ...]:
        x = self.patch_embed(pixel_values)
        outputs = [self._output(0, x)] if 0 in positions else []
        for position, layer in enumerate(self.layers[: positions[-1]], start=1):
            x = layer(x)
            if position in positions:
                outputs.append(self._output(position, x))
        return tuple(outputs)


def _init_weights(module: nn.Module) -> None:
    """Swin's initialisation: truncated normal (std 0.02) linear weights, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


_tiny = partial(SwinBackbone, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
_small = partial(SwinBackbone, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
_base = partial(SwinBackbone, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
_large = partial(SwinBackbone, embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48))


@register_backbone
def swin_tiny(**kwargs) -> SwinBackbone:
    return _tiny(window_size=7, **kwargs)


@register_backbone
def swin_small(**kwargs) -> SwinBackbone:
    return _small(window_size=7, **kwargs)


@register_backbone
def swin_base(**kwargs) -> SwinBackbone:
    return _base(window_size=7, **kwargs)


@register_backbone
def swin_base_window12(**kwargs) -> SwinBackbone:
    return _base(window_size=12, **kwargs)


@register_backbone
def swin_large(**kwargs) -> SwinBackbone:
    return _large(window_size=7, **kwargs)


@register_backbone
def swin_large_window12(**kwargs) -> SwinBackbone:
    return _large(window_size=12, **kwargs)
