"""Mask logits of mask-classification heads, computed only where they are needed.

A MaskFormer-style head predicts mask logits as the dot product of a per-query mask embedding with the
pixel decoder's mask features: pred_masks[b, q] = sum_c embeds[b, q, c] * features[b, c]. Both bilinear
sampling and bilinear resizing are linear, so
- the logits at sampled points are the embeddings times the features sampled at those points;
- the logits resized to a coarser level are the embeddings times the features resized to that level;
- the logits of a few queries need only those queries' embeddings.
Training reads nothing else (the matcher's costs and the point losses are at points, the masked attention at
the decoder's levels, the uncertain-point choice on the matched queries only), so no (B, Q, H/4, W/4) tensor
of logits, nor its gradient, exists during training; inference reads the final `pred_masks` in full.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from densepred.heads.point_sampling import point_sample, point_sample_channels_last


def mask_logits(embeds: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """embeds (B, Q, C), features (B, C, H, W) -> mask logits (B, Q, H, W), in the embeddings' dtype (as
    under autocast, also when read after it)."""
    return torch.einsum("bqc,bchw->bqhw", embeds, features.to(embeds.dtype))


class MaskPrediction(dict):
    """One prediction of a head: `pred_logits` (B, Q, K+1), `pred_mask_embeds` (B, Q, C), `mask_features`
    (B, C, H, W). Reading `pred_masks` (B, Q, H, W) computes the full mask logits once and keeps them.

    A plain dict with `pred_logits` and `pred_masks` is a prediction too: every function here accepts both.
    """

    def __missing__(self, key: str) -> Any:
        if key != "pred_masks" or "pred_mask_embeds" not in self:
            raise KeyError(key)
        embeds, features = self["pred_mask_embeds"], self["mask_features"]
        masks = mask_logits(embeds, features)
        if torch.is_grad_enabled() or not (embeds.requires_grad or features.requires_grad):
            self["pred_masks"] = masks  # never keep a no-grad copy of differentiable logits
        return masks


def _computed_masks(prediction: dict[str, Any]) -> torch.Tensor | None:
    """The prediction's full mask logits if it holds them (a plain dict, or already read), else None."""
    return dict.get(prediction, "pred_masks")


def full_mask_logits(prediction: dict[str, Any]) -> torch.Tensor:
    """The prediction's mask logits (B, Q, H, W), computed if it holds only embeddings (and not kept)."""
    masks = _computed_masks(prediction)
    if masks is None:
        masks = mask_logits(prediction["pred_mask_embeds"], prediction["mask_features"])
    return masks


def mask_logits_at_points(prediction: dict[str, Any], points: torch.Tensor) -> torch.Tensor:
    """Bilinear mask logits of every query at `points` (B, P, 2), (x, y) in [0, 1] -> (B, Q, P).

    Equals `point_sample(pred_masks, points)`; from embeddings it takes whichever is cheaper: the features
    sampled at the points (when P < H * W), or the full logits computed channels-last, (B, H, W, Q), and sampled
    there (`point_sample_channels_last`); a transposed view then.
    """
    masks = _computed_masks(prediction)
    if masks is None:
        embeds, features = prediction["pred_mask_embeds"], prediction["mask_features"]
        if points.shape[1] < features.shape[-2] * features.shape[-1]:
            return torch.einsum("bqc,bcp->bqp", embeds, point_sample(features, points).to(embeds.dtype))
        channels_last = torch.einsum("bqc,bchw->bhwq", embeds, features.to(embeds.dtype))
        return point_sample_channels_last(channels_last, points.to(embeds.dtype)).transpose(1, 2)
    return point_sample(masks, points)


def selected_mask_logits(predictions: Sequence[dict[str, Any]], matches: Sequence[Any]) -> list[torch.Tensor]:
    """Full-resolution mask logits of each prediction's matched queries -> one (M_i, H, W) per prediction.

    `matches[i]` (a `heads.matcher.Matches`) holds the pairs of prediction i: `image`, `query` (M_i,) and `slot`,
    which places pair m at `image[m] * slots_per_image + k` of a (B, slots_per_image) layout (k counts the
    image's pairs). Predictions that hold embeddings of the same mask features (Mask2Former's final and
    auxiliary ones) are computed together: their pairs are laid out side by side per image, (B, n *
    slots_per_image), and the logits are one batched matrix product of those embeddings with the features
    (never gathering the features per pair), whose backward is one product too.
    """
    results: list[torch.Tensor | None] = [None] * len(predictions)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (prediction, pairs) in enumerate(zip(predictions, matches, strict=True)):
        masks = _computed_masks(prediction)
        if masks is not None:
            results[i] = masks[pairs.image, pairs.query]
        else:
            groups.setdefault((id(prediction["mask_features"]), pairs.slots_per_image), []).append(i)
    for (_, per_image), members in groups.items():
        features = predictions[members[0]]["mask_features"]
        batch, channels, height, width = features.shape
        width_per_image = len(members) * per_image  # member n's slot k of image b is row b * width + n * per + k
        rows = torch.cat(
            [
                matches[i].slot + matches[i].image * (width_per_image - per_image) + n * per_image
                for n, i in enumerate(members)
            ]
        )
        embeds = torch.cat([predictions[i]["pred_mask_embeds"][matches[i].image, matches[i].query] for i in members])
        slots = embeds.new_zeros(batch * width_per_image, channels).index_copy(0, rows, embeds)
        logits = torch.bmm(slots.view(batch, width_per_image, channels), features.flatten(2).to(slots.dtype))
        logits = logits.flatten(0, 1).index_select(0, rows).view(-1, height, width)
        for i, part in zip(members, logits.split([matches[i].image.shape[0] for i in members]), strict=True):
            results[i] = part
    return results
