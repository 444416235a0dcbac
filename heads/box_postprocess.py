"""Post-processing of box detectors: raw head outputs -> instances at the original image size.

As Deformable DETR's and RT-DETR's `post_process_object_detection`: sigmoid class scores, the top `test_topk`
(query, class) pairs over all queries x classes (a query may give several detections of different classes),
boxes from normalised (cx, cy, w, h) to XYXY pixels of the padded input, then to the original image size
(scaled by orig_size / image_size: the inverse of the evaluation resize).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from densepred.heads.box_ops import scale_cxcywh_to_xyxy


class BoxPostProcessor(nn.Module):
    """Top-k detections per image (`test_topk`, the postprocess config's key: 100 as Deformable DETR, 300 as
    RT-DETR)."""

    def __init__(self, test_topk: int = 100) -> None:
        super().__init__()
        if test_topk < 1:
            raise ValueError(f"postprocess test_topk must be >= 1, got {test_topk}.")
        self.test_topk = test_topk

    @torch.no_grad()
    def forward(
        self,
        outputs: Mapping[str, Any],
        padded_size: Sequence[int],
        image_sizes: Sequence[Sequence[int]],
        orig_sizes: Sequence[Sequence[int]],
    ) -> list[dict[str, Any]]:
        """outputs: `pred_logits` (B, Q, K), `pred_boxes` (B, Q, 4) normalised by `padded_size` (Hp, Wp).
        Returns per image {"instances": {"scores" (N,), "labels" (N,) contiguous, "boxes" (N, 4) XYXY}} at
        its original size, N = min(test_topk, Q x K), best first."""
        logits = outputs["pred_logits"].float()
        batch_size, num_queries, num_classes = logits.shape
        scores, index = logits.sigmoid().flatten(1).topk(min(self.test_topk, num_queries * num_classes), dim=1)
        labels = index % num_classes
        boxes = outputs["pred_boxes"].float().gather(1, (index // num_classes)[..., None].expand(-1, -1, 4))
        device = logits.device
        padded = torch.tensor(list(padded_size), dtype=torch.float32, device=device).expand(batch_size, 2)
        boxes = scale_cxcywh_to_xyxy(boxes, padded)  # (B, N, 4) padded-input pixels
        ratio = torch.tensor(
            [[o[1] / s[1], o[0] / s[0]] for o, s in zip(orig_sizes, image_sizes, strict=True)], device=device
        )
        boxes = boxes * ratio.repeat(1, 2)[:, None, :]
        limits = torch.tensor([[o[1], o[0]] for o in orig_sizes], dtype=torch.float32, device=device).repeat(1, 2)
        boxes = torch.minimum(boxes.clamp(min=0), limits[:, None, :])
        return [{"instances": {"scores": scores[b], "labels": labels[b], "boxes": boxes[b]}} for b in range(batch_size)]
