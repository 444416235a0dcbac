"""Training targets built from transformed segment maps, masks, label maps or boxes.

Segmentation targets hold labels and masks only; a head that needs boxes derives them from the masks with
`torchvision.ops.masks_to_boxes`, the box convention of the whole project (as the post-processing does).
Detection targets hold labels and XYXY pixel boxes.
"""

from __future__ import annotations

import torch


def _segments_target(masks: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Drop segments left empty by a crop."""
    keep = masks.flatten(1).any(dim=1)
    return {"labels": labels[keep], "masks": masks[keep]}


def semantic_target(sem_seg: torch.Tensor, ignore_index: int) -> dict[str, torch.Tensor]:
    """(H, W) class map -> one mask per class present (MaskFormer semantic training) plus `sem_seg`."""
    sem_seg = sem_seg.long()
    classes = torch.unique(sem_seg)
    classes = classes[classes != ignore_index]
    masks = sem_seg[None] == classes[:, None, None]
    return {"labels": classes, "masks": masks, "sem_seg": sem_seg}


def target_from_segment_map(
    segment_map: torch.Tensor,
    labels: torch.Tensor,
    iscrowd: torch.Tensor,
    isthing: torch.Tensor,
    task: str,
    ignore_index: int,
) -> dict[str, torch.Tensor]:
    """Targets from a panoptic index map.

    segment_map: (H, W) int, 0 = void and k + 1 = segment k. labels, iscrowd: (N,) per segment;
    isthing: (K,) bool per class. Crowd segments never become targets; in `sem_seg` they are ignore_index.
    """
    segment_map = segment_map.long()
    if task == "semantic":
        lut = torch.full((labels.shape[0] + 1,), ignore_index, dtype=torch.long)
        lut[1:] = torch.where(iscrowd, torch.full_like(labels, ignore_index), labels)
        return semantic_target(lut[segment_map], ignore_index)
    keep = ~iscrowd if task == "panoptic" else ~iscrowd & isthing[labels]
    index = torch.nonzero(keep).flatten()
    masks = segment_map[None] == (index + 1)[:, None, None]
    return _segments_target(masks, labels[index])


def target_from_masks(masks: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Targets from (N, H, W) per-instance masks (may overlap) and (N,) labels."""
    return _segments_target(masks.bool(), labels)


def target_from_boxes(boxes: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Targets from (N, 4) XYXY pixel boxes (transformed and clipped to the image) and (N,) labels.

    Boxes a crop left without area (x1 <= x0 or y1 <= y0) are dropped, as DETR's crop does.
    """
    boxes = boxes.float()
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return {"labels": labels[keep], "boxes": boxes[keep]}
