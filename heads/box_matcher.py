"""Hungarian matching of predicted boxes to target boxes (Deformable DETR, RT-DETR).

The cost of assigning query q to target t is

    cost_class * focal(q, label_t) + cost_bbox * |b_q - b_t|_1 + cost_giou * (-GIoU(b_q, b_t))

with focal(q, k) = alpha (1 - p)^gamma (-log p) - (1 - alpha) p^gamma (-log(1 - p)), p = sigmoid of the
class logit (Deformable DETR's cost, and RT-DETR's with `use_focal_loss`), boxes (cx, cy, w, h) normalised.
Costs of all predictions of a step (final, auxiliary, encoder) are computed on the device, copied to the
host once and solved with scipy's `linear_sum_assignment` (`heads.matcher.matches_from_costs`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from densepred.heads.box_ops import box_convert, generalized_box_iou
from densepred.heads.matcher import Matches, matches_from_costs


class BoxMatcher(nn.Module):
    """One-to-one assignment of queries to target boxes minimising the matching cost (defaults: Deformable DETR)."""

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("matcher costs cost_class, cost_bbox and cost_giou are all 0; set at least one.")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    @torch.no_grad()
    def cost_matrices(
        self,
        predictions: Sequence[Mapping[str, torch.Tensor]],
        targets: Sequence[Mapping[str, torch.Tensor]],
        class_agnostic: Sequence[bool] | None = None,
    ) -> list[torch.Tensor]:
        """Costs of several predictions of one batch, each (B, Q_i, max N_b) float32 on the device.

        predictions: dicts with `pred_logits` (B, Q_i, K) and `pred_boxes` (B, Q_i, 4) normalised (cx, cy, w, h).
        targets: one dict per image with `labels` (N_b,) and `boxes_cxcywh` (N_b, 4). `class_agnostic[i]`:
        prediction i is costed as if every target were class 0 (Deformable DETR's two-stage proposals).
        Columns past N_b are padding.
        """
        device = predictions[0]["pred_logits"].device
        sizes = [len(t["labels"]) for t in targets]
        labels = torch.cat([t["labels"] for t in targets]).to(device)  # (T,)
        boxes = torch.cat([t["boxes_cxcywh"] for t in targets]).to(device).float()  # (T, 4)
        # column j of image b in the padded layout is target first[b] + j (padding: target 0, sliced off later)
        max_targets = max(sizes, default=0)
        first = torch.tensor([0, *sizes[:-1]]).cumsum(0)
        valid = torch.arange(max_targets)[None] < torch.tensor(sizes)[:, None]
        columns = torch.where(valid, first[:, None] + torch.arange(max_targets)[None], 0).to(device, non_blocking=True)
        agnostic = class_agnostic or [False] * len(predictions)
        costs = []
        with torch.autocast(device.type, enabled=False):
            for prediction, zero_labels in zip(predictions, agnostic, strict=True):
                cost = self._cost(prediction, torch.zeros_like(labels) if zero_labels else labels, boxes)  # (B, Q, T)
                costs.append(cost.gather(2, columns[:, None, :].expand(-1, cost.shape[1], -1)))
        return costs

    def _cost(self, prediction: Mapping[str, torch.Tensor], labels: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """(B, Q, T) cost of every query against every target of the batch."""
        logits = prediction["pred_logits"].float()
        pred_boxes = prediction["pred_boxes"].float()
        batch_size, num_queries = logits.shape[:2]
        prob = logits.flatten(0, 1).sigmoid()[:, labels]  # (B*Q, T)
        alpha, gamma = self.focal_alpha, self.focal_gamma
        neg_cost = (1 - alpha) * (prob**gamma) * (-(1 - prob + 1e-8).log())
        pos_cost = alpha * ((1 - prob) ** gamma) * (-(prob + 1e-8).log())
        flat_boxes = pred_boxes.flatten(0, 1)
        cost_bbox = torch.cdist(flat_boxes, boxes, p=1)
        xyxy, target_xyxy = box_convert(flat_boxes, "cxcywh", "xyxy"), box_convert(boxes, "cxcywh", "xyxy")
        cost_giou = -generalized_box_iou(xyxy, target_xyxy)
        cost = self.cost_class * (pos_cost - neg_cost) + self.cost_bbox * cost_bbox + self.cost_giou * cost_giou
        return cost.view(batch_size, num_queries, -1)

    @torch.no_grad()
    def match(
        self,
        predictions: Sequence[Mapping[str, torch.Tensor]],
        targets: Sequence[Mapping[str, torch.Tensor]],
        class_agnostic: Sequence[bool] | None = None,
    ) -> list[Matches]:
        """Match every prediction of a batch (one device -> host copy for all); one `Matches` per prediction."""
        batch_size = predictions[0]["pred_logits"].shape[0]
        if len(targets) != batch_size:
            raise ValueError(f"got targets for {len(targets)} images but predictions for {batch_size}.")
        costs = self.cost_matrices(predictions, targets, class_agnostic)
        host = torch.cat([c.flatten() for c in costs]).cpu().split([c.numel() for c in costs])  # the one copy
        sizes = [len(t["labels"]) for t in targets]
        device = predictions[0]["pred_logits"].device
        return [
            matches_from_costs(flat.view(1, *cost.shape), sizes, device)[0]
            for flat, cost in zip(host, costs, strict=True)
        ]

    @torch.no_grad()
    def forward(
        self, outputs: Mapping[str, torch.Tensor], targets: Sequence[Mapping[str, torch.Tensor]]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image, (query_indices, target_indices) int64 CPU tensors in increasing query order."""
        (matches,) = self.match([outputs], targets)
        image, query, target = (t.cpu() for t in (matches.image, matches.query, matches.target))
        first = torch.tensor([0, *[len(t["labels"]) for t in targets]]).cumsum(0)
        return [(query[image == b], target[image == b] - first[b]) for b in range(len(targets))]
