"""No neck: the backbone's output goes to the head unchanged.

For a head that reads the backbone directly, such as EoMT, which continues a plain ViT's last blocks
(`heads/eomt.py`; the Segmenter hands it the backbone's `TokenContinuation`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn


class IdentityNeck(nn.Module):
    """Passes its input through. `out_channels` and `mask_dim` are the width of the backbone's one output (a
    ViT without a feature pyramid: its embedding width), which the head reads."""

    def __init__(self, in_channels: Sequence[int], in_strides: Sequence[int]) -> None:
        super().__init__()
        if len(in_channels) != 1:
            raise ValueError(
                f"IdentityNeck passes one backbone output through, got {len(in_channels)} (channels "
                f"{list(in_channels)}, strides {list(in_strides)}); use a plain ViT without a feature pyramid "
                "(backbone.pyramid=null, one out_features entry)"
            )
        self.out_channels = int(in_channels[0])
        self.mask_dim = int(in_channels[0])

    def forward(self, features: Any) -> Any:
        return features
