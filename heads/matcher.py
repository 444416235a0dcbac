"""Hungarian matching of predicted (class, mask) pairs to ground-truth segments (MaskFormer / Mask2Former).

The cost of assigning query q to target t is

    cost_class * (-p_q[label_t]) + cost_mask * mask_cost(q, t) + cost_dice * dice_cost(q, t)

with p the softmax over K + 1 classes. Mask costs are
- "point" (Mask2Former): mean binary cross-entropy and dice on `num_points` points drawn uniformly once per
  image and shared by all of its masks;
- "full" (MaskFormer): mean sigmoid focal loss and dice over all pixels of the prediction grid, targets
  resized to it with nearest interpolation (as the original, to save memory).

Costs for the whole batch, and for all of its predictions (final and auxiliary), are computed on the device
(targets padded per image); the cost tensor then makes the one trip to the host that scipy's
`linear_sum_assignment` needs, one solve per (prediction, image), and the assignments go back in one
asynchronous copy (`HungarianMatcher.match`).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from densepred.heads.mask_prediction import full_mask_logits, mask_logits_at_points
from densepred.heads.point_sampling import point_sample

MASK_LOSSES = ("point", "full")


def check_mask_loss(mask_loss: str, owner: str) -> None:
    """`mask_loss` (matcher cost and criterion loss): "point" (sampled points) or "full" (every pixel)."""
    if mask_loss not in MASK_LOSSES:
        raise ValueError(f"{owner} mask_loss must be one of {MASK_LOSSES}, got {mask_loss!r}.")


# The mask tensors a prediction may hold (`heads.mask_prediction`).
MASK_KEYS = ("pred_masks", "pred_mask_embeds", "mask_features")

# Mask and class logits are clamped to this range before costing: +-inf would give inf * 0 = NaN in the
# pair-wise sums, while sigmoid / softmax are already saturated far below it.
LOGIT_LIMIT = 1e4


def batch_sigmoid_ce_cost(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of every (prediction, target) pair.

    logits: (B, Q, P) mask logits, targets: (B, N, P) in [0, 1]. Returns (B, Q, N).
    """
    num_points = logits.shape[-1]
    # pos = softplus(-x) = -log(sigmoid(x)), the cost of a point whose target is 1, neg = softplus(x) that of a
    # target 0: pos @ t + neg @ (1 - t) = (pos - neg) @ t + sum(neg) with pos - neg = -x, one product
    neg = F.softplus(logits)
    cost = neg.sum(-1, keepdim=True) - logits @ targets.transpose(1, 2)  # the sign on the (B, Q, N) product
    return cost / num_points


def batch_sigmoid_focal_cost(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Mean sigmoid focal loss of every (prediction, target) pair.

    logits: (B, Q, P), targets: (B, N, P) in [0, 1]. Returns (B, Q, N).
    """
    num_points = logits.shape[-1]
    prob = logits.sigmoid()
    focal_pos = alpha * (1 - prob) ** gamma * F.softplus(-logits)
    focal_neg = (1 - alpha) * prob**gamma * F.softplus(logits)
    cost = focal_pos @ targets.transpose(1, 2) + focal_neg @ (1 - targets).transpose(1, 2)
    return cost / num_points


def batch_dice_cost(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Dice loss 1 - (2 |p t| + 1) / (|p| + |t| + 1) of every (prediction, target) pair.

    logits: (B, Q, P), targets: (B, N, P) in [0, 1]. Returns (B, Q, N).
    """
    prob = logits.sigmoid()
    numerator = 2 * (prob @ targets.transpose(1, 2))
    denominator = prob.sum(-1)[:, :, None] + targets.sum(-1)[:, None, :]
    return 1 - (numerator + 1) / (denominator + 1)


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets minimising the matching cost (defaults: Mask2Former).

    MaskFormer's official setting is `cost_class=1.0, cost_mask=20.0, cost_dice=1.0, mask_loss="full"`.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_mask: float = 5.0,
        cost_dice: float = 5.0,
        mask_loss: str = "point",
        num_points: int = 12544,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        check_mask_loss(mask_loss, "matcher")
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("matcher costs cost_class, cost_mask and cost_dice are all 0; set at least one.")
        if num_points < 1:
            raise ValueError(f"matcher num_points must be >= 1, got {num_points}.")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.mask_loss = mask_loss
        self.num_points = num_points
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @torch.no_grad()
    def cost_matrix(
        self, outputs: Mapping[str, torch.Tensor], targets: Sequence[Mapping[str, torch.Tensor]]
    ) -> torch.Tensor:
        """Matching cost of every query against every target of its image.

        outputs: a prediction (`heads.mask_prediction`): `pred_logits` (B, Q, K+1) and `pred_masks` (B, Q, h, w)
        or the mask embeddings and features they come from. targets: one dict per image with `labels` (N_b,)
        and `masks` (N_b, H, W), the same H, W for all images. Returns (B, Q, max N_b) on the predictions'
        device, float32 (autocast off, as the original); columns past N_b are padding.
        """
        return self.cost_matrices([outputs], targets)[0]

    @torch.no_grad()
    def cost_matrices(
        self,
        predictions: Sequence[Mapping[str, torch.Tensor]],
        targets: Sequence[Mapping[str, torch.Tensor]],
        target_masks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`cost_matrix` of several predictions of the same batch (the final and auxiliary ones) ->
        (num_predictions, B, Q, max N_b); the targets' layout and point values are built once. `target_masks`:
        the targets' masks concatenated in image order as float (T, 1, H, W), if the caller has them."""
        with torch.autocast(predictions[0]["pred_logits"].device.type, enabled=False):
            layout = _TargetLayout(targets, predictions[0]["pred_logits"], target_masks)
            return torch.stack([self._cost_matrix(prediction, layout) for prediction in predictions])

    def _cost_matrix(self, prediction: Mapping[str, torch.Tensor], layout: _TargetLayout) -> torch.Tensor:
        pred_logits = prediction["pred_logits"].float().clamp(-LOGIT_LIMIT, LOGIT_LIMIT)
        batch_size, num_queries = pred_logits.shape[:2]
        if layout.max_targets == 0:
            return pred_logits.new_zeros(batch_size, num_queries, 0)
        probs = pred_logits.softmax(-1)
        cost_class = -probs.gather(2, layout.padded_labels[:, None, :].expand(-1, num_queries, -1))

        if self.mask_loss == "point":
            points = torch.rand(batch_size, self.num_points, 2, device=pred_logits.device)  # shared by an image's masks
            pred_values = mask_logits_at_points(_float(prediction), points)  # (B, Q, P)
            target_values = point_sample(layout.float_masks, points[layout.image])[:, 0]  # (T, P)
        else:
            pred_masks = full_mask_logits(_float(prediction))
            pred_values = pred_masks.flatten(2)  # (B, Q, h*w)
            small = F.interpolate(layout.masks[:, None].to(torch.uint8), size=pred_masks.shape[-2:], mode="nearest")
            target_values = small.flatten(1).float()  # (T, h*w)
        pred_values = pred_values.clamp(-LOGIT_LIMIT, LOGIT_LIMIT)
        padded_targets = pred_values.new_zeros(batch_size, layout.max_targets, pred_values.shape[-1])
        padded_targets[layout.image, layout.slot] = target_values

        if self.mask_loss == "point":
            cost_mask = batch_sigmoid_ce_cost(pred_values, padded_targets)
        else:
            cost_mask = batch_sigmoid_focal_cost(pred_values, padded_targets, self.focal_alpha, self.focal_gamma)
        cost_dice = batch_dice_cost(pred_values, padded_targets)
        return self.cost_class * cost_class + self.cost_mask * cost_mask + self.cost_dice * cost_dice

    @torch.no_grad()
    def match(
        self,
        predictions: Sequence[Mapping[str, torch.Tensor]],
        targets: Sequence[Mapping[str, torch.Tensor]],
        target_masks: torch.Tensor | None = None,
    ) -> list[Matches]:
        """Match the queries of every prediction (final and auxiliary) of a batch to its targets.

        The cost matrices of all predictions are computed on the device and copied to the host together (the
        one synchronisation of a training step), solved there, and the assignments go back to the device in
        one asynchronous copy. Returns one `Matches` per prediction. `target_masks` as in `cost_matrices`
        (the criterion's, so that the float masks exist once per step).
        """
        costs = self.cost_matrices(predictions, targets, target_masks).cpu()  # the one device -> host copy
        sizes = [len(t["labels"]) for t in targets]
        return matches_from_costs(costs, sizes, predictions[0]["pred_logits"].device)

    @torch.no_grad()
    def forward(
        self, outputs: Mapping[str, torch.Tensor], targets: Sequence[Mapping[str, torch.Tensor]]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Match each image's queries to its targets.

        Returns one `(query_indices, target_indices)` pair of int64 CPU tensors per image, each of length
        min(Q, N_b): query `query_indices[i]` is assigned target `target_indices[i]`, in increasing query order.
        Infinite logits are clamped to +-1e4 before costing; NaN predictions raise a ValueError.
        """
        costs = self.cost_matrix(outputs, targets).cpu()  # the one device -> host copy
        sizes = [len(t["labels"]) for t in targets]
        return [(torch.from_numpy(q), torch.from_numpy(t)) for q, t in _assign(costs, sizes, None)]


@dataclass(frozen=True)
class Matches:
    """The query-target pairs of one prediction, as (M,) int64 tensors on the predictions' device.

    image / query: the matched query; target: its target's index among the batch's targets concatenated in
    image order; slot: the pair's place `image * slots_per_image + k` in a (B, slots_per_image) layout (k
    counts the image's pairs), which `selected_mask_logits` uses. Pairs are in image order, then query order.
    """

    image: torch.Tensor
    query: torch.Tensor
    target: torch.Tensor
    slot: torch.Tensor
    slots_per_image: int


def matches_from_costs(costs: torch.Tensor, sizes: Sequence[int], device: torch.device) -> list[Matches]:
    """Solve the assignments of host costs (num_predictions, B, Q, max N_b) (columns past N_b are padding) and
    send them to `device` in one asynchronous copy; one `Matches` per prediction."""
    per_image = min(costs.shape[2], max(sizes, default=0))  # pairs per image at most: min(Q, max N_b)
    first_target = [0, *itertools.accumulate(sizes)][:-1]
    packed = []
    for index in range(costs.shape[0]):
        pairs = []
        for image, (query, target) in enumerate(_assign(costs[index], sizes, index)):
            pairs.append(
                np.stack(
                    [
                        np.full_like(query, image),
                        query,
                        first_target[image] + target,
                        image * per_image + np.arange(len(query)),
                    ]
                )
            )
        packed.append(np.concatenate(pairs, axis=1) if pairs else np.zeros((4, 0), dtype=np.int64))
    # host -> device without waiting: the copy is queued behind the work already on the device
    indices = torch.from_numpy(np.stack(packed).astype(np.int64)).to(device, non_blocking=True)
    return [Matches(*layer, slots_per_image=per_image) for layer in indices.unbind(0)]


def _float(prediction: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The prediction's mask tensors in float32, full logits clamped to +-LOGIT_LIMIT (a plain dict, so
    nothing is cached on the caller's prediction)."""
    tensors = {
        key: dict.__getitem__(prediction, key).float() for key in MASK_KEYS if dict.__contains__(prediction, key)
    }
    if "pred_masks" in tensors:
        tensors["pred_masks"] = tensors["pred_masks"].clamp(-LOGIT_LIMIT, LOGIT_LIMIT)
    return tensors


class _TargetLayout:
    """A batch's targets on the device, once for all predictions: every target in one tensor, and the
    (image, slot) place of each in the padded (B, max N_b) layout."""

    def __init__(
        self, targets: Sequence[Mapping[str, torch.Tensor]], like: torch.Tensor, float_masks: torch.Tensor | None
    ) -> None:
        sizes = _check_targets(targets, like.shape[0])
        self.max_targets = max(sizes, default=0)
        device = like.device
        # built on the host from Python sizes; non_blocking: queued, not a synchronisation
        self.image = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)).to(
            device, non_blocking=True
        )
        self.slot = torch.cat([torch.arange(n) for n in sizes]).to(device, non_blocking=True)
        labels = torch.cat([t["labels"] for t in targets]).to(device)
        self.masks = torch.cat([t["masks"] for t in targets]).to(device)  # (T, H, W)
        self.float_masks = self.masks[:, None].float() if float_masks is None else float_masks  # (T, 1, H, W)
        self.padded_labels = torch.zeros(len(sizes), self.max_targets, dtype=torch.long, device=device)
        self.padded_labels[self.image, self.slot] = labels


def _assign(costs: torch.Tensor, sizes: Sequence[int], prediction: int | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Solve each image's assignment of (B, Q, max N) host costs -> (query, target) int64 arrays per image."""
    matches = []
    for image, size in enumerate(sizes):
        cost = costs[image, :, :size]
        if not torch.isfinite(cost).all():
            which = "" if prediction is None else f" (prediction {prediction}: 0 is the final, i the auxiliary i-1)"
            raise ValueError(
                f"HungarianMatcher: the matching cost of image {image} in the batch{which} is NaN, so the model's "
                "predictions (pred_logits / pred_masks / pred_boxes) contain NaN: training has diverged. Lower the "
                "learning rate, enable gradient clipping (trainer.gradient_clip_val) or check the inputs."
            )
        query, target = linear_sum_assignment(cost.numpy())
        matches.append((query.astype(np.int64), target.astype(np.int64)))
    return matches


def _check_targets(targets: Sequence[Mapping[str, torch.Tensor]], batch_size: int) -> list[int]:
    """Number of targets per image; raises ValueError for a wrong count of images or mismatched mask sizes."""
    if len(targets) != batch_size:
        raise ValueError(f"got targets for {len(targets)} images but predictions for {batch_size}.")
    sizes = []
    for i, target in enumerate(targets):
        labels, masks = target["labels"], target["masks"]
        if masks.dim() != 3 or masks.shape[0] != labels.shape[0]:
            raise ValueError(
                f"target {i}: `masks` must be (N, H, W) with N = len(labels) = {labels.shape[0]}, "
                f"got {tuple(masks.shape)}."
            )
        if masks.shape[-2:] != targets[0]["masks"].shape[-2:]:
            raise ValueError(
                f"target {i}: masks are {tuple(masks.shape[-2:])} but target 0's are "
                f"{tuple(targets[0]['masks'].shape[-2:])}; pad every image's masks to the batch's padded size."
            )
        sizes.append(labels.shape[0])
    return sizes
