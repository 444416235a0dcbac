"""Box conversions shared by the DETR-style detectors (matcher, criterion, heads, post-processing).

Conventions: targets hold XYXY boxes in absolute pixels of the padded input image; heads predict
(cx, cy, w, h) normalised to [0, 1] by the padded size (Wp, Hp).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torchvision.ops import box_convert, generalized_box_iou

__all__ = [
    "box_convert",
    "generalized_box_iou",
    "inverse_sigmoid",
    "level_anchor_boxes",
    "normalized_cxcywh",
    "normalized_targets",
    "paired_box_iou",
    "paired_generalized_box_iou",
    "scale_cxcywh_to_xyxy",
]


def normalized_cxcywh(boxes_xyxy: torch.Tensor, size_hw: Sequence[int]) -> torch.Tensor:
    """XYXY absolute pixels (N, 4) -> (cx, cy, w, h) (N, 4) normalised by the image size `size_hw` = (H, W).

    Divided by Python numbers: no tensor is built from the sizes, so no host-to-device copy in a training step."""
    height, width = (float(v) for v in size_hw)
    cx, cy, w, h = box_convert(boxes_xyxy, "xyxy", "cxcywh").unbind(-1)
    return torch.stack([cx / width, cy / height, w / width, h / height], -1)


def normalized_targets(
    targets: Sequence[Mapping[str, torch.Tensor]], size_hw: Sequence[int]
) -> list[dict[str, torch.Tensor]]:
    """Detection targets ({"labels", "boxes": XYXY pixels}) -> [{"labels", "boxes_cxcywh"}] normalised by the
    padded input size `size_hw`, what the matcher, the criterion and the denoising queries read."""
    return [{"labels": t["labels"], "boxes_cxcywh": normalized_cxcywh(t["boxes"], size_hw)} for t in targets]


def level_anchor_boxes(
    spatial_shapes: Sequence[tuple[int, int]], base_size: float, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """One box per cell of every level, (cx, cy, w, h) normalised: the cell's centre and size base_size * 2**level
    (the two-stage / query-selection anchors of Deformable DETR and RT-DETR) -> (sum h_l w_l, 4). The level sizes
    enter as Python numbers only (no size tensor: no host copy, symbolic while exporting)."""
    boxes = []
    for level, (height, width) in enumerate(spatial_shapes):
        grid_y, grid_x = torch.meshgrid(
            torch.arange(height, device=device).to(dtype), torch.arange(width, device=device).to(dtype), indexing="ij"
        )
        centres = torch.stack([(grid_x + 0.5) / width, (grid_y + 0.5) / height], -1)
        sizes = torch.full_like(centres, base_size * 2.0**level)
        boxes.append(torch.cat([centres, sizes], -1).reshape(height * width, 4))
    return torch.cat(boxes, 0)


def paired_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU and union of each pair (boxes1[i], boxes2[i]) of XYXY boxes (N, 4) -> (N,), (N,): the diagonal of
    `box_iou`."""
    top_left = torch.maximum(boxes1[:, :2], boxes2[:, :2])
    bottom_right = torch.minimum(boxes1[:, 2:], boxes2[:, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    union = (boxes1[:, 2:] - boxes1[:, :2]).prod(-1) + (boxes2[:, 2:] - boxes2[:, :2]).prod(-1) - inter
    return inter / union, union


def paired_generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Generalized IoU of each pair of XYXY boxes (N, 4) -> (N,): the diagonal of `generalized_box_iou`.
    (torchvision's `generalized_box_iou_loss` adds eps=1e-7 to both denominators: 5e-6 off on a 0.2 x 0.2 box,
    where transformers' losses and this one are exact.)"""
    iou, union = paired_box_iou(boxes1, boxes2)
    enclosing = (torch.maximum(boxes1[:, 2:], boxes2[:, 2:]) - torch.minimum(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    area = enclosing.prod(-1)
    return iou - (area - union) / area


def scale_cxcywh_to_xyxy(boxes_cxcywh: torch.Tensor, size_hw: torch.Tensor) -> torch.Tensor:
    """Normalised (cx, cy, w, h) (..., N, 4) -> XYXY absolute pixels for sizes `size_hw` (..., 2) as (H, W)."""
    height, width = size_hw.unbind(-1)
    scale = torch.stack([width, height, width, height], dim=-1).to(boxes_cxcywh.dtype)
    return box_convert(boxes_cxcywh, "cxcywh", "xyxy") * scale.unsqueeze(-2)


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """log(x / (1 - x)) with x clamped to [0, 1] and both terms to at least `eps` (as Deformable DETR)."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))
