"""Post-processing of an exported densepred model in NumPy alone: raw outputs -> semantic / panoptic / instances
(mask models) or box detections (task "detection").

`python export.py` writes this file beside the model as `postprocess.py`; it needs only NumPy (and the
standard library), so a deployment runs the network with onnxruntime and this file, and no PyTorch.
It follows the project's `PostProcessor` (densepred.heads.postprocess, the official Mask2Former inference)
on its exact path (and, for detectors, `BoxPostProcessor`, densepred.heads.box_postprocess), with the same
thresholds, read from the `metadata.json` written beside the model:

    import json, numpy as np, postprocess
    metadata = json.load(open("metadata.json"))
    logits, masks = session.run(None, {"images": images})[:2]          # images (1, 3, h, w) uint8 RGB
    result = postprocess.postprocess(logits[0], masks[0], (h, w), (H, W), metadata)
    # a detector's outputs are pred_logits (1, Q, K) and pred_boxes (1, Q, 4): the same call with boxes[0]

`pred_masks` are the mask logits at stride 4 of the padded network input: they are upsampled (bilinear) to the
padded size, cropped to the image's (h, w) and resized to (H, W), the size results are wanted at (the
original photo if it was resized before the network; (h, w) otherwise). Results (the project's format,
docs/architecture.md, as NumPy arrays):
- semantic: `sem_seg` float32 (K, H, W) class scores, `sem_seg_labels` int32 (H, W) their arg-max;
- panoptic: `panoptic_seg` int32 (H, W) segment ids (0 = void), `segments_info` [{"id", "label", "isthing",
  "score"}];
- instance: `instances` {"masks" bool (N, H, W), "scores" (N,), "labels" (N,) int64, "boxes" (N, 4) XYXY
  inclusive pixel indices, zeros for an empty mask};
- detection: `instances` {"scores" (N,) sigmoid class scores, "labels" (N,) int64, "boxes" (N, 4) XYXY pixels
  of (H, W)}, the top `test_topk` (query, class) pairs, best first (no masks). The detector's `pred_boxes` are
  (cx, cy, w, h) normalised by the padded network input: (h, w) rounded up to `size_divisibility`, unless
  `padded_size` says otherwise (an input padded before the network).
Limits: every query's mask is resized to (H, W), so memory grows as (Q + K) x H x W floats (as the exact
path of `PostProcessor`; resize a large photo and ask for results at the working size for less); float
rounding may differ from PyTorch's in the last bits, which can flip a pixel whose decision is a tie.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# Mask logits are at stride 4 of the padded input.
MASK_STRIDE = 4
TASKS = ("semantic", "instance", "panoptic", "detection")


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, float32."""
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    return (shifted / shifted.sum(-1, keepdims=True)).astype(np.float32)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)


def _source_pixels(out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PyTorch's bilinear sampling with align_corners=False along one axis: (first index, next index,
    weight of the next) of every output pixel."""
    scale = np.float32(in_size / out_size)
    source = np.maximum((np.arange(out_size, dtype=np.float32) + 0.5) * scale - 0.5, 0).astype(np.float32)
    first = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    following = np.minimum(first + 1, in_size - 1)
    return first, following, (source - first).astype(np.float32)


def resize_bilinear(maps: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """(N, h, w) float maps -> (N, H, W), as `F.interpolate(mode="bilinear", align_corners=False)`."""
    height, width = int(size[0]), int(size[1])
    top, bottom, fy = _source_pixels(height, maps.shape[-2])
    left, right, fx = _source_pixels(width, maps.shape[-1])
    rows = maps[:, top] * (1 - fy)[:, None] + maps[:, bottom] * fy[:, None]  # (N, H, w)
    return (rows[:, :, left] * (1 - fx) + rows[:, :, right] * fx).astype(np.float32)


# torchvision.ops.masks_to_boxes, in NumPy (as PostProcessor uses it)
def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) bool -> (N, 4) float32 XYXY boxes of inclusive pixel indices, zeros for an empty mask."""
    if masks.shape[0] == 0:
        return np.zeros((0, 4), dtype=np.float32)
    rows, columns = masks.any(2), masks.any(1)  # (N, H), (N, W)
    x0, y0 = columns.argmax(1), rows.argmax(1)
    x1 = masks.shape[2] - 1 - columns[:, ::-1].argmax(1)
    y1 = masks.shape[1] - 1 - rows[:, ::-1].argmax(1)
    boxes = np.stack([x0, y0, x1, y1], 1).astype(np.float32)
    boxes[~rows.any(1)] = 0
    return boxes


# Copied from densepred.heads.postprocess.semantic_inference, in NumPy (this file may import nothing but NumPy)
def semantic_inference(class_logits: np.ndarray, mask_logits: np.ndarray) -> np.ndarray:
    """class_logits (Q, K+1), mask_logits (Q, H, W) -> (K, H, W): sum over queries of class probability x
    mask probability."""
    class_probs = softmax(class_logits)[:, :-1]
    probs = sigmoid(mask_logits)
    return np.tensordot(class_probs.T, probs, axes=1).astype(np.float32)


# Copied from densepred.heads.postprocess.panoptic_inference, in NumPy (this file may import nothing but NumPy)
def panoptic_inference(
    class_logits: np.ndarray,
    mask_logits: np.ndarray,
    is_thing: np.ndarray,
    object_mask_threshold: float = 0.8,
    overlap_threshold: float = 0.8,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """class_logits (Q, K+1), mask_logits (Q, H, W), is_thing (K,) bool -> (segment-id map (H, W) int32,
    segments_info). Confident queries (best class not "no object", probability above the threshold) compete
    for the pixels by score x mask probability; a query is a segment if it wins enough of its own mask;
    stuff segments of one class merge into the first."""
    height, width = mask_logits.shape[-2:]
    num_classes = class_logits.shape[-1] - 1
    panoptic_seg = np.zeros((height, width), dtype=np.int32)
    probs = softmax(class_logits)
    scores, labels = probs.max(-1), probs.argmax(-1)
    keep = (labels != num_classes) & (scores > object_mask_threshold)
    scores, labels, mask_probs = scores[keep], labels[keep], sigmoid(mask_logits[keep])
    num_kept = labels.shape[0]
    if num_kept == 0:
        return panoptic_seg, []

    winner = (scores[:, None, None] * mask_probs).argmax(0)  # (H, W) index of the winning kept query
    confident = mask_probs >= 0.5
    confident_winner = np.take_along_axis(confident, winner[None], 0)[0]
    won_area = np.bincount(winner.ravel(), minlength=num_kept)
    mask_area = confident.sum((1, 2))
    segment_area = np.bincount(winner[confident_winner], minlength=num_kept)
    covered = won_area / np.maximum(mask_area, 1).astype(np.float64)
    valid = (won_area > 0) & (mask_area > 0) & (segment_area > 0) & (covered >= overlap_threshold)

    thing = is_thing[labels]
    order = np.arange(num_kept)
    same_class_before = (labels[:, None] == labels[None, :]) & (order[None, :] <= order[:, None])
    first_of_class = (same_class_before & (valid & ~thing)[None, :]).argmax(1)
    owner = np.where(thing, order, first_of_class)
    opens = valid & (owner == order)
    segment_number = np.cumsum(opens).astype(np.int32)
    query_segment = np.where(valid, segment_number[owner], 0).astype(np.int32)
    panoptic_seg = np.where(confident_winner, query_segment[winner], panoptic_seg).astype(np.int32)
    segments_info = [
        {"id": int(segment_number[q]), "label": int(labels[q]), "isthing": bool(thing[q]), "score": float(scores[q])}
        for q in np.flatnonzero(opens)
    ]
    return panoptic_seg, segments_info


# Copied from densepred.heads.postprocess.instance_inference, in NumPy (this file may import nothing but NumPy)
def instance_inference(
    class_logits: np.ndarray,
    mask_logits: np.ndarray,
    test_topk: int = 100,
    keep_classes: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The top-k (query, class) pairs by class probability (of `keep_classes` only, if given): masks (logit
    > 0), scores (class probability x mean mask probability inside the mask), labels, boxes."""
    num_classes = class_logits.shape[-1] - 1
    class_probs = softmax(class_logits)[:, :-1].ravel()  # (Q*K,) query-major
    top = np.argsort(-class_probs, kind="stable")[: min(test_topk, class_probs.size)]
    top_scores, labels, queries = class_probs[top], top % num_classes, top // num_classes
    if keep_classes is not None:
        keep = keep_classes[labels]
        top_scores, labels, queries = top_scores[keep], labels[keep], queries[keep]
    logits = mask_logits[queries]
    masks = logits > 0
    inside = (sigmoid(logits) * masks).reshape(len(masks), -1).sum(1)
    mask_scores = inside / (masks.reshape(len(masks), -1).sum(1) + 1e-6)
    return {
        "masks": masks,
        "scores": (top_scores * mask_scores).astype(np.float32),
        "labels": labels.astype(np.int64),
        "boxes": masks_to_boxes(masks),
    }


# Copied from densepred.heads.box_postprocess.BoxPostProcessor.forward (one image), in NumPy
def box_inference(
    class_logits: np.ndarray,
    boxes_cxcywh: np.ndarray,
    padded_size: Sequence[int],
    image_size: Sequence[int],
    orig_size: Sequence[int],
    test_topk: int = 100,
) -> dict[str, np.ndarray]:
    """class_logits (Q, K) sigmoid logits, boxes_cxcywh (Q, 4) normalised by `padded_size` (Hp, Wp) -> the top
    `test_topk` (query, class) pairs by sigmoid score: scores, labels, boxes (N, 4) XYXY pixels scaled by
    orig_size / image_size and clipped to `orig_size` (H, W)."""
    num_classes = class_logits.shape[-1]
    probs = sigmoid(class_logits.astype(np.float32)).ravel()  # (Q*K,) query-major
    top = np.argsort(-probs, kind="stable")[: min(test_topk, probs.size)]
    cx, cy, w, h = np.moveaxis(boxes_cxcywh.astype(np.float32)[top // num_classes], -1, 0)
    boxes = np.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)
    padded_h, padded_w = (float(v) for v in padded_size)
    boxes = boxes * np.array([padded_w, padded_h, padded_w, padded_h], dtype=np.float32)
    ratio_w, ratio_h = orig_size[1] / image_size[1], orig_size[0] / image_size[0]
    boxes = boxes * np.array([ratio_w, ratio_h, ratio_w, ratio_h], dtype=np.float32)
    limits = np.array([orig_size[1], orig_size[0], orig_size[1], orig_size[0]], dtype=np.float32)
    return {
        "scores": probs[top],
        "labels": (top % num_classes).astype(np.int64),
        "boxes": np.minimum(np.maximum(boxes, 0), limits).astype(np.float32),
    }


def detection_postprocess(
    pred_logits: np.ndarray,
    pred_boxes: np.ndarray,
    image_size: Sequence[int],
    orig_size: Sequence[int],
    metadata: Mapping[str, Any],
    padded_size: Sequence[int] | None = None,
) -> dict[str, Any]:
    """One image's detector outputs, pred_logits (Q, K) and pred_boxes (Q, 4) -> {"instances": box_inference's}
    at `orig_size`; padded_size: the padded network input (Hp, Wp), default `image_size` rounded up to
    metadata.json's `size_divisibility` (what the graph pads to)."""
    num_classes = int(metadata["num_classes"])
    if pred_logits.shape[-1] != num_classes:
        raise ValueError(f"pred_logits have {pred_logits.shape[-1]} classes, metadata.json num_classes = {num_classes}")
    if padded_size is None:
        divisor = int(metadata["size_divisibility"])
        padded_size = [-(-int(v) // divisor) * divisor for v in image_size]
    if image_size[0] > padded_size[0] or image_size[1] > padded_size[1]:
        raise ValueError(f"image size {tuple(image_size)} is larger than the padded network input {tuple(padded_size)}")
    topk = int(metadata["postprocess"]["test_topk"])
    return {"instances": box_inference(pred_logits, pred_boxes, padded_size, image_size, orig_size, topk)}


# Copied from densepred.heads.postprocess.PostProcessor._process_image (its exact path), in NumPy
def postprocess(
    pred_logits: np.ndarray,
    pred_masks: np.ndarray,
    image_size: Sequence[int],
    orig_size: Sequence[int],
    metadata: Mapping[str, Any],
    task: str | None = None,
    padded_size: Sequence[int] | None = None,
) -> dict[str, Any]:
    """One image's raw outputs -> its predictions at `orig_size` (module docstring).

    pred_logits (Q, K+1), pred_masks (Q, Hp/4, Wp/4): the network's outputs for this image (a detector's:
    pred_logits (Q, K) and pred_boxes (Q, 4) in place of pred_masks, see `detection_postprocess`, which
    `padded_size` is for); image_size: the (h, w) of the image given to the network (its valid part of the
    padded input); orig_size: the (H, W) to predict at; metadata: metadata.json's dict (thresholds, thing
    classes, task); task: "semantic", "instance", "panoptic" or "detection" (default: the metadata's;
    panoptic also gives the semantic and instance results).
    """
    task = task or metadata["task"]
    if task not in TASKS:
        raise ValueError(f"task={task!r}: this post-processing computes one of {TASKS}")
    if (task == "detection") != (metadata["task"] == "detection"):
        raise ValueError(f"task={task!r}: metadata.json's model is for task {metadata['task']!r}")
    if task == "detection":
        return detection_postprocess(pred_logits, pred_masks, image_size, orig_size, metadata, padded_size)
    settings = metadata["postprocess"]
    num_classes = int(metadata["num_classes"])
    if pred_logits.shape[-1] != num_classes + 1:
        raise ValueError(
            f"pred_logits have {pred_logits.shape[-1]} classes, metadata.json num_classes + 1 = {num_classes + 1}"
        )
    height, width = int(image_size[0]), int(image_size[1])
    padded = (pred_masks.shape[-2] * MASK_STRIDE, pred_masks.shape[-1] * MASK_STRIDE)
    if height > padded[0] or width > padded[1]:
        raise ValueError(f"image size {(height, width)} is larger than the padded network input {padded}")
    class_logits = pred_logits.astype(np.float32)
    masks = resize_bilinear(pred_masks.astype(np.float32), padded)[:, :height, :width]
    masks = resize_bilinear(masks, orig_size)
    is_thing = np.zeros(num_classes, dtype=bool)
    is_thing[list(metadata["thing_classes"])] = True
    result: dict[str, Any] = {}
    if task in ("semantic", "panoptic"):
        result["sem_seg"] = semantic_inference(class_logits, masks)
        result["sem_seg_labels"] = result["sem_seg"].argmax(0).astype(np.int32)
    if task == "panoptic":
        result["panoptic_seg"], result["segments_info"] = panoptic_inference(
            class_logits,
            masks,
            is_thing,
            float(settings["object_mask_threshold"]),
            float(settings["overlap_threshold"]),
        )
    if task in ("instance", "panoptic"):
        keep_classes = is_thing if settings.get("instance_things_only", True) else None
        result["instances"] = instance_inference(class_logits, masks, int(settings["test_topk"]), keep_classes)
    return result
