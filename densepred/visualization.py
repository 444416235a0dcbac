"""Draw predictions and ground truth over images (validation logging and `predict.py`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torchvision.ops import masks_to_boxes
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) ImageNet-normalised float -> (3, H, W) uint8."""
    mean = image.new_tensor(IMAGENET_MEAN)[:, None, None]
    std = image.new_tensor(IMAGENET_STD)[:, None, None]
    return ((image * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)


def _palette(categories: Sequence[Mapping[str, Any]]) -> list[tuple[int, int, int]]:
    colors = []
    for index, category in enumerate(categories):
        color = category.get("color")
        if color is None:  # a stable distinct color per class
            generator = torch.Generator().manual_seed(index)
            color = torch.randint(40, 256, (3,), generator=generator).tolist()
        colors.append(tuple(int(c) for c in color))
    return colors


def draw_segments(
    image: torch.Tensor,
    masks: torch.Tensor,
    labels: Sequence[int],
    categories: Sequence[Mapping[str, Any]],
    scores: Sequence[float] | None = None,
    alpha: float = 0.55,
) -> torch.Tensor:
    """image (3, H, W) uint8, masks (N, H, W) bool, labels contiguous ids -> (3, H, W) uint8 with colored
    masks and, for each non-empty mask of a thing class, a box labelled with the class name (and score)."""
    if masks.numel() == 0 or len(labels) == 0:
        return image
    masks = masks.to(torch.bool).cpu()
    palette = _palette(categories)
    colors = [palette[int(label)] for label in labels]
    out = draw_segmentation_masks(image.cpu(), masks, alpha=alpha, colors=colors)
    is_thing = torch.tensor([bool(categories[int(label)].get("isthing", True)) for label in labels])
    keep = masks.flatten(1).any(1) & is_thing
    if keep.any():
        boxes = masks_to_boxes(masks[keep])
        names = []
        for index in keep.nonzero().flatten().tolist():
            name = str(categories[int(labels[index])]["name"])
            names.append(f"{name} {float(scores[index]):.2f}" if scores is not None else name)
        out = draw_bounding_boxes(out, boxes, labels=names, colors=[colors[i] for i in keep.nonzero().flatten().tolist()])
    return out


def draw_prediction(
    image: torch.Tensor, prediction: Mapping[str, Any], categories: Sequence[Mapping[str, Any]], score_threshold: float = 0.5
) -> torch.Tensor:
    """Overlay one image's prediction (panoptic if present, else instances, else semantic argmax)."""
    if "panoptic_seg" in prediction:
        seg = prediction["panoptic_seg"].cpu()
        infos = prediction["segments_info"]
        masks = torch.stack([seg == info["id"] for info in infos]) if infos else torch.zeros(0, *seg.shape, dtype=torch.bool)
        return draw_segments(image, masks, [i["label"] for i in infos], categories, [i["score"] for i in infos])
    if "instances" in prediction:
        inst = prediction["instances"]
        keep = inst["scores"].cpu() >= score_threshold
        return draw_segments(
            image, inst["masks"].cpu()[keep], inst["labels"].cpu()[keep].tolist(), categories, inst["scores"].cpu()[keep].tolist()
        )
    labels = prediction["sem_seg"].argmax(0).cpu()
    present = labels.unique().tolist()
    return draw_segments(image, torch.stack([labels == c for c in present]), present, categories)


def draw_target(image: torch.Tensor, target: Mapping[str, Any], categories: Sequence[Mapping[str, Any]]) -> torch.Tensor:
    """Overlay one image's ground-truth segments (masks cropped to the image)."""
    height, width = image.shape[-2:]
    masks = target["masks"][:, :height, :width]
    return draw_segments(image, masks, target["labels"].tolist(), categories)
