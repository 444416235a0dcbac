"""SetCriterion: each loss term by hand, images without targets, auxiliary losses, gradients, rank averaging,
and equality with transformers' Mask2FormerLoss / MaskFormerLoss on the same inputs and random draws."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from densepred.heads.criterion import (
    SetCriterion,
    average_num_masks,
    dice_loss,
    point_mask_losses,
    sigmoid_ce_loss,
    sigmoid_focal_loss,
)
from densepred.heads.point_sampling import point_sample

LN2, LN3, LN4, LN4_3 = math.log(2), math.log(3), math.log(4), math.log(4 / 3)
MASKFORMER = {"mask_loss": "full", "class_weight": 1.0, "mask_weight": 20.0, "dice_weight": 1.0}


def _empty(size=32):
    return {"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, size, size, dtype=torch.bool)}


def test_loss_terms_by_hand():
    # Two masks: logits (0, ln 3) -> probabilities (1/2, 3/4), against targets (1, 0) and (0, 1); num_masks 2.
    logits = torch.tensor([[0.0, LN3], [0.0, LN3]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    num_masks = torch.tensor(2.0)
    # BCE: per mask the mean over points, (ln 2 + ln 4) / 2 and (ln 2 + ln 4/3) / 2; summed, / 2.
    bce = ((LN2 + LN4) / 2 + (LN2 + LN4_3) / 2) / 2
    # dice: 1 - (2 p.t + 1) / (sum p + sum t + 1) = 1 - 2/3.25 and 1 - 2.5/3.25; summed, / 2.
    dice = ((1 - 2 / 3.25) + (1 - 2.5 / 3.25)) / 2
    # focal (alpha 1/4, gamma 2): target 1 -> 1/4 (1-p)^2 (-ln p); target 0 -> 3/4 p^2 (-ln(1-p)).
    focal = ((0.25 * 0.25 * LN2 + 0.75 * 0.5625 * LN4) / 2 + (0.75 * 0.25 * LN2 + 0.25 * 0.0625 * LN4_3) / 2) / 2
    assert sigmoid_ce_loss(logits, targets, num_masks).item() == pytest.approx(bce, rel=1e-6)
    assert dice_loss(logits, targets, num_masks).item() == pytest.approx(dice, rel=1e-6)
    assert sigmoid_focal_loss(logits, targets, num_masks).item() == pytest.approx(focal, rel=1e-6)


def test_class_loss_with_no_object_weight_and_full_mask_losses_by_hand():
    # One image, K = 1, two queries. q0: class logits (ln 3, 0) -> p(class 0) = 3/4, mask logits 0 (p = 1/2);
    # q1: (0, 0) -> 1/2, mask logits ln 3 (p = 3/4). One target of class 0 covering the top half of 8 x 8.
    # Matching (class 1, focal 20, dice 1): q0's focal cost 0.0866 vs q1's 0.2947 -> q0 is matched.
    outputs = {
        "pred_logits": torch.tensor([[[LN3, 0.0], [0.0, 0.0]]]),
        "pred_masks": torch.stack([torch.zeros(2, 2), torch.full((2, 2), LN3)])[None],  # constant: upsampling keeps it
    }
    masks = torch.zeros(1, 8, 8, dtype=torch.bool)
    masks[0, :4] = True
    losses = SetCriterion(num_classes=1, **MASKFORMER)(outputs, [{"labels": torch.tensor([0]), "masks": masks}])
    # CE: q0 target class 0 (weight 1): -ln 3/4; q1 target no-object (weight 0.1): -ln 1/2; weighted mean.
    ce = (-math.log(0.75) + 0.1 * LN2) / 1.1
    # focal of p = 1/2 on 32 ones and 32 zeros: (1/4 (1/2)^2 ln 2 + 3/4 (1/2)^2 ln 2) / 2 = ln 2 / 8; x 20.
    focal = 20 * LN2 / 8
    # dice: 1 - (2 * 0.5 * 32 + 1) / (0.5 * 64 + 32 + 1) = 1 - 33/65; x 1.
    dice = 1 - 33 / 65
    assert losses["loss_ce"].item() == pytest.approx(ce, rel=1e-6)
    assert losses["loss_mask"].item() == pytest.approx(focal, rel=1e-6)
    assert losses["loss_dice"].item() == pytest.approx(dice, rel=1e-6)


def test_point_losses_by_hand_and_an_image_without_targets():
    # Mask logits 0 everywhere read 0 at every point (zero padding included): BCE ln 2 whatever the label.
    # Targets are empty masks, so every sampled label is 0 and dice = 1 - 1 / (P/2 + 1).
    # Image 0 has two targets, image 1 none: num_masks = 2, M = 2 matched masks. Class logits 0 over
    # K + 1 = 4 classes: every query's CE is ln 4 whatever its label or weight.
    num_points = 100
    outputs = {"pred_logits": torch.zeros(2, 5, 4), "pred_masks": torch.zeros(2, 5, 8, 8)}
    target = {"labels": torch.tensor([0, 2]), "masks": torch.zeros(2, 32, 32, dtype=torch.bool)}
    losses = SetCriterion(num_classes=3, num_points=num_points)(outputs, [target, _empty()])
    assert losses["loss_ce"].item() == pytest.approx(2.0 * LN4, rel=1e-6)
    assert losses["loss_mask"].item() == pytest.approx(5.0 * LN2 * 2 / 2, rel=1e-6)
    assert losses["loss_dice"].item() == pytest.approx(5.0 * (1 - 1 / (num_points / 2 + 1)) * 2 / 2, rel=1e-6)


@pytest.mark.parametrize("mask_loss", ["point", "full"])
def test_batch_without_any_target_gives_zero_mask_losses_and_gradients(mask_loss):
    pred_logits = torch.randn(2, 4, 3, requires_grad=True)
    pred_masks = torch.randn(2, 4, 8, 8, requires_grad=True)
    losses = SetCriterion(num_classes=2, mask_loss=mask_loss, num_points=64)(
        {"pred_logits": pred_logits, "pred_masks": pred_masks}, [_empty(), _empty()]
    )
    assert losses["loss_mask"].item() == 0 and losses["loss_dice"].item() == 0
    # every query is labelled no-object (class 2): CE is the plain mean of -log p(no-object), times 2.0.
    expected_ce = 2.0 * -pred_logits.detach().log_softmax(-1)[..., 2].mean()
    torch.testing.assert_close(losses["loss_ce"], expected_ce)
    sum(losses.values()).backward()
    assert pred_masks.grad is not None and torch.equal(pred_masks.grad, torch.zeros_like(pred_masks))
    assert pred_logits.grad.abs().sum() > 0


def _saved_storages(fn):
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn()
    return out, storages


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("num_masks", [3, 0])
def test_point_mask_losses_equal_the_plain_losses_and_keep_less(dtype, tolerance, num_masks):
    generator = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(num_masks, 1, 6, 7, generator=generator, dtype=dtype)).requires_grad_(True)
    points = torch.rand(num_masks, 50, 2, generator=generator, dtype=dtype) * 1.2 - 0.1  # some in the padding
    targets = torch.rand(num_masks, 50, generator=generator, dtype=dtype).round()
    count = torch.tensor(2.5)
    weights = torch.tensor([5.0, 7.0], dtype=dtype)  # the criterion's loss weights, as upstream gradients

    def plain():
        values = point_sample(logits, points)[:, 0]
        return sigmoid_ce_loss(values, targets, count), dice_loss(values, targets, count)

    (bce, dice), plain_saved = _saved_storages(plain)
    (fused_bce, fused_dice), fused_saved = _saved_storages(lambda: point_mask_losses(logits, points, targets, count))
    torch.testing.assert_close(fused_bce, bce, rtol=0, atol=0)
    torch.testing.assert_close(fused_dice, dice, rtol=0, atol=0)
    (grad,) = torch.autograd.grad(weights[0] * bce + weights[1] * dice, logits)
    (fused_grad,) = torch.autograd.grad(weights[0] * fused_bce + weights[1] * fused_dice, logits)
    torch.testing.assert_close(fused_grad, grad, rtol=tolerance, atol=tolerance)
    if num_masks:
        assert grad.abs().sum() > 0
        # the fused losses keep the logits, the grid and the targets; not the (M, P) point logits and sigmoid
        point_bytes = num_masks * 50 * logits.element_size()
        assert sum(plain_saved.values()) - sum(fused_saved.values()) >= 2 * point_bytes


def _random_batch(seed, num_queries=6, num_classes=4, sizes=(3, 0, 2), num_aux=2):
    generator = torch.Generator().manual_seed(seed)

    def layer():
        return {
            "pred_logits": torch.randn(len(sizes), num_queries, num_classes + 1, generator=generator),
            "pred_masks": torch.randn(len(sizes), num_queries, 16, 16, generator=generator) * 2,
        }

    outputs = {**layer(), "aux_outputs": [layer() for _ in range(num_aux)]}
    targets = []
    for n in sizes:
        masks = torch.zeros(n, 64, 64, dtype=torch.bool)
        for i in range(n):
            y, x = torch.randint(0, 44, (2,), generator=generator).tolist()
            masks[i, y : y + 20, x : x + 16] = True
        targets.append({"labels": torch.randint(0, num_classes, (n,), generator=generator), "masks": masks})
    return outputs, targets


def test_auxiliary_losses_keys_weights_and_gradients():
    outputs, targets = _random_batch(0)
    leaves = [outputs["pred_logits"], outputs["pred_masks"]]
    leaves += [aux[key] for aux in outputs["aux_outputs"] for key in ("pred_logits", "pred_masks")]
    for leaf in leaves:
        leaf.requires_grad_(True)
    criterion = SetCriterion(num_classes=4, **MASKFORMER)
    losses = criterion(outputs, targets)
    names = ["loss_ce", "loss_mask", "loss_dice"]
    assert list(losses) == names + [f"{n}_{i}" for i in range(2) for n in names]
    # Auxiliary layer i alone gives the same (weighted) losses.
    alone = criterion(outputs["aux_outputs"][1], targets)
    for name in names:
        torch.testing.assert_close(losses[f"{name}_1"], alone[name])
    # Weights: the same criterion with unit weights (same matcher costs) gives losses / weight.
    unit = SetCriterion(4, matcher=criterion.matcher, mask_loss="full", class_weight=1, mask_weight=1, dice_weight=1)
    unweighted = unit(outputs, targets)
    for key, value in losses.items():
        weight = criterion.weight_dict[key.rsplit("_", 1)[0] if key[-1].isdigit() else key]
        torch.testing.assert_close(value, weight * unweighted[key])
    sum(losses.values()).backward()
    assert all(leaf.grad is not None and leaf.grad.abs().sum() > 0 for leaf in leaves)


def _hf_aux(outputs):
    return [
        {"class_queries_logits": aux["pred_logits"], "masks_queries_logits": aux["pred_masks"]}
        for aux in outputs["aux_outputs"]
    ]


def _compare_with_transformers(ours, reference_losses, weight_dict):
    renamed = {key.replace("loss_cross_entropy", "loss_ce"): value for key, value in reference_losses.items()}
    assert set(renamed) == set(ours)
    for key, value in ours.items():
        weight = weight_dict[key.rsplit("_", 1)[0] if key[-1].isdigit() else key]
        torch.testing.assert_close(value, weight * renamed[key], rtol=1e-5, atol=1e-6)


def test_point_criterion_equals_transformers_mask2former_loss_with_the_same_random_draws():
    # transformers is imported here, not at the top, so that the distributed test's workers start fast.
    from transformers import Mask2FormerConfig
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss

    outputs, targets = _random_batch(1)
    config = Mask2FormerConfig(
        num_labels=4, no_object_weight=0.1, class_weight=2.0, mask_weight=5.0, dice_weight=5.0,
        train_num_points=3000, oversample_ratio=3.0, importance_sample_ratio=0.75,
    )  # fmt: skip
    reference = Mask2FormerLoss(config, weight_dict={})
    ours = SetCriterion(num_classes=4, num_points=3000)
    mask_labels, class_labels = [t["masks"].float() for t in targets], [t["labels"] for t in targets]
    # Ours matches every prediction before computing any loss (one host round trip), transformers matches and
    # computes the losses prediction by prediction: the random draws come in another order. Each prediction
    # alone draws in the same order on both sides: matcher points, uncertain candidates, random points.
    for prediction in [outputs, *outputs["aux_outputs"]]:
        torch.manual_seed(7)
        want = reference(prediction["pred_masks"], prediction["pred_logits"], mask_labels, class_labels, None)
        torch.manual_seed(7)
        got = ours({"pred_logits": prediction["pred_logits"], "pred_masks": prediction["pred_masks"]}, targets)
        _compare_with_transformers(got, want, ours.weight_dict)
    # and the matched indices of the final layer, with the same matcher draws
    torch.manual_seed(8)
    want_matches = reference.matcher(outputs["pred_masks"], outputs["pred_logits"], mask_labels, class_labels)
    torch.manual_seed(8)
    got_matches = ours.matcher(outputs, targets)
    assert all(
        torch.equal(a, b)
        for pair, ref in zip(got_matches, want_matches, strict=True)
        for a, b in zip(pair, ref, strict=True)
    )


def test_full_criterion_equals_transformers_maskformer_loss():
    from transformers.models.maskformer.modeling_maskformer import MaskFormerHungarianMatcher, MaskFormerLoss

    outputs, targets = _random_batch(2, sizes=(2, 4))
    reference = MaskFormerLoss(4, MaskFormerHungarianMatcher(1.0, 20.0, 1.0), weight_dict={}, eos_coef=0.1)
    ours = SetCriterion(num_classes=4, **MASKFORMER)
    mask_labels, class_labels = [t["masks"].float() for t in targets], [t["labels"] for t in targets]
    want = reference(outputs["pred_masks"], outputs["pred_logits"], mask_labels, class_labels, _hf_aux(outputs))
    _compare_with_transformers(ours(outputs, targets), want, ours.weight_dict)
    want_matches = reference.matcher(outputs["pred_masks"], outputs["pred_logits"], mask_labels, class_labels)
    got_matches = ours.matcher(outputs, targets)
    assert all(
        torch.equal(a, b)
        for pair, ref in zip(got_matches, want_matches, strict=True)
        for a, b in zip(pair, ref, strict=True)
    )


def _rank_worker(rank, init_file, results_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        # rank 0 has two all-ones targets, rank 1 none: num_masks = (2 + 0) / 2 = 1 on both ranks.
        count = average_num_masks(2 if rank == 0 else 0, torch.device("cpu"))
        # Full-mode dice with mask logits 0 (p = 1/2) on an all-ones 8 x 8 mask: 1 - 65/97 per mask.
        outputs = {"pred_logits": torch.zeros(1, 3, 2), "pred_masks": torch.zeros(1, 3, 2, 2)}
        target = {"labels": torch.tensor([0, 0]), "masks": torch.ones(2, 8, 8, dtype=torch.bool)}
        losses = SetCriterion(1, **MASKFORMER)(outputs, [target if rank == 0 else _empty(8)])
        nobody = average_num_masks(0, torch.device("cpu"))  # clamped to 1
        values = [count.item(), losses["loss_dice"].item(), nobody.item()]
        torch.save(values, f"{results_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_num_masks_is_averaged_across_ranks(tmp_path):
    mp.spawn(_rank_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert rank0 == [1.0, pytest.approx(2 * (1 - 65 / 97), rel=1e-6), 1.0]  # / 1, not / the 2 masks of rank 0
    assert rank1 == [1.0, 0.0, 1.0]
    assert average_num_masks(3, torch.device("cpu")).item() == 3.0  # not distributed: the local count


def test_bad_configuration_is_a_clear_error():
    with pytest.raises(ValueError, match="mask_loss"):
        SetCriterion(3, mask_loss="focal")
    with pytest.raises(ValueError, match="importance_sample_ratio"):
        SetCriterion(3, importance_sample_ratio=1.5)
    outputs = {"pred_logits": torch.zeros(1, 2, 3), "pred_masks": torch.zeros(1, 2, 4, 4)}
    with pytest.raises(ValueError, match="expected num_classes"):
        SetCriterion(3)(outputs, [_empty(16)])
