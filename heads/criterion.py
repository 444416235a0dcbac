"""Set criterion: the training losses of MaskFormer / Mask2Former (defaults: Mask2Former).

For the final prediction and for every auxiliary one (`aux_outputs`, first decoder layer first), queries
are matched to targets with the Hungarian matcher, then
- `loss_ce`: cross-entropy over K + 1 classes, unmatched queries labelled "no object" (class K), whose
  weight is `eos_coef`; weighted mean over all queries of the batch;
- `loss_mask` / `loss_dice` on matched pairs, summed and divided by the number of target masks (averaged
  over distributed ranks, at least 1):
  "point" (Mask2Former): binary cross-entropy and dice on `num_points` points per mask, chosen by
  uncertainty (PointRend, oversample_ratio, importance_sample_ratio);
  "full" (MaskFormer): sigmoid focal loss and dice on predictions upsampled to the target size.
Each loss comes back already multiplied by its weight, so the training loss is `sum(losses.values())`;
`weight_dict` gives the weights. Keys of auxiliary layer i carry the suffix `_i` (`loss_ce_0`, ...).
MaskFormer's official setting: `mask_loss="full", class_weight=1.0, mask_weight=20.0, dice_weight=1.0`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss as torchvision_sigmoid_focal_loss

from densepred.heads.mask_prediction import selected_mask_logits
from densepred.heads.matcher import HungarianMatcher, Matches, check_mask_loss
from densepred.heads.point_sampling import check_sampling_ratios, point_sample, sample_uncertain_points


def sigmoid_ce_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy averaged over points, summed over masks, divided by num_masks.

    logits, targets: (M, P), targets in [0, 1].
    """
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return loss.mean(1).sum() / num_masks


def sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, num_masks: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Sigmoid focal loss (torchvision) averaged over pixels, summed over masks, divided by num_masks.

    logits, targets: (M, P).
    """
    loss = torchvision_sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="none")
    return loss.mean(1).sum() / num_masks


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: torch.Tensor) -> torch.Tensor:
    """Dice loss 1 - (2 |p t| + 1) / (|p| + |t| + 1) summed over masks, divided by num_masks.

    logits, targets: (M, P).
    """
    prob = logits.sigmoid()
    numerator = 2 * (prob * targets).sum(-1)
    denominator = prob.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


class _PointMaskLosses(torch.autograd.Function):
    """(BCE, dice) of `sigmoid_ce_loss` and `dice_loss` on logits sampled at points, keeping for backward only
    the logits, the points and the targets: the sampled logits and their sigmoid are recomputed there."""

    @staticmethod
    def forward(ctx, logits, grid, targets, num_masks):  # noqa: D102
        ctx.save_for_backward(logits, grid, targets, num_masks)
        with torch.autocast(logits.device.type, enabled=False):  # in the logits' dtype, float32 in the criterion
            values = F.grid_sample(logits, grid, mode="bilinear", align_corners=False)[:, 0, :, 0]  # (M, P)
            return sigmoid_ce_loss(values, targets, num_masks), dice_loss(values, targets, num_masks)

    @staticmethod
    def backward(ctx, grad_bce, grad_dice):  # noqa: D102
        logits, grid, targets, num_masks = ctx.saved_tensors
        with torch.autocast(logits.device.type, enabled=False):
            return (
                _PointMaskLosses._grad_logits(logits, grid, targets, num_masks, grad_bce, grad_dice),
                None,
                None,
                None,
            )

    @staticmethod
    def _grad_logits(logits, grid, targets, num_masks, grad_bce, grad_dice) -> torch.Tensor:
        values = F.grid_sample(logits, grid, mode="bilinear", align_corners=False)[:, 0, :, 0]
        prob = values.sigmoid()
        # dice 1 - N / D per mask, N = 2 sum(p t) + 1, D = sum(p) + sum(t) + 1: d/dp_j = (N - 2 t_j D) / D^2,
        # times p (1 - p) for the sigmoid (sigmoid_backward); BCE: d/dx of mean_P(bce) / n is (p - t) / (P n)
        numerator = 2 * torch.linalg.vecdot(prob, targets) + 1
        denominator = prob.sum(-1) + targets.sum(-1) + 1
        scale = (grad_dice / num_masks / denominator.square())[:, None]  # (M, 1)
        grad_prob = torch.addcmul(scale * numerator[:, None], targets, -2 * scale * denominator[:, None])
        grad_values = torch.ops.aten.sigmoid_backward(grad_prob, prob)
        bce_scale = grad_bce / (values.shape[1] * num_masks)
        grad_values.addcmul_(prob, bce_scale).addcmul_(targets, -bce_scale)
        # bilinear, zero padding, align_corners=False: grid_sample's own backward
        return torch.ops.aten.grid_sampler_2d_backward(
            grad_values[:, None, :, None], logits, grid, 0, 0, False, [True, False]
        )[0]


def point_mask_losses(
    logits: torch.Tensor, points: torch.Tensor, targets: torch.Tensor, num_masks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sigmoid_ce_loss` and `dice_loss` of float32 mask logits (M, 1, h, w) read at `points` (M, P, 2), (x, y) in
    [0, 1] (`point_sample`), against `targets` (M, P): the same values, the point logits and their sigmoid not
    kept for backward (recomputed there: two (M, P) tensors less per prediction)."""
    if not (torch.is_grad_enabled() and logits.requires_grad):
        values = point_sample(logits, points)[:, 0]
        return sigmoid_ce_loss(values, targets, num_masks), dice_loss(values, targets, num_masks)
    grid = (2.0 * points.unsqueeze(2) - 1.0).to(logits.dtype)  # point_sample's grid
    return _PointMaskLosses.apply(logits, grid, targets.to(logits.dtype), num_masks)


def average_num_masks(num_masks: int, device: torch.device) -> torch.Tensor:
    """The number of target masks averaged over distributed ranks (all_reduce when initialised), at least 1.

    Returns a 0-d float tensor on `device`; no host synchronisation.
    """
    count = torch.full((), float(num_masks), device=device)  # a fill on the device, not a host copy
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return count.clamp(min=1.0)


class SetCriterion(nn.Module):
    """MaskFormer / Mask2Former losses for a head's raw outputs and a batch's targets."""

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher | None = None,
        mask_loss: str = "point",
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        eos_coef: float = 0.1,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        """`matcher` defaults to a HungarianMatcher whose costs are the loss weights, of the same kind
        (`mask_loss`) and point count, as in both official implementations."""
        super().__init__()
        check_mask_loss(mask_loss, "criterion")
        check_sampling_ratios(oversample_ratio, importance_sample_ratio, "criterion")
        self.num_classes = num_classes
        self.matcher = matcher or HungarianMatcher(
            cost_class=class_weight,
            cost_mask=mask_weight,
            cost_dice=dice_weight,
            mask_loss=mask_loss,
            num_points=num_points,
            focal_alpha=focal_alpha,
            focal_gamma=focal_gamma,
        )
        self.mask_loss = mask_loss
        self.weight_dict = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
        self.eos_coef = eos_coef
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        class_weights = torch.ones(num_classes + 1)
        class_weights[-1] = eos_coef
        self.register_buffer("class_weights", class_weights, persistent=False)

    def forward(
        self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """Weighted losses of the final and every auxiliary prediction.

        outputs: a head's predictions (`heads.mask_prediction`): `pred_logits` (B, Q, K+1) with either
        `pred_masks` (B, Q, h, w) or `pred_mask_embeds` (B, Q, C) and `mask_features` (B, C, h, w), and optional
        `aux_outputs` (a list of the same). All predictions are matched first (one host round trip), so the
        matcher's random points of every prediction are drawn before the losses' points.
        targets: one dict per image with `labels` (N_b,) int64 in [0, K) and `masks` (N_b, H, W) bool, padded
        to the batch's input size. Returns 0-d tensors keyed `loss_ce`, `loss_mask`, `loss_dice`, then
        `loss_ce_0`, ... for auxiliary layer 0 and so on.
        """
        if outputs["pred_logits"].shape[-1] != self.num_classes + 1:
            raise ValueError(
                f"SetCriterion: pred_logits have {outputs['pred_logits'].shape[-1]} classes, expected "
                f"num_classes + 1 = {self.num_classes + 1} (the last one is no-object)."
            )
        device = outputs["pred_logits"].device
        labels = torch.cat([t["labels"] for t in targets]).to(device)  # (T,) all targets of the batch
        # (T, 1, H, W) in float once per step: every prediction samples the same targets
        mask_values = torch.cat([t["masks"] for t in targets]).to(device)[:, None].float()
        num_masks = average_num_masks(labels.shape[0], device)

        predictions = [outputs, *outputs.get("aux_outputs", [])]
        # every prediction at once: one host round trip; the matcher samples the same float target masks
        matches = self.matcher.match(predictions, targets, target_masks=mask_values)
        # the matched queries' full logits of all predictions, in one product where they share mask features
        matched_logits = selected_mask_logits(predictions, matches)
        losses = {}
        for i, (prediction, prediction_matches, logits) in enumerate(
            zip(predictions, matches, matched_logits, strict=True)
        ):
            suffix = "" if i == 0 else f"_{i - 1}"
            layer_losses = self._layer_losses(prediction, logits, labels, mask_values, prediction_matches, num_masks)
            losses.update({f"{key}{suffix}": value for key, value in layer_losses.items()})
        return losses

    def _layer_losses(
        self,
        outputs: Mapping[str, torch.Tensor],
        matched_logits: torch.Tensor,
        labels: torch.Tensor,
        mask_values: torch.Tensor,
        matches: Matches,
        num_masks: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """One prediction's weighted losses, given its matches and their mask logits (M, h, w)."""
        image, query, target = matches.image, matches.query, matches.target
        losses = {"loss_ce": self._class_loss(outputs["pred_logits"].float(), labels, image, query, target)}
        losses.update(self._mask_losses(matched_logits.float(), mask_values, target, num_masks))
        return {key: value * self.weight_dict[key] for key, value in losses.items()}

    def _class_loss(
        self, logits: torch.Tensor, labels: torch.Tensor, image: torch.Tensor, query: torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor:
        """Cross-entropy of (B, Q, K+1) logits, unmatched queries labelled no-object (K), weighted mean."""
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.long, device=logits.device)
        target_classes[image, query] = labels[target]
        return F.cross_entropy(logits.transpose(1, 2), target_classes, weight=self.class_weights)

    def _mask_losses(
        self, logits: torch.Tensor, mask_values: torch.Tensor, target: torch.Tensor, num_masks: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Mask and dice losses of matched (M, h, w) logits against the binary targets `target` (M,) of
        `mask_values` (T, 1, H, W) float."""
        logits = logits[:, None]
        if self.mask_loss == "point":
            with torch.no_grad():
                points = sample_uncertain_points(
                    logits, self.num_points, self.oversample_ratio, self.importance_sample_ratio
                )
                # each target is matched once at most: sample the targets where they are, at their pair's
                # points, instead of gathering (M, H, W) masks (the same values)
                target_points = points.new_zeros(mask_values.shape[0], *points.shape[1:]).index_copy(0, target, points)
                target_values = point_sample(mask_values, target_points)[target, 0]  # (M, P)
            loss_mask, loss_dice = point_mask_losses(logits, points, target_values, num_masks)
            return {"loss_mask": loss_mask, "loss_dice": loss_dice}
        targets = mask_values[target]
        upsampled = F.interpolate(logits, size=targets.shape[-2:], mode="bilinear", align_corners=False)
        logit_values, target_values = upsampled.flatten(1), targets.flatten(1)  # (M, H*W)
        return {
            "loss_mask": sigmoid_focal_loss(logit_values, target_values, num_masks, self.focal_alpha, self.focal_gamma),
            "loss_dice": dice_loss(logit_values, target_values, num_masks),
        }
