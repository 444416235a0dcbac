"""Point sampling and Hungarian matching: values by hand, known assignments, transformers' matcher, NaN/inf."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from transformers.models.mask2former.modeling_mask2former import Mask2FormerHungarianMatcher
from transformers.models.maskformer.modeling_maskformer import MaskFormerHungarianMatcher

from densepred.heads.matcher import HungarianMatcher, batch_dice_cost, batch_sigmoid_ce_cost, batch_sigmoid_focal_cost
from densepred.heads.point_sampling import point_sample, sample_uncertain_points

LN2, LN3, LN4, LN4_3 = math.log(2), math.log(3), math.log(4), math.log(4 / 3)


def test_point_sample_on_known_map():
    # Channel 0 is a ramp equal to the column index j; channel 1 is constant 1. A normalised point x reads
    # column x * W - 0.5, so inside the map the ramp is read exactly; outside it blends with zero padding.
    ramp = torch.arange(4.0).expand(4, 4)
    maps = torch.stack([ramp, torch.ones(4, 4)])[None]  # (1, 2, 4, 4)
    points = torch.tensor([[[0.5, 0.5], [0.125, 0.375], [0.875, 0.6], [0.3, 0.7], [0.0, 0.0], [0.0, 0.5]]])
    values = point_sample(maps, points)
    assert values.shape == (1, 2, 6)
    # ramp: 0.5*4-0.5 = 1.5, 0.125*4-0.5 = 0, 0.875*4-0.5 = 3, 0.3*4-0.5 = 0.7; corner (0, 0) reads
    # pixel (-0.5, -0.5): weight 1/4 on pixel (0, 0) (value 0) and the rest on padding; (0, 0.5): half padding.
    torch.testing.assert_close(values[0, 0], torch.tensor([1.5, 0.0, 3.0, 0.7, 0.0, 0.0]))
    # constant 1: 1 inside; 1/4 at the corner; 1/2 half a pixel outside the left edge.
    torch.testing.assert_close(values[0, 1], torch.tensor([1.0, 1.0, 1.0, 1.0, 0.25, 0.5]))


def test_uncertain_points_are_the_most_uncertain_candidates_plus_uniform_ones():
    logits = torch.randn(2, 1, 8, 8) * 3
    torch.manual_seed(0)
    points = sample_uncertain_points(logits, num_points=20, oversample_ratio=3.0, importance_sample_ratio=0.75)
    assert points.shape == (2, 20, 2) and points.min() >= 0 and points.max() <= 1
    # The same draws by hand: 60 candidates, the 15 with the smallest |logit| kept, then 5 uniform points.
    torch.manual_seed(0)
    candidates = torch.rand(2, 60, 2)
    uniform = torch.rand(2, 5, 2)
    candidate_abs = point_sample(logits, candidates)[:, 0].abs()
    for mask in range(2):
        chosen = points[mask, :15]
        chosen_abs = point_sample(logits[mask : mask + 1], chosen[None])[0, 0].abs()
        others = [c for c in range(60) if not any(torch.equal(candidates[mask, c], p) for p in chosen)]
        assert len(others) == 45  # 15 distinct candidates were taken
        assert chosen_abs.max() <= candidate_abs[mask, others].min()
    torch.testing.assert_close(points[:, 15:], uniform, rtol=0, atol=0)
    with pytest.raises(ValueError, match="oversample_ratio"):
        sample_uncertain_points(logits, 10, oversample_ratio=0.5)


def test_pairwise_costs_by_hand():
    # One prediction with logits (0, ln 3): probabilities (1/2, 3/4). Targets t0 = (1, 0) and t1 = (0, 1).
    logits = torch.tensor([[[0.0, LN3]]])
    targets = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    # BCE, mean of the two points: t0: (-ln 1/2 - ln 1/4) / 2; t1: (-ln 1/2 - ln 3/4) / 2.
    bce = [(LN2 + LN4) / 2, (LN2 + LN4_3) / 2]
    # dice = 1 - (2 p.t + 1) / (sum p + sum t + 1), sum p = 1.25: t0: p.t = 1/2; t1: p.t = 3/4.
    dice = [1 - 2.0 / 3.25, 1 - 2.5 / 3.25]
    # focal (alpha 1/4, gamma 2): target 1 -> 1/4 (1-p)^2 (-ln p), target 0 -> 3/4 p^2 (-ln(1-p)); mean.
    focal = [
        (0.25 * 0.5**2 * LN2 + 0.75 * 0.75**2 * LN4) / 2,
        (0.75 * 0.5**2 * LN2 + 0.25 * 0.25**2 * LN4_3) / 2,
    ]
    torch.testing.assert_close(batch_sigmoid_ce_cost(logits, targets), torch.tensor([[bce]]))
    torch.testing.assert_close(batch_dice_cost(logits, targets), torch.tensor([[dice]]))
    torch.testing.assert_close(batch_sigmoid_focal_cost(logits, targets), torch.tensor([[focal]]))


def _full_mode_example():
    """3 queries, 2 targets, K = 2 classes; predictions on a 1 x 2 grid, targets at stride 4 (4 x 8)."""
    class_logits = torch.tensor([[LN2, 0.0, 0.0], [0.0, LN2, 0.0], [0.0, 0.0, math.log(6)]])
    mask_logits = torch.tensor([[0.0, LN3], [LN3, 0.0], [-LN3, -LN3]]).view(3, 1, 2)
    masks = torch.zeros(2, 4, 8, dtype=torch.bool)
    masks[0, :, :4] = True  # left half: on the 1 x 2 grid (nearest) target t0 = (1, 0)
    masks[1, :, 4:] = True  # right half: t1 = (0, 1)
    outputs = {"pred_logits": class_logits[None], "pred_masks": mask_logits[None]}
    return outputs, [{"labels": torch.tensor([0, 1]), "masks": masks}]


def test_full_matcher_cost_and_assignment_by_hand():
    outputs, targets = _full_mode_example()
    matcher = HungarianMatcher(cost_class=1.0, cost_mask=20.0, cost_dice=1.0, mask_loss="full")
    # Class probabilities: q0 (1/2, 1/4, 1/4), q1 (1/4, 1/2, 1/4), q2 (1/8, 1/8, 3/4); labels t0 = 0, t1 = 1.
    # Mask probabilities: q0 (1/2, 3/4), q1 (3/4, 1/2), q2 (1/4, 1/4).
    focal_a = (0.25 * 0.5**2 * LN2 + 0.75 * 0.75**2 * LN4) / 2  # q0-t0 and q1-t1 (see test above)
    focal_b = (0.75 * 0.5**2 * LN2 + 0.25 * 0.25**2 * LN4_3) / 2  # q0-t1 and q1-t0
    dice_a, dice_b = 1 - 2.0 / 3.25, 1 - 2.5 / 3.25
    # q2 against t0 = (1, 0): focal (1/4 (3/4)^2 ln 4 + 3/4 (1/4)^2 ln 4/3) / 2, dice 1 - (0.5 + 1) / (0.5 + 1 + 1);
    # against t1 the same by symmetry.
    focal_c = (0.25 * 0.75**2 * LN4 + 0.75 * 0.25**2 * LN4_3) / 2
    dice_c = 1 - 1.5 / 2.5
    expected = torch.tensor(
        [
            [-0.5 + 20 * focal_a + dice_a, -0.25 + 20 * focal_b + dice_b],
            [-0.25 + 20 * focal_b + dice_b, -0.5 + 20 * focal_a + dice_a],
            [-0.125 + 20 * focal_c + dice_c, -0.125 + 20 * focal_c + dice_c],
        ]
    )
    cost = matcher.cost_matrix(outputs, targets)
    torch.testing.assert_close(cost, expected[None])
    # The best assignment, by enumerating every pair of distinct queries: q0 -> t1, q1 -> t0 (the mask
    # terms outweigh the class preference of q0 for t0's class).
    best = min(itertools.permutations(range(3), 2), key=lambda qs: expected[qs[0], 0] + expected[qs[1], 1])
    assert best == (1, 0)
    [(queries, found)] = matcher(outputs, targets)
    assert queries.tolist() == [0, 1] and found.tolist() == [1, 0]
    assert queries.dtype == found.dtype == torch.int64


def _blob_targets(sizes, size=64, num_classes=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    targets = []
    for n in sizes:
        masks = torch.zeros(n, size, size, dtype=torch.bool)
        for i in range(n):
            y, x = torch.randint(0, size - 20, (2,), generator=generator).tolist()
            h, w = torch.randint(8, 20, (2,), generator=generator).tolist()
            masks[i, y : y + h, x : x + w] = True
        labels = torch.randint(0, num_classes, (n,), generator=generator)
        targets.append({"labels": labels, "masks": masks})
    return targets


def test_point_matcher_recovers_known_assignment_with_an_image_without_targets():
    targets = _blob_targets([3, 0, 2])
    num_queries, num_classes = 6, 5
    permutations = [[4, 0, 2], [], [5, 1]]  # target i of image b is predicted by query permutations[b][i]
    class_logits = torch.zeros(3, num_queries, num_classes + 1)
    mask_logits = torch.full((3, num_queries, 16, 16), -6.0)
    for b, (target, queries) in enumerate(zip(targets, permutations, strict=True)):
        small = F.interpolate(target["masks"][:, None].float(), size=(16, 16), mode="area")[:, 0]
        for i, q in enumerate(queries):
            mask_logits[b, q] = 12 * small[i] - 6
            class_logits[b, q, target["labels"][i]] = 4.0
    matches = HungarianMatcher(num_points=1000)({"pred_logits": class_logits, "pred_masks": mask_logits}, targets)
    assert [len(q) for q, _ in matches] == [3, 0, 2]
    for (queries, found), expected in zip(matches, permutations, strict=True):
        assert queries[found.argsort()].tolist() == expected
    assert matches[1][0].dtype == torch.int64 and matches[1][0].shape == (0,)


def test_point_matcher_equals_transformers_matcher_with_the_same_random_points():
    targets = _blob_targets([4, 0, 3], seed=1)
    generator = torch.Generator().manual_seed(2)
    class_logits = torch.randn(3, 7, 6, generator=generator)
    mask_logits = torch.randn(3, 7, 16, 16, generator=generator) * 3
    ours = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=2000)
    reference = Mask2FormerHungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=2000)
    torch.manual_seed(3)
    got = ours({"pred_logits": class_logits, "pred_masks": mask_logits}, targets)
    torch.manual_seed(3)  # transformers draws rand(1, P, 2) per image: the same numbers as our rand(B, P, 2)
    want = reference(mask_logits, class_logits, [t["masks"].float() for t in targets], [t["labels"] for t in targets])
    for (q, t), (q_ref, t_ref) in zip(got, want, strict=True):
        assert torch.equal(q, q_ref) and torch.equal(t, t_ref)


def test_full_matcher_equals_transformers_maskformer_matcher():
    targets = _blob_targets([3, 5], seed=4)
    generator = torch.Generator().manual_seed(5)
    class_logits = torch.randn(2, 8, 6, generator=generator)
    mask_logits = torch.randn(2, 8, 16, 16, generator=generator) * 3
    matcher = HungarianMatcher(1.0, 20.0, 1.0, mask_loss="full")
    got = matcher({"pred_logits": class_logits, "pred_masks": mask_logits}, targets)
    want = MaskFormerHungarianMatcher(1.0, 20.0, 1.0)(
        mask_logits, class_logits, [t["masks"].float() for t in targets], [t["labels"] for t in targets]
    )
    for (q, t), (q_ref, t_ref) in zip(got, want, strict=True):
        assert torch.equal(q, q_ref) and torch.equal(t, t_ref)


@pytest.mark.parametrize("mask_loss", ["point", "full"])
def test_cost_is_float32_under_autocast(mask_loss):
    # Under mixed precision the pair-wise sums would run in bfloat16 / float16; the matcher turns autocast
    # off, as the original, and gives the float32 cost.
    targets = _blob_targets([3, 2], seed=6)
    generator = torch.Generator().manual_seed(7)
    outputs = {
        "pred_logits": torch.randn(2, 5, 6, generator=generator),
        "pred_masks": torch.randn(2, 5, 16, 16, generator=generator).bfloat16(),
    }
    matcher = HungarianMatcher(num_points=500, mask_loss=mask_loss)
    torch.manual_seed(0)
    plain = matcher.cost_matrix(outputs, targets)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = matcher.cost_matrix(outputs, targets)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, plain, rtol=0, atol=0)


def test_batch_without_any_target():
    empty = {"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 32, 32, dtype=torch.bool)}
    outputs = {"pred_logits": torch.randn(2, 4, 3), "pred_masks": torch.randn(2, 4, 8, 8)}
    for mask_loss in ("point", "full"):
        matches = HungarianMatcher(mask_loss=mask_loss, num_points=50)(outputs, [empty, empty])
        assert [(q.tolist(), t.tolist()) for q, t in matches] == [([], []), ([], [])]


def test_nan_predictions_raise_and_infinite_ones_are_clamped():
    outputs, targets = _full_mode_example()
    for mask_loss in ("point", "full"):
        matcher = HungarianMatcher(mask_loss=mask_loss, num_points=64)
        nan_masks = outputs["pred_masks"].clone()
        nan_masks[0, 2, 0, 1] = float("nan")
        with pytest.raises(ValueError, match="NaN.*diverged"):
            matcher({"pred_logits": outputs["pred_logits"], "pred_masks": nan_masks}, targets)
        nan_logits = outputs["pred_logits"].clone()
        nan_logits[0, 0, 0] = float("nan")
        with pytest.raises(ValueError, match="image 0"):
            matcher({"pred_logits": nan_logits, "pred_masks": outputs["pred_masks"]}, targets)

        # +-inf logits: q2 predicts t1 = (0, 1) with certainty and t1's class with infinite confidence. The
        # cost stays finite; on the full grid q2 is then t1's best query (points read between the two pixels
        # see interpolated +-1e4 logits, so the point cost of q2 is large but finite).
        inf_masks = outputs["pred_masks"].clone()
        inf_masks[0, 2, 0] = torch.tensor([-float("inf"), float("inf")])
        inf_logits = outputs["pred_logits"].clone()
        inf_logits[0, 2] = torch.tensor([0.0, float("inf"), 0.0])
        inf_outputs = {"pred_logits": inf_logits, "pred_masks": inf_masks}
        assert torch.isfinite(matcher.cost_matrix(inf_outputs, targets)).all()
        [(queries, found)] = matcher(inf_outputs, targets)
        if mask_loss == "full":
            assert dict(zip(found.tolist(), queries.tolist(), strict=True))[1] == 2


def test_bad_configuration_and_targets_are_clear_errors():
    with pytest.raises(ValueError, match="mask_loss"):
        HungarianMatcher(mask_loss="points")
    with pytest.raises(ValueError, match="all 0"):
        HungarianMatcher(0, 0, 0)
    outputs = {"pred_logits": torch.randn(2, 4, 3), "pred_masks": torch.randn(2, 4, 8, 8)}
    one = {"labels": torch.tensor([1]), "masks": torch.ones(1, 32, 32, dtype=torch.bool)}
    other = {"labels": torch.tensor([0]), "masks": torch.ones(1, 32, 40, dtype=torch.bool)}
    with pytest.raises(ValueError, match="pad every image's masks"):
        HungarianMatcher()(outputs, [one, other])
    with pytest.raises(ValueError, match="targets for 1 images but predictions for 2"):
        HungarianMatcher()(outputs, [one])
