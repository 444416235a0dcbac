"""The exported network: a Segmenter with its input normalisation and padding inside, raw head outputs out."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from densepred.heads.mask_prediction import full_mask_logits
from densepred.segmenter import Segmenter

# The raw head outputs an exported graph returns, in this order, those the head predicts.
RAW_OUTPUTS = ("pred_logits", "pred_masks", "pred_boxes")


class ExportableSegmenter(nn.Module):
    """`Segmenter` as a deployment graph: raw pixels in, raw head predictions out.

    images (B, 3, H, W), uint8 or float in 0-255, any H, W the backbone accepts -> the head's raw outputs
    of `output_names` (of `RAW_OUTPUTS`): `pred_logits` (B, Q, K+1) (a detector's: (B, Q, K) sigmoid logits),
    `pred_masks` (B, Q, Hp/4, Wp/4) mask logits of the padded input, `pred_boxes` (B, Q, 4) (cx, cy, w, h)
    normalised by (Wp, Hp) where the head predicts boxes. The images are
    normalised (`Segmenter.preprocess`) and padded bottom/right with zeros (the mean colour) to multiples of
    `size_divisibility` (Hp, Wp), exactly as a collated batch of one image size (densepred.data.collate).
    """

    def __init__(
        self, segmenter: Segmenter, size_divisibility: int = 32, output_names: Sequence[str] = RAW_OUTPUTS[:2]
    ) -> None:
        super().__init__()
        unknown = sorted(set(output_names) - set(RAW_OUTPUTS))
        if unknown or not output_names:
            raise ValueError(f"output_names={list(output_names)}: choose among {list(RAW_OUTPUTS)}")
        self.segmenter = segmenter
        self.size_divisibility = int(size_divisibility)
        self.output_names = tuple(output_names)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """images (B, 3, H, W) 0-255 -> the outputs of `output_names` (class doc)."""
        height, width = images.shape[-2:]
        divisor = self.size_divisibility
        pixel_values = self.segmenter.preprocess(images)
        pixel_values = F.pad(pixel_values, (0, (-width) % divisor, 0, (-height) % divisor))
        outputs = self.segmenter(pixel_values)
        return tuple(full_mask_logits(outputs) if name == "pred_masks" else outputs[name] for name in self.output_names)


def raw_output_names(outputs: dict) -> tuple[str, ...]:
    """The `RAW_OUTPUTS` a head's output dict holds (`pred_masks` also when computed from embeddings)."""
    return tuple(
        name for name in RAW_OUTPUTS if name in outputs or (name == "pred_masks" and "pred_mask_embeds" in outputs)
    )
