"""DETR's sine position embedding (used by the pixel decoders and the transformer decoders)."""

from __future__ import annotations

import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """DETR's sine position embedding of a map, the same for every image (no padding mask).

    (B, C, H, W) -> (1, 2 * num_pos_feats, H, W): y features first, then x; each alternates sin and cos.
    """

    def __init__(
        self,
        num_pos_feats: int = 128,
        temperature: float = 10000.0,
        normalize: bool = True,
        scale: float = 2 * math.pi,
        offset: float = 0.0,
    ) -> None:
        """`offset` is added to the 1-based positions before normalising: 0 (DETR, Mask2Former) or -0.5
        (Deformable DETR: pixel centres)."""
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        y_embed = torch.arange(1, height + 1, device=x.device, dtype=torch.float32)[:, None].expand(height, width)
        x_embed = torch.arange(1, width + 1, device=x.device, dtype=torch.float32)[None, :].expand(height, width)
        if self.normalize:
            eps = 1e-6
            y_embed = (y_embed + self.offset) / (height + eps) * self.scale
            x_embed = (x_embed + self.offset) / (width + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, device=x.device, dtype=torch.float32)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x_embed[..., None] / dim_t
        pos_y = y_embed[..., None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=-1).flatten(-2)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=-1).flatten(-2)
        return torch.cat((pos_y, pos_x), dim=-1).permute(2, 0, 1)[None].to(x.dtype)
