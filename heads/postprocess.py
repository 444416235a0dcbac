"""Post-processing: raw head outputs -> semantic, panoptic and instance predictions (Mask2Former's inference).

The three inference functions take one image's class logits (Q, K+1) and mask logits (Q, H, W) already
at the size they work at, and follow the official Mask2Former `semantic_inference`, `panoptic_inference`
and `instance_inference`, vectorised over queries. `PostProcessor` returns the predictions format of
docs/architecture.md at each image's original size (H, W), by one of two paths, chosen per image:

- exact, when H * W <= `exact_max_pixels` (default `EXACT_MAX_PIXELS` = 2**21 = 2048 x 1024 pixels, a
  Cityscapes image; COCO images are at most 640 x 640): the official `sem_seg_postprocess`. Every query's
  mask logits are upsampled to the padded input size, cropped to the image's valid (h, w) and resized to
  (H, W) (bilinear), and inference runs at (H, W); evaluation numbers are the official Mask2Former
  definition. Memory grows as (Q + K) x H x W floats (a 12 MP photo, Q = 100, K = 133: about 25 GB),
  hence the budget.
- bounded, when H * W > `exact_max_pixels` (a large photo given to predict.py): the logits are upsampled
  to the padded input and cropped to (h, w), the working size (the resized input, at most predict.py's
  `max_size` squared), and inference runs there; only the outputs are brought to (H, W). The panoptic id
  map and the semantic label map are resized by nearest neighbour (pixel centres aligned as in bilinear
  `align_corners=False`); the instances are selected (top-k) at the working size, then only their logits
  are resized to (H, W) bilinearly, a few at a time (`CHUNK_ELEMENTS` floats), as the exact path resizes
  them, so instance masks, scores and boxes equal the exact path's. `sem_seg` class scores stay at the
  working size (`sem_seg.shape[-2:]` tells which size a prediction has); `sem_seg_labels` is always at
  (H, W). Memory: a few (Q, h, w) and (K, h, w) floats, bounded by the working size whatever the photo's
  size, plus the outputs at (H, W) (the two maps, and N x H x W bytes of instance masks).
  The panoptic and semantic maps differ from the exact path's only along segment boundaries (a
  working-size decision upsampled by nearest neighbour instead of a decision on upsampled logits), by
  about the upscaling factor in pixels across each boundary. segments_info is the working-size
  inference's: a query whose overlap ratio is close to `overlap_threshold` may be kept by one path and
  dropped by the other.

`exact_max_pixels=None` keeps the exact path for every image; 0 takes the bounded path for every image.
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
# Images with at most this many pixels (H x W of the original) take the exact, official path (module docstring).
EXACT_MAX_PIXELS = 2048 * 1024
# The bounded path resizes instance logits to the original size this many floats (64 MB) at a time.
CHUNK_ELEMENTS = 1 << 24


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
    scores, labels, mask_probs = scores[keep], labels[keep], mask_logits[keep].sigmoid_()  # in place on the copy
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


def top_pairs(
    class_logits: torch.Tensor, test_topk: int = 100, keep_classes: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The instance candidates of one image: the top-k (query, class) pairs by class probability.

    class_logits: (Q, K+1); keep_classes: optional (K,) bool, pairs of other classes dropped. Returns their
    class probabilities, labels (contiguous classes) and queries, ordered by class probability.
    """
    num_classes = class_logits.shape[-1] - 1
    class_probs = class_logits.softmax(-1)[:, :-1].flatten()  # (Q*K,) query-major
    top_scores, top_indices = class_probs.topk(min(test_topk, class_probs.numel()))
    labels, queries = top_indices % num_classes, top_indices // num_classes
    if keep_classes is not None:
        keep = keep_classes[labels]
        top_scores, labels, queries = top_scores[keep], labels[keep], queries[keep]
    return top_scores, labels, queries


def mask_scores(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean mask probability inside each mask: logits (N, H, W), masks = logits > 0 -> (N,)."""
    return (logits.sigmoid() * masks).flatten(1).sum(1) / (masks.flatten(1).sum(1) + 1e-6)


def instance_inference(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    test_topk: int = 100,
    keep_classes: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Instance segmentation of one image: the top-k (query, class) pairs by class probability (`top_pairs`).

    class_logits: (Q, K+1), mask_logits: (Q, H, W); keep_classes: optional (K,) bool, pairs of other classes
    dropped (panoptic models keep their thing classes). Returns `masks` (N, H, W) bool (logit > 0),
    `scores` (N,) = class probability x mean mask probability inside the mask, `labels` (N,) int64,
    `boxes` (N, 4) XYXY of the masks (torchvision's `masks_to_boxes`: inclusive pixel indices, zeros for
    an empty mask), ordered by class probability.
    """
    top_scores, labels, queries = top_pairs(class_logits, test_topk, keep_classes)
    logits = mask_logits[queries]
    masks = logits > 0
    return {
        "masks": masks,
        "scores": top_scores * mask_scores(logits, masks),
        "labels": labels,
        "boxes": masks_to_boxes(masks),
    }


def resized_instance_inference(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    size: tuple[int, int],
    test_topk: int = 100,
    keep_classes: torch.Tensor | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> dict[str, torch.Tensor]:
    """`instance_inference` on `mask_logits` (Q, h, w) resized bilinearly to `size` (H, W), with only the
    selected queries resized, `chunk_elements` floats at a time (at least one mask): the same results as
    resizing every query first, in N x H x W bytes (the masks) plus one chunk."""
    top_scores, labels, queries = top_pairs(class_logits, test_topk, keep_classes)
    height, width = int(size[0]), int(size[1])
    count = queries.shape[0]
    masks = torch.zeros((count, height, width), dtype=torch.bool, device=mask_logits.device)
    scores = top_scores.new_zeros(count)
    boxes = top_scores.new_zeros((count, 4))
    step = max(1, chunk_elements // max(height * width, 1))
    for start in range(0, count, step):
        chunk = slice(start, start + step)
        logits = F.interpolate(
            mask_logits[queries[chunk]][None], size=(height, width), mode="bilinear", align_corners=False
        )[0]
        chunk_masks = masks[chunk]
        torch.gt(logits, 0, out=chunk_masks)
        boxes[chunk] = masks_to_boxes(chunk_masks)
        # mask_scores, in place on this chunk's own buffer: the same values and sums
        probs = logits.sigmoid_().masked_fill_(~chunk_masks, 0.0)
        areas = chunk_masks.flatten(1).sum(1, dtype=torch.int32)  # exact counts, faster than int64
        scores[chunk] = probs.flatten(1).sum(1) / (areas + 1e-6)
        del logits, probs
    return {"masks": masks, "scores": top_scores * scores, "labels": labels, "boxes": boxes}


def resize_nearest(label_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """An integer map (h, w) resized to `size` (H, W) by nearest neighbour, pixel centres aligned as in
    bilinear `align_corners=False` (source pixel floor((i + 1/2) h / H)); any integer dtype, kept."""
    (height, width), (rows, columns) = (int(size[0]), int(size[1])), label_map.shape

    def sources(out: int, src: int) -> torch.Tensor:
        index = torch.arange(out, device=label_map.device, dtype=torch.int64)
        return ((2 * index + 1) * src).div(2 * out, rounding_mode="floor").clamp(max=src - 1)

    return label_map.index_select(0, sources(height, rows)).index_select(1, sources(width, columns))


class PostProcessor(nn.Module):
    """Raw head outputs -> per-image predictions at the original image size (semantic / panoptic / instance).

    thing_classes: contiguous ids of the thing classes (`dataset.metadata.thing_classes`); None means every
    class is a thing, which panoptic inference refuses. `instance_things_only` keeps only thing classes in
    the instance results (the official behaviour of panoptic models; a no-op when every class is a thing).
    exact_max_pixels: images of at most this many pixels (H x W of the original) are post-processed exactly
    as the official Mask2Former, larger ones at the working size with only the outputs resized (module
    docstring); None: every image exactly; 0: every image at the working size.
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
        exact_max_pixels: int | None = EXACT_MAX_PIXELS,
    ) -> None:
        super().__init__()
        if not (semantic_on or panoptic_on or instance_on):
            raise ValueError("PostProcessor: set at least one of semantic_on, panoptic_on, instance_on.")
        if panoptic_on and thing_classes is None:
            raise ValueError(
                "PostProcessor: panoptic_on needs thing_classes (the dataset's `metadata.thing_classes`) to tell "
                "thing segments from stuff segments, which are merged per class."
            )
        if exact_max_pixels is not None and int(exact_max_pixels) < 0:
            raise ValueError(
                f"PostProcessor: exact_max_pixels={exact_max_pixels}; give a pixel count >= 0 (0: every image at "
                "the working size) or null (every image exactly at its original size)."
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
        self.exact_max_pixels = None if exact_max_pixels is None else int(exact_max_pixels)

    @torch.no_grad()
    def forward(
        self,
        outputs: Mapping[str, torch.Tensor],
        image_sizes: Sequence[tuple[int, int]],
        orig_sizes: Sequence[tuple[int, int]],
    ) -> list[dict[str, Any]]:
        """outputs: `pred_logits` (B, Q, K+1), `pred_masks` (B, Q, Hp/4, Wp/4). image_sizes: valid (h, w) of
        each image inside the padded (Hp, Wp) input; orig_sizes: (H, W) of each image file.

        Mask logits are upsampled to (Hp, Wp) and cropped to (h, w); then, for an image within
        `exact_max_pixels`, resized to (H, W) (bilinear) before inference, as the official
        `sem_seg_postprocess`; for a larger one, inference runs at (h, w) and only its outputs are resized
        (module docstring). Returns one dict per image with the keys of the requested tasks: `sem_seg` and
        `sem_seg_labels`; `panoptic_seg` and `segments_info`; `instances`.
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

    def exact(self, orig_size: tuple[int, int]) -> bool:
        """Whether an image of `orig_size` (H, W) takes the exact path (H x W within `exact_max_pixels`)."""
        return self.exact_max_pixels is None or int(orig_size[0]) * int(orig_size[1]) <= self.exact_max_pixels

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
        orig_size = (int(orig_size[0]), int(orig_size[1]))
        masks = F.interpolate(mask_logits[None], size=padded_size, mode="bilinear", align_corners=False)
        masks = masks[:, :, :height, :width]
        if not self.exact(orig_size):
            return self._bounded(class_logits, masks[0], orig_size)
        masks = F.interpolate(masks, size=orig_size, mode="bilinear", align_corners=False)[0]  # (Q, H, W)
        result: dict[str, Any] = {}
        if self.semantic_on:
            result["sem_seg"] = semantic_inference(class_logits, masks)
            result["sem_seg_labels"] = result["sem_seg"].argmax(0).to(torch.int32)
        if self.panoptic_on:
            result["panoptic_seg"], result["segments_info"] = panoptic_inference(
                class_logits, masks, self.is_thing, self.object_mask_threshold, self.overlap_threshold
            )
        if self.instance_on:
            keep_classes = self.is_thing if self.instance_things_only else None
            result["instances"] = instance_inference(class_logits, masks, self.test_topk, keep_classes)
        return result

    def _bounded(self, class_logits: torch.Tensor, masks: torch.Tensor, orig_size: tuple[int, int]) -> dict[str, Any]:
        """The bounded path: inference on `masks` (Q, h, w), the working size; outputs resized to `orig_size`."""
        result: dict[str, Any] = {}
        if self.panoptic_on:
            panoptic_seg, segments_info = panoptic_inference(
                class_logits, masks, self.is_thing, self.object_mask_threshold, self.overlap_threshold
            )
            panoptic_seg = resize_nearest(panoptic_seg, orig_size)
            if orig_size[0] < masks.shape[-2] or orig_size[1] < masks.shape[-1]:  # shrinking may drop a segment
                areas = torch.bincount(panoptic_seg.flatten().long(), minlength=len(segments_info) + 1).cpu()
                segments_info = [s for s in segments_info if areas[s["id"]] > 0]
            result["panoptic_seg"], result["segments_info"] = panoptic_seg, segments_info
        if self.semantic_on:  # after panoptic: its temporaries are gone, the (K, h, w) scores stay
            result["sem_seg"] = semantic_inference(class_logits, masks)  # (K, h, w)
            result["sem_seg_labels"] = resize_nearest(result["sem_seg"].argmax(0).to(torch.int32), orig_size)
        if self.instance_on:
            keep_classes = self.is_thing if self.instance_things_only else None
            result["instances"] = resized_instance_inference(
                class_logits, masks, orig_size, self.test_topk, keep_classes
            )
        return result
