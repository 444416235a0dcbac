"""Draw predictions and ground truth over images (validation logging and `predict.py`).

Images are raw uint8 pixels (3, H, W): batches hold un-normalised images (the model normalises), so
nothing here needs the normalisation statistics.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torchvision.io import write_png
from torchvision.ops import masks_to_boxes
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from densepred.utils.io import atomic_write


def save_png(image: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write a (3, H, W) uint8 image as a PNG, atomically (the folder is created if needed)."""
    return atomic_write(path, lambda tmp: write_png(image.cpu(), str(tmp)))


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
        box_colors = [colors[i] for i in keep.nonzero().flatten().tolist()]
        out = draw_bounding_boxes(out, boxes, labels=names, colors=box_colors)
    return out


def draw_boxes(
    image: torch.Tensor,
    boxes: torch.Tensor,
    labels: Sequence[int],
    categories: Sequence[Mapping[str, Any]],
    scores: Sequence[float] | None = None,
) -> torch.Tensor:
    """image (3, H, W) uint8, boxes (N, 4) XYXY pixels, labels contiguous ids -> (3, H, W) uint8 with each box
    drawn in its class color and labelled with the class name (and score): a box detector's predictions."""
    if len(labels) == 0:
        return image
    palette = _palette(categories)
    names = [str(categories[int(label)]["name"]) for label in labels]
    if scores is not None:
        names = [f"{name} {float(score):.2f}" for name, score in zip(names, scores, strict=True)]
    colors = [palette[int(label)] for label in labels]
    return draw_bounding_boxes(image.cpu(), boxes.float().cpu(), labels=names, colors=colors, width=2)


def draw_prediction(
    image: torch.Tensor,
    prediction: Mapping[str, Any],
    categories: Sequence[Mapping[str, Any]],
    score_threshold: float = 0.5,
) -> torch.Tensor:
    """Overlay one image's prediction (panoptic if present, else instances: masks, or boxes for a detector, else
    the semantic class map: `sem_seg_labels`, or the arg-max of `sem_seg` scores at the image's size)."""
    if "panoptic_seg" in prediction:
        seg = prediction["panoptic_seg"].cpu()
        infos = prediction["segments_info"]
        if infos:
            masks = torch.stack([seg == info["id"] for info in infos])
        else:
            masks = torch.zeros(0, *seg.shape, dtype=torch.bool)
        return draw_segments(image, masks, [i["label"] for i in infos], categories, [i["score"] for i in infos])
    if "instances" in prediction:
        inst = prediction["instances"]
        keep = inst["scores"].cpu() >= score_threshold
        labels, scores = inst["labels"].cpu()[keep].tolist(), inst["scores"].cpu()[keep].tolist()
        if "masks" not in inst:  # a box detector
            return draw_boxes(image, inst["boxes"].cpu()[keep], labels, categories, scores)
        return draw_segments(image, inst["masks"].cpu()[keep], labels, categories, scores)
    labels = prediction["sem_seg_labels"] if "sem_seg_labels" in prediction else prediction["sem_seg"].argmax(0)
    labels = labels.cpu()
    present = labels.unique().tolist()
    return draw_segments(image, torch.stack([labels == c for c in present]), present, categories)


def draw_target(
    image: torch.Tensor, target: Mapping[str, Any], categories: Sequence[Mapping[str, Any]]
) -> torch.Tensor:
    """Overlay one image's ground-truth segments (masks cropped to the image), or boxes (XYXY pixels of the image)."""
    if "masks" not in target:
        return draw_boxes(image, target["boxes"], target["labels"].tolist(), categories)
    height, width = image.shape[-2:]
    masks = target["masks"][:, :height, :width]
    return draw_segments(image, masks, target["labels"].tolist(), categories)
