"""Set criterion for box detectors: the training losses of Deformable DETR and RT-DETR.

For the final prediction, every auxiliary one (`aux_outputs`, first decoder layer first) and the encoder's
proposals (`enc_outputs`, two-stage / query selection), queries are matched to targets by the `BoxMatcher`
(all in one host round trip); the denoising predictions (`dn_outputs`, every decoder layer) are matched by
construction (`dn_meta`, as transformers' `RTDetrLoss.get_cdn_matched_indices`). Then
- classification over the K sigmoid classes of every query, unmatched queries all-negative, summed and
  divided by the number of target boxes: "focal" (Deformable DETR: `loss_ce`, sigmoid focal loss) or
  "vfl" (RT-DETR: `loss_vfl`, varifocal loss, the matched class's target is the IoU of the matched box);
- `loss_bbox` (L1) and `loss_giou` (1 - GIoU) of matched boxes, summed and divided by the number of boxes.
The number of boxes is averaged over distributed ranks (at least 1); the denoising losses divide by it times
the number of denoising groups. Each loss comes back multiplied by its weight, so the training loss is
`sum(losses.values())`. Keys: `loss_ce` ..., auxiliary layer i `loss_ce_i`, encoder `loss_ce_enc`, denoising
layer i `loss_ce_dn_i`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from densepred.heads.box_matcher import BoxMatcher
from densepred.heads.box_ops import box_convert, paired_box_iou, paired_generalized_box_iou
from densepred.heads.criterion import average_num_masks
from densepred.heads.matcher import Matches

CLASS_LOSSES = {"focal": "loss_ce", "vfl": "loss_vfl"}


class BoxCriterion(nn.Module):
    """Box detection losses for a head's raw outputs and a batch's normalised targets (defaults: Deformable DETR)."""

    def __init__(
        self,
        num_classes: int,
        matcher: BoxMatcher | None = None,
        class_loss: str = "focal",
        class_weight: float = 2.0,
        bbox_weight: float = 5.0,
        giou_weight: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        enc_class_agnostic: bool = True,
    ) -> None:
        """`matcher` defaults to a BoxMatcher whose costs are the loss weights (Deformable DETR: 2, 5, 2).
        `enc_class_agnostic`: the encoder proposals are trained as one class (label 0 for every target,
        Deformable DETR's two-stage) rather than with the targets' classes (RT-DETR)."""
        super().__init__()
        if class_loss not in CLASS_LOSSES:
            raise ValueError(f"criterion class_loss must be one of {sorted(CLASS_LOSSES)}, got {class_loss!r}.")
        self.num_classes = num_classes
        self.matcher = matcher or BoxMatcher(class_weight, bbox_weight, giou_weight)
        self.class_loss = class_loss
        self.class_key = CLASS_LOSSES[class_loss]
        self.weight_dict = {self.class_key: class_weight, "loss_bbox": bbox_weight, "loss_giou": giou_weight}
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.enc_class_agnostic = enc_class_agnostic

    def forward(
        self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """Weighted losses of every prediction in `outputs` (the head output of the detection contract).

        outputs: `pred_logits` (B, Q, K), `pred_boxes` (B, Q, 4) normalised (cx, cy, w, h), optional
        `aux_outputs`, `enc_outputs`, `dn_outputs` + `dn_meta`. targets: one dict per image with `labels`
        (N_b,) int64 and `boxes_cxcywh` (N_b, 4) normalised by the padded size (`box_ops.normalized_targets`).
        """
        if outputs["pred_logits"].shape[-1] != self.num_classes:
            raise ValueError(
                f"BoxCriterion: pred_logits have {outputs['pred_logits'].shape[-1]} classes, expected num_classes = "
                f"{self.num_classes} (sigmoid classes, no no-object column)."
            )
        device = outputs["pred_logits"].device
        labels = torch.cat([t["labels"] for t in targets]).to(device)  # (T,)
        boxes = torch.cat([t["boxes_cxcywh"] for t in targets]).to(device).float()  # (T, 4)
        num_boxes = average_num_masks(labels.shape[0], device)

        named = [("", outputs), *((f"_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", [])))]
        if outputs.get("enc_outputs") is not None:
            named.append(("_enc", outputs["enc_outputs"]))
        agnostic = [suffix == "_enc" and self.enc_class_agnostic for suffix, _ in named]
        matches = self.matcher.match([p for _, p in named], targets, agnostic)  # one host round trip for all
        losses = {}
        for (suffix, prediction), prediction_matches, zero in zip(named, matches, agnostic, strict=True):
            layer_labels = torch.zeros_like(labels) if zero else labels
            layer = self._layer_losses(prediction, layer_labels, boxes, prediction_matches, num_boxes)
            losses.update({f"{key}{suffix}": value for key, value in layer.items()})
        if outputs.get("dn_outputs"):
            dn_meta = outputs["dn_meta"]
            dn_matches = denoising_matches(dn_meta, [len(t["labels"]) for t in targets], device)
            dn_num_boxes = num_boxes * dn_meta["dn_num_group"]
            for i, prediction in enumerate(outputs["dn_outputs"]):
                layer = self._layer_losses(prediction, labels, boxes, dn_matches, dn_num_boxes)
                losses.update({f"{key}_dn_{i}": value for key, value in layer.items()})
        return losses

    def _layer_losses(
        self,
        prediction: Mapping[str, torch.Tensor],
        labels: torch.Tensor,
        boxes: torch.Tensor,
        matches: Matches,
        num_boxes: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """One prediction's weighted losses, given its matches."""
        logits = prediction["pred_logits"].float()
        src_boxes = prediction["pred_boxes"].float()[matches.image, matches.query]  # (M, 4)
        target_boxes = boxes[matches.target]
        src_xyxy = box_convert(src_boxes, "cxcywh", "xyxy")
        target_xyxy = box_convert(target_boxes, "cxcywh", "xyxy")
        onehot = torch.zeros_like(logits)
        onehot[matches.image, matches.query, labels[matches.target]] = 1.0
        if self.class_loss == "focal":
            loss_class = sigmoid_focal_loss(logits, onehot, self.focal_alpha, self.focal_gamma, reduction="sum")
        else:
            iou, _ = paired_box_iou(src_xyxy.detach(), target_xyxy)
            score = torch.zeros(logits.shape[:2], device=logits.device, dtype=logits.dtype)
            score[matches.image, matches.query] = iou
            target_score = score[..., None] * onehot
            weight = self.focal_alpha * logits.detach().sigmoid().pow(self.focal_gamma) * (1 - onehot) + target_score
            loss_class = F.binary_cross_entropy_with_logits(logits, target_score, weight=weight, reduction="sum")
        losses = {
            self.class_key: loss_class / num_boxes,
            "loss_bbox": F.l1_loss(src_boxes, target_boxes, reduction="sum") / num_boxes,
            "loss_giou": (1 - paired_generalized_box_iou(src_xyxy, target_xyxy)).sum() / num_boxes,
        }
        return {key: value * self.weight_dict[key] for key, value in losses.items()}


def denoising_matches(dn_meta: Mapping[str, Any], sizes: Sequence[int], device: torch.device) -> Matches:
    """The fixed matches of the denoising queries: image b's positive queries `dn_positive_idx[b]` (num_group
    copies of its N_b targets, group-major) to its targets 0..N_b-1 repeated per group. No host sync."""
    groups = dn_meta["dn_num_group"]
    counts = [n * groups for n in sizes]
    image = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(counts, dtype=torch.long))
    first = [0]
    for n in sizes[:-1]:
        first.append(first[-1] + n)
    target = torch.cat([torch.arange(n).repeat(groups) + f for n, f in zip(sizes, first, strict=True)])
    query = torch.cat([idx.to(device).long() for idx in dn_meta["dn_positive_idx"]])
    per_image = max(counts, default=0)
    slot = torch.cat([torch.arange(c) + b * per_image for b, c in enumerate(counts)])
    image, target, slot = (t.to(device, non_blocking=True) for t in (image, target, slot))
    return Matches(image, query, target, slot, slots_per_image=per_image)
