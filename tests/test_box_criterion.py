"""Box matcher, criterion and post-processing: equal to transformers' DeformableDetrLoss and RTDetrLoss (denoising
with a given dn_meta and varifocal included) on the same predictions and targets; losses by hand; no targets."""

import math

import pytest
import torch
from transformers import DeformableDetrConfig, RTDetrConfig
from transformers.loss.loss_deformable_detr import DeformableDetrForObjectDetectionLoss, DeformableDetrHungarianMatcher
from transformers.loss.loss_rt_detr import RTDetrForObjectDetectionLoss

from densepred.heads.box_criterion import BoxCriterion
from densepred.heads.box_matcher import BoxMatcher
from densepred.heads.box_ops import normalized_cxcywh, scale_cxcywh_to_xyxy
from densepred.heads.box_postprocess import BoxPostProcessor

RTDETR = {"class_loss": "vfl", "class_weight": 1.0, "focal_alpha": 0.75, "enc_class_agnostic": False}


def _boxes(generator, n):
    """(n, 4) normalised (cx, cy, w, h) boxes inside the image."""
    wh = 0.05 + 0.4 * torch.rand(n, 2, generator=generator)
    center = wh / 2 + (1 - wh) * torch.rand(n, 2, generator=generator)
    return torch.cat([center, wh], 1)


def _prediction(generator, batch, queries, classes):
    return {
        "pred_logits": torch.randn(batch, queries, classes, generator=generator),
        "pred_boxes": torch.rand(batch, queries, 4, generator=generator) * 0.6 + 0.2,
    }


def _targets(generator, counts, classes):
    return [
        {"labels": torch.randint(0, classes, (n,), generator=generator), "boxes_cxcywh": _boxes(generator, n)}
        for n in counts
    ]


def _hf_labels(targets):
    return [{"class_labels": t["labels"], "boxes": t["boxes_cxcywh"]} for t in targets]


def test_normalized_boxes_round_trip():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 20.0], [5.0, 10.0, 15.0, 30.0]])
    normalized = normalized_cxcywh(boxes, (40, 20))
    assert torch.allclose(normalized[0], torch.tensor([0.25, 0.25, 0.5, 0.5]))
    assert torch.allclose(scale_cxcywh_to_xyxy(normalized, torch.tensor([40.0, 20.0])), boxes)


def test_matcher_equals_transformers():
    generator = torch.Generator().manual_seed(0)
    outputs = _prediction(generator, 3, 12, 5)
    targets = _targets(generator, (4, 0, 7), 5)
    ours = BoxMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0)(outputs, targets)
    hf = DeformableDetrHungarianMatcher(class_cost=2.0, bbox_cost=5.0, giou_cost=2.0)(
        {"logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]}, _hf_labels(targets)
    )
    for (q, t), (hq, ht) in zip(ours, hf, strict=True):
        assert torch.equal(q, hq) and torch.equal(t, ht)
    assert len(ours[1][0]) == 0


def test_losses_equal_deformable_detr_loss():
    generator = torch.Generator().manual_seed(1)
    layers, classes = 3, 6
    predictions = [_prediction(generator, 2, 10, classes) for _ in range(layers)]
    outputs = {**predictions[-1], "aux_outputs": predictions[:-1]}
    targets = _targets(generator, (3, 5), classes)
    config = DeformableDetrConfig(num_labels=classes, decoder_layers=layers, auxiliary_loss=True, class_cost=2)
    _, hf, _ = DeformableDetrForObjectDetectionLoss(
        predictions[-1]["pred_logits"],
        _hf_labels(targets),
        "cpu",
        predictions[-1]["pred_boxes"],
        config,
        outputs_class=torch.stack([p["pred_logits"] for p in predictions]),
        outputs_coord=torch.stack([p["pred_boxes"] for p in predictions]),
    )
    criterion = BoxCriterion(classes, class_weight=2.0, bbox_weight=5.0, giou_weight=2.0)
    losses = criterion(outputs, targets)
    assert len(losses) == 3 * layers
    for key, value in losses.items():  # transformers' losses come unweighted, under the same names
        weight = criterion.weight_dict[key if key in criterion.weight_dict else key.rsplit("_", 1)[0]]
        assert value.item() / weight == pytest.approx(hf[key].item(), rel=1e-5, abs=1e-6), key


def _dn_meta(counts, groups):
    """RT-DETR's layout: per group 2 * max N queries, the first N_b of each group positive."""
    max_gt = max(counts)
    positive = [torch.cat([g * 2 * max_gt + torch.arange(n) for g in range(groups)]) for n in counts]
    num_dn = 2 * max_gt * groups
    return {"dn_positive_idx": positive, "dn_num_group": groups, "dn_num_split": [num_dn, 0]}


def test_losses_equal_rtdetr_loss_with_denoising_and_varifocal():
    generator = torch.Generator().manual_seed(2)
    layers, classes, queries, counts, groups = 3, 5, 9, (2, 4), 3
    dn_meta = _dn_meta(counts, groups)
    num_dn = dn_meta["dn_num_split"][0]
    dn_meta["dn_num_split"] = [num_dn, queries]
    full = [_prediction(generator, 2, num_dn + queries, classes) for _ in range(layers)]
    enc = _prediction(generator, 2, queries, classes)
    targets = _targets(generator, counts, classes)
    config = RTDetrConfig(num_labels=classes, decoder_layers=layers)  # vfl 1, bbox 5, giou 2, alpha 0.75
    outputs_class = torch.stack([p["pred_logits"] for p in full], 1)  # (B, L, Q_dn + Q, K)
    outputs_coord = torch.stack([p["pred_boxes"] for p in full], 1)
    _, hf, _ = RTDetrForObjectDetectionLoss(
        outputs_class[:, -1],
        _hf_labels(targets),
        "cpu",
        outputs_coord[:, -1],
        config,
        outputs_class=outputs_class,
        outputs_coord=outputs_coord,
        enc_topk_logits=enc["pred_logits"],
        enc_topk_bboxes=enc["pred_boxes"],
        denoising_meta_values=dn_meta,
    )

    def split(p):
        return (
            {key: value[:, :num_dn] for key, value in p.items()},
            {key: value[:, num_dn:] for key, value in p.items()},
        )

    dn_parts, parts = zip(*(split(p) for p in full), strict=True)
    outputs = {
        **parts[-1],
        "aux_outputs": list(parts[:-1]),
        "enc_outputs": enc,
        "dn_outputs": list(dn_parts),
        "dn_meta": dn_meta,
    }
    losses = BoxCriterion(classes, matcher=BoxMatcher(2.0, 5.0, 2.0, focal_alpha=0.25), **RTDETR)(outputs, targets)
    names = {"": "", **{f"_{i}": f"_aux_{i}" for i in range(layers - 1)}, "_enc": f"_aux_{layers - 1}"}
    names.update({f"_dn_{i}": f"_dn_{i}" for i in range(layers)})
    expected = {
        f"{base}{hf_suffix}": f"{base}{suffix}"
        for suffix, hf_suffix in names.items()
        for base in ("loss_vfl", "loss_bbox", "loss_giou")
    }
    assert set(losses) == set(expected.values()) and set(hf) == set(expected)
    for hf_key, key in expected.items():
        assert losses[key].item() == pytest.approx(hf[hf_key].item(), rel=1e-5, abs=1e-6), key


def test_focal_and_box_losses_by_hand():
    # One image, one query, K = 1: logit 0 (p = 1/2), box equal to the target's -> L1 0, GIoU loss 0.
    # Focal of p = 1/2 on target 1 (alpha 1/4, gamma 2): 1/4 * 1/4 * ln 2; one box, weight 2.
    box = torch.tensor([[[0.5, 0.5, 0.2, 0.2]]])
    outputs = {"pred_logits": torch.zeros(1, 1, 1), "pred_boxes": box}
    losses = BoxCriterion(1)(outputs, [{"labels": torch.tensor([0]), "boxes_cxcywh": box[0]}])
    assert losses["loss_ce"].item() == pytest.approx(2 * math.log(2) / 16, rel=1e-6)
    assert losses["loss_bbox"].item() == pytest.approx(0.0, abs=1e-7)
    assert losses["loss_giou"].item() == pytest.approx(0.0, abs=1e-6)


def test_images_without_targets_train_every_query_as_background():
    generator = torch.Generator().manual_seed(3)
    outputs = _prediction(generator, 2, 5, 3)
    outputs["pred_logits"].requires_grad_(True)
    empty = {"labels": torch.zeros(0, dtype=torch.long), "boxes_cxcywh": torch.zeros(0, 4)}
    losses = BoxCriterion(3)(outputs, [empty, empty])
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_giou"].item() == 0.0
    assert losses["loss_ce"].item() > 0
    losses["loss_ce"].backward()
    assert outputs["pred_logits"].grad.abs().sum() > 0


def test_postprocess_top_k_over_queries_and_classes_at_the_original_size():
    # Padded input 64 x 64; the image was 32 x 48 (h, w) after resizing a 64 x 96 original (x 2).
    logits = torch.full((1, 3, 2), -10.0)
    logits[0, 1, 0], logits[0, 2, 1], logits[0, 0, 1] = 3.0, 2.0, 1.0
    boxes = torch.tensor([[[0.25, 0.25, 0.5, 0.5], [0.5, 0.25, 0.25, 0.25], [0.125, 0.125, 0.25, 0.25]]])
    predictions = BoxPostProcessor(test_topk=2)(
        {"pred_logits": logits, "pred_boxes": boxes}, (64, 64), [(32, 48)], [(64, 96)]
    )
    instances = predictions[0]["instances"]
    assert instances["labels"].tolist() == [0, 1]
    assert instances["scores"].tolist() == pytest.approx([torch.sigmoid(torch.tensor(3.0)).item(), 0.880797], rel=1e-5)
    # query 1: cx 32, cy 16, w 16, h 16 in padded pixels -> (24, 8, 40, 24); x 2 -> (48, 16, 80, 48)
    assert instances["boxes"][0].tolist() == pytest.approx([48.0, 16.0, 80.0, 48.0])
    assert instances["boxes"][1].tolist() == pytest.approx([0.0, 0.0, 32.0, 32.0])


def test_nan_predictions_are_a_clear_error():
    generator = torch.Generator().manual_seed(4)
    outputs = _prediction(generator, 1, 4, 2)
    outputs["pred_boxes"][0, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN.*diverged"):
        BoxCriterion(2)(outputs, _targets(generator, (2,), 2))


def test_wrong_class_count_is_a_clear_error():
    generator = torch.Generator().manual_seed(5)
    with pytest.raises(ValueError, match="num_classes = 3"):
        BoxCriterion(3)(_prediction(generator, 1, 4, 4), _targets(generator, (1,), 3))
