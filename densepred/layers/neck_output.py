"""What every neck returns, so any head can sit on any neck."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class NeckOutput:
    """Output of a neck (pixel decoder).

    mask_features: (B, mask_dim, H/4, W/4), the per-pixel embeddings mask logits are computed against.
    multi_scale_features: maps for the transformer decoder, coarse to fine, each (B, out_channels, h_i, w_i).
        MaskFormer-style necks give one map (the decoder's input); Mask2Former-style necks give three
        (strides 32, 16, 8). Detection necks (mask_dim None) give no mask features and their maps fine to coarse.
    strides: the stride of each map of multi_scale_features (same order), where the neck reports it.
    """

    mask_features: torch.Tensor | None
    multi_scale_features: list[torch.Tensor] = field(default_factory=list)
    strides: list[int] | None = None
