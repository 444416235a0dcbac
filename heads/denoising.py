"""Contrastive denoising queries (DN-DETR / DINO / RT-DETR), training only.

Each of `num_groups` groups holds every ground-truth object twice: a positive query (its box jittered by less
than half its size, its label flipped with probability `label_noise_ratio / 2`) that learns to reconstruct the
object, and a negative one (jittered by one to two half-sizes) that learns to predict no object. The groups
cannot see each other and the matching queries cannot see any of them. As transformers'
`get_contrastive_denoising_training_group`, drawing the same random numbers in the same order (one seed gives
both the same noise), without its per-group loop and its `nonzero` (no host-device synchronisation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from densepred.heads.box_ops import box_convert, inverse_sigmoid


class DenoisingGroup(NamedTuple):
    """queries (B, D, C) label embeddings; reference_logits (B, D, 4) inverse-sigmoid noisy (cx, cy, w, h);
    attend bool (D + Q, D + Q), True where a query may attend; meta: transformers' `denoising_meta_values`
    (`dn_positive_idx` per image, `dn_num_group`, `dn_num_split` = [D, Q])."""

    queries: torch.Tensor
    reference_logits: torch.Tensor
    attend: torch.Tensor
    meta: dict[str, Any]


def contrastive_denoising_group(
    targets: Sequence[Mapping[str, torch.Tensor]],
    num_classes: int,
    num_queries: int,
    class_embed: nn.Embedding,
    num_denoising: int = 100,
    label_noise_ratio: float = 0.5,
    box_noise_scale: float = 1.0,
) -> DenoisingGroup | None:
    """Denoising queries of `targets` ([{"labels" (N,), "boxes_cxcywh" (N, 4) normalised}]), about
    `num_denoising` of them (`num_denoising // max N` groups, at least one); None without any target."""
    counts = [len(t["labels"]) for t in targets]
    max_gt = max(counts, default=0)
    if num_denoising <= 0 or max_gt == 0:
        return None
    device = targets[0]["labels"].device
    num_groups = max(num_denoising // max_gt, 1)
    batch = len(targets)
    labels = pad_sequence([t["labels"] for t in targets], batch_first=True, padding_value=num_classes)
    boxes = pad_sequence([t["boxes_cxcywh"].float() for t in targets], batch_first=True)
    real = pad_sequence([torch.ones(n, dtype=torch.bool, device=device) for n in counts], batch_first=True)
    # each group: the positives, then the negatives
    labels = labels.tile([1, 2 * num_groups])
    boxes = boxes.tile([1, 2 * num_groups, 1])
    real = real.tile([1, 2 * num_groups])
    negative = torch.zeros([batch, 2 * max_gt, 1], device=device)
    negative[:, max_gt:] = 1
    negative = negative.tile([1, num_groups, 1])
    total = 2 * max_gt * num_groups
    if label_noise_ratio > 0:
        flip = torch.rand(labels.shape, device=device) < label_noise_ratio * 0.5
        new_labels = torch.randint_like(labels, 0, num_classes)
        labels = torch.where(flip & real, new_labels, labels)
    if box_noise_scale > 0:
        corners = box_convert(boxes, "cxcywh", "xyxy")
        half_size = torch.tile(boxes[..., 2:] * 0.5, [1, 1, 2]) * box_noise_scale
        sign = torch.randint_like(boxes, 0, 2) * 2.0 - 1.0
        part = torch.rand_like(boxes)
        part = ((part + 1.0) * negative + part * (1 - negative)) * sign
        corners = (corners + part * half_size).clip(min=0.0, max=1.0)
        boxes = box_convert(corners, "xyxy", "cxcywh")
    # group of each query (the matching queries form group num_groups); no query sees another group's
    # denoising queries
    group = torch.arange(total + num_queries, device=device).div(2 * max_gt, rounding_mode="floor")
    group = group.clamp(max=num_groups)
    attend = (group[:, None] == group[None, :]) | (group[None, :] == num_groups)
    positive_idx = [
        (torch.arange(num_groups, device=device)[:, None] * 2 * max_gt + torch.arange(n, device=device)).flatten()
        for n in counts
    ]
    meta = {"dn_positive_idx": positive_idx, "dn_num_group": num_groups, "dn_num_split": [total, num_queries]}
    return DenoisingGroup(class_embed(labels), inverse_sigmoid(boxes), attend, meta)
