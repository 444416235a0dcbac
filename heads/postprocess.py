"""Post-processing: raw head outputs -> semantic, panoptic and instance predictions (Mask2Former's inference).

The three inference functions take one image's class logits (Q, K+1) and mask logits (Q, H, W) already
at the output size, and follow the official Mask2Former `semantic_inference`, `panoptic_inference` and
`instance_inference`, vectorised over queries. `PostProcessor` resizes a batch's mask logits to each
image's original size and returns the predictions format of docs/architecture.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import masks_to_boxes

# Mask logits are at stride 4 of the padded input (docs/architecture.md).
MASK_STRIDE = 4


def semantic_inference(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """Per-class scores: sum over queries of softmax class probability x sigmoid mask.

    class_logits: (Q, K+1), mask_logits: (Q, H, W). Returns (K, H, W).
    """
    class_probs = class_logits.softmax(-1)[:, :-1]
    return torch.einsum("qc,qhw->chw", class_probs, mask_logits.sigmoid())


def panoptic_inference(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    is_thing: torch.Tensor,
    object_mask_threshold: float = 0.8,
    overlap_threshold: float = 0.8,
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Panoptic segmentation of one image.

    class_logits: (Q, K+1), mask_logits: (Q, H, W), is_thing: (K,) bool. Queries whose best class is a
    real class with probability > object_mask_threshold compete for each pixel by score x mask probability.
    A query becomes a segment when the pixels it wins with mask probability >= 0.5 are not empty and the
    pixels it wins are at least overlap_threshold of its own mask (probability >= 0.5); the segments of a
    stuff class are merged into the first one. Pixels not given to a segment are void (0).
    Returns the segment-id map (H, W) int32 and `segments_info` [{"id", "label", "isthing", "score"}], ids
    1, 2, ... in query order, the score being the class probability of the query that opened the segment.
    """
    height, width = mask_logits.shape[-2:]
    num_classes = class_logits.shape[-1] - 1
    panoptic_seg = torch.zeros((height, width), dtype=torch.int32, device=mask_logits.device)
    scores, labels = class_logits.softmax(-1).max(-1)
    keep = labels.ne(num_classes) & (scores > object_mask_threshold)
    scores, labels, mask_probs = scores[keep], labels[keep], mask_logits[keep].sigmoid()
    num_kept = labels.shape[0]
    if num_kept == 0:
        return panoptic_seg, []

    winner = (scores[:, None, None] * mask_probs).argmax(0)  # (H, W) index of the winning kept query
    confident = mask_probs >= 0.5
    confident_winner = confident.gather(0, winner[None])[0]  # (H, W) the winner's mask probability >= 0.5
    won_area = torch.bincount(winner.flatten(), minlength=num_kept).cpu()
    mask_area = confident.sum((1, 2)).cpu()
    segment_area = torch.bincount(winner[confident_winner], minlength=num_kept).cpu()
    # The areas ratio in float64, as the original's Python division.
    covered = won_area.double() / mask_area.clamp(min=1).double()
    valid = (won_area > 0) & (mask_area > 0) & (segment_area > 0) & (covered >= overlap_threshold)

    # Stuff queries of a class share the segment of the first valid one; every other valid query opens one.
    labels_cpu = labels.cpu()
    thing = is_thing.cpu()[labels_cpu]
    order = torch.arange(num_kept)
    same_class_before = (labels_cpu[:, None] == labels_cpu[None, :]) & (order[None, :] <= order[:, None])
    first_of_class = (same_class_before & (valid & ~thing)[None, :]).int().argmax(1)
    owner = torch.where(thing, order, first_of_class)
    opens = valid & (owner == order)
    segment_number = opens.cumsum(0).int()
    query_segment = torch.where(valid, segment_number[owner], 0).to(winner.device)

    panoptic_seg = torch.where(confident_winner, query_segment[winner], panoptic_seg)
    columns = (segment_number[opens], labels_cpu[opens], thing[opens], scores.cpu()[opens])
    segments_info = [
        {"id": segment_id, "label": label, "isthing": is_thing_label, "score": score}
        for segment_id, label, is_thing_label, score in zip(*(column.tolist() for column in columns), strict=True)
    ]
    return panoptic_seg, segments_info


def instance_inference(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    test_topk: int = 100,
    keep_classes: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Instance segmentation of one image: the top-k (query, class) pairs by class probability.

    class_logits: (Q, K+1), mask_logits: (Q, H, W); keep_classes: optional (K,) bool, pairs of other classes
    dropped (panoptic models keep their thing classes). Returns `masks` (N, H, W) bool (logit > 0),
    `scores` (N,) = class probability x mean mask probability inside the mask, `labels` (N,) int64,
    `boxes` (N, 4) XYXY of the masks (torchvision's `masks_to_boxes`: inclusive pixel indices, zeros for
    an empty mask), ordered by class probability.
    """
    num_classes = class_logits.shape[-1] - 1
    class_probs = class_logits.softmax(-1)[:, :-1].flatten()  # (Q*K,) query-major
    top_scores, top_indices = class_probs.topk(min(test_topk, class_probs.numel()))
    labels, queries = top_indices % num_classes, top_indices // num_classes
    if keep_classes is not None:
        keep = keep_classes[labels]
        top_scores, labels, queries = top_scores[keep], labels[keep], queries[keep]

    logits = mask_logits[queries]
    masks = logits > 0
    mask_scores = (logits.sigmoid() * masks).flatten(1).sum(1) / (masks.flatten(1).sum(1) + 1e-6)
    return {"masks": masks, "scores": top_scores * mask_scores, "labels": labels, "boxes": masks_to_boxes(masks)}


class PostProcessor(nn.Module):
    """Raw head outputs -> per-image predictions at the original image size (semantic / panoptic / instance).

    thing_classes: contiguous ids of the thing classes (`dataset.metadata.thing_classes`); None means every
    class is a thing, which panoptic inference refuses. `instance_things_only` keeps only thing classes in
    the instance results (the official behaviour of panoptic models; a no-op when every class is a thing).
    """

    def __init__(
        self,
        num_classes: int,
        thing_classes: Sequence[int] | None = None,
        semantic_on: bool = True,
        panoptic_on: bool = False,
        instance_on: bool = False,
        object_mask_threshold: float = 0.8,
        overlap_threshold: float = 0.8,
        test_topk: int = 100,
        instance_things_only: bool = True,
    ) -> None:
        super().__init__()
        if not (semantic_on or panoptic_on or instance_on):
            raise ValueError("PostProcessor: set at least one of semantic_on, panoptic_on, instance_on.")
        if panoptic_on and thing_classes is None:
            raise ValueError(
                "PostProcessor: panoptic_on needs thing_classes (the dataset's `metadata.thing_classes`) to tell "
                "thing segments from stuff segments, which are merged per class."
            )
        is_thing = torch.ones(num_classes, dtype=torch.bool)
        if thing_classes is not None:
            bad = [c for c in thing_classes if not 0 <= c < num_classes]
            if bad:
                raise ValueError(f"PostProcessor: thing_classes {bad} are not contiguous ids in [0, {num_classes}).")
            is_thing[:] = False
            is_thing[list(thing_classes)] = True
        self.register_buffer("is_thing", is_thing, persistent=False)
        self.num_classes = num_classes
        self.semantic_on = semantic_on
        self.panoptic_on = panoptic_on
        self.instance_on = instance_on
        self.object_mask_threshold = object_mask_threshold
        self.overlap_threshold = overlap_threshold
        self.test_topk = test_topk
        self.instance_things_only = instance_things_only

    @torch.no_grad()
    def forward(
        self,
        outputs: Mapping[str, torch.Tensor],
        image_sizes: Sequence[tuple[int, int]],
        orig_sizes: Sequence[tuple[int, int]],
    ) -> list[dict[str, Any]]:
        """outputs: `pred_logits` (B, Q, K+1), `pred_masks` (B, Q, Hp/4, Wp/4). image_sizes: valid (h, w) of
        each image inside the padded (Hp, Wp) input; orig_sizes: (H, W) of each image file.

        Mask logits are upsampled to (Hp, Wp), cropped to (h, w) and resized to (H, W) (bilinear) before
        inference, as the official `sem_seg_postprocess`. Returns one dict per image with the keys of the
        requested tasks: `sem_seg`; `panoptic_seg` and `segments_info`; `instances`.
        """
        class_logits, mask_logits = outputs["pred_logits"], outputs["pred_masks"]
        if class_logits.shape[-1] != self.num_classes + 1:
            raise ValueError(
                f"PostProcessor: pred_logits have {class_logits.shape[-1]} classes, expected num_classes + 1 = "
                f"{self.num_classes + 1}."
            )
        if not len(image_sizes) == len(orig_sizes) == class_logits.shape[0]:
            raise ValueError(
                f"PostProcessor: {class_logits.shape[0]} predictions but {len(image_sizes)} image_sizes and "
                f"{len(orig_sizes)} orig_sizes."
            )
        with torch.autocast(class_logits.device.type, enabled=False):  # float32 results, as documented
            return [
                self._process_image(image_class_logits.float(), image_mask_logits.float(), image_size, orig_size)
                for image_class_logits, image_mask_logits, image_size, orig_size in zip(
                    class_logits, mask_logits, image_sizes, orig_sizes, strict=True
                )
            ]

    def _process_image(
        self,
        class_logits: torch.Tensor,
        mask_logits: torch.Tensor,
        image_size: tuple[int, int],
        orig_size: tuple[int, int],
    ) -> dict[str, Any]:
        """One image: class logits (Q, K+1), mask logits (Q, Hp/4, Wp/4) -> its predictions dict."""
        padded_size = (mask_logits.shape[-2] * MASK_STRIDE, mask_logits.shape[-1] * MASK_STRIDE)
        height, width = int(image_size[0]), int(image_size[1])
        if height > padded_size[0] or width > padded_size[1]:
            raise ValueError(
                f"PostProcessor: image size {(height, width)} is larger than the padded input {padded_size}."
            )
        masks = F.interpolate(mask_logits[None], size=padded_size, mode="bilinear", align_corners=False)
        masks = masks[:, :, :height, :width]
        masks = F.interpolate(masks, size=(int(orig_size[0]), int(orig_size[1])), mode="bilinear", align_corners=False)[
            0
        ]  # (Q, H, W)
        result: dict[str, Any] = {}
        if self.semantic_on:
            result["sem_seg"] = semantic_inference(class_logits, masks)
        if self.panoptic_on:
            result["panoptic_seg"], result["segments_info"] = panoptic_inference(
                class_logits, masks, self.is_thing, self.object_mask_threshold, self.overlap_threshold
            )
        if self.instance_on:
            keep_classes = self.is_thing if self.instance_things_only else None
            result["instances"] = instance_inference(class_logits, masks, self.test_topk, keep_classes)
        return result
