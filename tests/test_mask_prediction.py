"""Predicting at points, not pixels: every rewritten computation against the full-resolution one it replaces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from densepred.heads.criterion import SetCriterion
from densepred.heads.mask2former import attention_mask, masked_attention_mask
from densepred.heads.mask_prediction import (
    MaskPrediction,
    mask_logits,
    mask_logits_at_points,
    selected_mask_logits,
)
from densepred.heads.matcher import HungarianMatcher, Matches
from densepred.heads.point_sampling import point_sample, point_sample_channels_last
from densepred.layers import multi_head_attention


def embeddings(batch=2, queries=6, channels=8, height=12, width=10, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(batch, queries, channels, generator=g)
    features = torch.randn(batch, channels, height, width, generator=g)
    return embeds.requires_grad_(requires_grad), features.requires_grad_(requires_grad)


@pytest.mark.parametrize("num_points", [50, 500])  # fewer points than pixels (features sampled) and more
def test_logits_at_points_equal_the_sampled_full_logits(num_points):
    embeds, features = embeddings()
    points = torch.rand(2, num_points, 2, generator=torch.Generator().manual_seed(1))
    prediction = MaskPrediction(pred_logits=None, pred_mask_embeds=embeds, mask_features=features)
    expected = point_sample(mask_logits(embeds, features), points)
    torch.testing.assert_close(mask_logits_at_points(prediction, points), expected, atol=1e-5, rtol=1e-5)
    assert "pred_masks" not in prediction  # nothing full-resolution was kept
    # a plain dict of full logits is sampled directly
    plain = {"pred_masks": mask_logits(embeds, features)}
    torch.testing.assert_close(mask_logits_at_points(plain, points), expected)


def test_channels_last_point_sample_equals_point_sample():
    """Values and gradients (maps and points) of `point_sample_channels_last` against `grid_sample`'s, points
    inside, on the border pixels' outer halves and outside the map (zeros) included."""
    g = torch.Generator().manual_seed(2)
    maps = torch.randn(2, 5, 12, 10, generator=g, requires_grad=True)
    points = (torch.rand(2, 300, 2, generator=g) * 1.2 - 0.1).requires_grad_()
    weights = torch.randn(2, 5, 300, generator=g)
    expected = point_sample(maps, points)
    (expected * weights).sum().backward()
    expected_grads = maps.grad, points.grad
    maps.grad = points.grad = None
    channels_last = maps.permute(0, 2, 3, 1)
    got = point_sample_channels_last(channels_last, points).transpose(1, 2)
    (got * weights).sum().backward()
    assert (expected.abs() > 0).any() and (expected[(points < 0).any(-1)[:, None].expand_as(expected)] == 0).any()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(maps.grad, expected_grads[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(points.grad, expected_grads[1], atol=1e-4, rtol=1e-4)


def test_selected_logits_equal_the_full_logits_of_those_queries():
    embeds, features = embeddings(requires_grad=True)
    image, query = torch.tensor([0, 0, 0, 1]), torch.tensor([1, 4, 5, 2])
    slot = torch.tensor([0, 1, 2, 3])  # (B, 3) layout: image 0 fills its 3 slots, image 1 its first
    prediction = MaskPrediction(pred_logits=None, pred_mask_embeds=embeds, mask_features=features)
    (got,) = selected_mask_logits([prediction], [Matches(image, query, query, slot, slots_per_image=3)])
    torch.testing.assert_close(got, mask_logits(embeds, features)[image, query], atol=1e-5, rtol=1e-5)


def test_selected_logits_of_predictions_sharing_features_in_one_product_equal_each_alone():
    """Three predictions of the same mask features (computed together), one of other features and one of full
    logits: the logits and the gradients of the embeddings and features equal those of each prediction alone."""
    g = torch.Generator().manual_seed(4)
    features = torch.randn(2, 8, 12, 10, generator=g, requires_grad=True)
    other = torch.randn(2, 8, 12, 10, generator=g, requires_grad=True)
    embeds = [torch.randn(2, 6, 8, generator=g, requires_grad=True) for _ in range(5)]
    pairs = [  # image, query; slots in image order, 3 per image
        ([0, 0, 1, 1, 1], [5, 1, 0, 2, 4]),
        ([0, 1], [3, 3]),
        ([0, 0, 0], [0, 1, 2]),
        ([1], [5]),
        ([0, 1, 1], [2, 0, 1]),
    ]
    matches = []
    for image, query in pairs:
        image, query = torch.tensor(image), torch.tensor(query)
        k = torch.cat([torch.arange(int((image == b).sum())) for b in range(2)])
        matches.append(Matches(image, query, query, image * 3 + k, slots_per_image=3))
    predictions = [MaskPrediction(pred_logits=None, pred_mask_embeds=e, mask_features=features) for e in embeds[:3]]
    predictions.append(MaskPrediction(pred_logits=None, pred_mask_embeds=embeds[3], mask_features=other))
    predictions.append({"pred_masks": mask_logits(embeds[4], features)})
    got = selected_mask_logits(predictions, matches)
    want = [
        mask_logits(e, f)[m.image, m.query]
        for e, f, m in zip(embeds, [features] * 3 + [other, features], matches, strict=True)
    ]
    leaves = [features, other, *embeds]
    weights = [torch.randn(w.shape, generator=g) for w in want]
    grads = [
        torch.autograd.grad(sum((x * w).sum() for x, w in zip(v, weights, strict=True)), leaves) for v in (got, want)
    ]
    for a, b in zip([*got, *grads[0]], [*want, *grads[1]], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_pred_masks_are_computed_when_read_and_no_grad_copies_are_not_kept():
    embeds, features = embeddings(requires_grad=True)
    prediction = MaskPrediction(pred_logits=None, pred_mask_embeds=embeds, mask_features=features)
    with torch.no_grad():
        detached = prediction["pred_masks"]
    assert not detached.requires_grad and "pred_masks" not in prediction
    masks = prediction["pred_masks"]
    assert masks.requires_grad and prediction["pred_masks"] is masks
    torch.testing.assert_close(masks, torch.einsum("bqc,bchw->bqhw", embeds, features))
    with pytest.raises(KeyError):
        prediction["other"]


def test_attention_mask_from_resized_features_equals_the_original_definition():
    embeds, features = embeddings(height=24, width=20, channels=4)
    full = mask_logits(embeds, features)
    for size in [(3, 5), (6, 5), (12, 10)]:
        resized = F.interpolate(features, size=size, mode="bilinear", align_corners=False)
        attend = attention_mask(embeds, resized)  # (B, 1, Q, h*w)
        blocked = masked_attention_mask(full, size, num_heads=2)[::2]  # (B, Q, h*w): one copy per head
        resized_logits = F.interpolate(full, size=size, mode="bilinear", align_corners=False).flatten(2)
        decided = resized_logits.abs() > 1e-5  # away from the threshold, rounding cannot flip a position
        assert attend.shape == (2, 1, 6, size[0] * size[1])
        assert torch.equal(attend[:, 0][decided], ~blocked[decided])
        assert blocked.any() and not blocked.all()
    # a query whose mask is empty at the level attends everywhere
    empty = torch.zeros(1, 1, 4)
    empty[..., 0] = -1.0
    assert attention_mask(empty, torch.ones(1, 4, 2, 2)).all()


def test_multi_head_attention_equals_nn_multihead_attention_with_per_head_masks():
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(16, 4, batch_first=True)
    query, memory = torch.randn(2, 5, 16, requires_grad=True), torch.randn(2, 7, 16, requires_grad=True)
    attend = torch.rand(2, 1, 5, 7) > 0.4
    attend[..., 0] = True  # every query attends somewhere
    results = []
    for fused in (False, True):
        if fused:
            cross = multi_head_attention(attn, query, memory, memory, attend)
            self_attn = multi_head_attention(attn, query, query, query)
        else:
            mask = ~attend[:, 0].repeat_interleave(4, dim=0)
            cross = attn(query, memory, memory, attn_mask=mask, need_weights=False)[0]
            self_attn = attn(query, query, query, need_weights=False)[0]
        loss = (cross.sin() + self_attn.cos()).sum()
        results.append((cross, self_attn, *torch.autograd.grad(loss, [query, memory, attn.in_proj_weight])))
    for want, got in zip(*results, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def batch_and_targets(rectangle_targets, seed=0, num_aux=2, queries=6, channels=8, classes=4):
    g = torch.Generator().manual_seed(seed)

    def layer():
        embeds = torch.randn(2, queries, channels, generator=g).requires_grad_()
        return torch.randn(2, queries, classes + 1, generator=g).requires_grad_(), embeds

    features = torch.randn(2, channels, 16, 16, generator=g).requires_grad_()
    layers = [layer() for _ in range(num_aux + 1)]
    return layers, features, rectangle_targets(g, (3, 2), classes)


def as_outputs(layers, features, full: bool):
    def one(logits, embeds):
        if full:
            return {"pred_logits": logits, "pred_masks": torch.einsum("bqc,bchw->bqhw", embeds, features)}
        return MaskPrediction(pred_logits=logits, pred_mask_embeds=embeds, mask_features=features)

    predictions = [one(*layer) for layer in layers]
    final = predictions[-1]
    final["aux_outputs"] = predictions[:-1]
    return final


@pytest.mark.parametrize("mask_loss", ["point", "full"])
def test_losses_matches_and_gradients_at_points_equal_those_of_full_logits(mask_loss, rectangle_targets):
    layers, features, targets = batch_and_targets(rectangle_targets)
    criterion = SetCriterion(num_classes=4, mask_loss=mask_loss, num_points=200)
    leaves = [features, *(t for layer in layers for t in layer)]
    results = []
    for full in (True, False):
        outputs = as_outputs(layers, features, full)
        torch.manual_seed(3)
        losses = criterion(outputs, targets)
        grads = torch.autograd.grad(sum(losses.values()), leaves)
        results.append((losses, grads))
    (want_losses, want_grads), (got_losses, got_grads) = results
    assert list(got_losses) == list(want_losses) and len(got_losses) == 9
    for key, value in want_losses.items():
        torch.testing.assert_close(got_losses[key], value, atol=1e-5, rtol=1e-5)
    for want, got in zip(want_grads, got_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_one_matching_for_all_predictions_equals_matching_each_alone(rectangle_targets):
    layers, features, targets = batch_and_targets(rectangle_targets, seed=1)
    outputs = as_outputs(layers, features, full=False)
    predictions = [outputs, *outputs["aux_outputs"]]
    matcher = HungarianMatcher(num_points=300)
    torch.manual_seed(5)
    together = matcher.match(predictions, targets)
    torch.manual_seed(5)  # the same points: each prediction draws its own, in the same order
    alone = []
    for prediction in predictions:
        full = {"pred_logits": prediction["pred_logits"], "pred_masks": prediction["pred_masks"].detach()}
        alone.append(matcher(full, targets))
    for matches, per_image in zip(together, alone, strict=True):
        image = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(per_image)])
        query = torch.cat([q for q, _ in per_image])
        target = torch.cat([t + (0 if b == 0 else 3) for b, (_, t) in enumerate(per_image)])  # 3 targets in image 0
        assert torch.equal(matches.image, image) and torch.equal(matches.query, query)
        assert torch.equal(matches.target, target)
        assert matches.slots_per_image == 3
        assert torch.equal(matches.slot, torch.tensor([0, 1, 2, 3, 4]))
