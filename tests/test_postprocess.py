"""Post-processing on constructed predictions: semantic by hand; panoptic with overlapping queries, a
low-score query, stuff merge, overlap filter and void; instance top-k, mask scores and boxes; the resize /
crop pipeline of PostProcessor; the vectorised panoptic inference against the official loop; the exact path
(the official pipeline) for images within `exact_max_pixels` and the bounded path beyond it: equal to the
exact path up to boundary pixels, and its memory on a 12 MP photo."""

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from densepred.heads.postprocess import (
    EXACT_MAX_PIXELS,
    PostProcessor,
    instance_inference,
    panoptic_inference,
    resize_nearest,
    semantic_inference,
)

LN2, LN3 = math.log(2), math.log(3)


def test_semantic_inference_by_hand():
    # q0: class probabilities (3/5, 1/5, 1/5), mask (1/2, 3/4); q1: (1/5, 2/5, 2/5), mask (3/4, 1/2).
    class_logits = torch.tensor([[LN3, 0.0, 0.0], [0.0, LN2, LN2]])
    mask_logits = torch.tensor([[0.0, LN3], [LN3, 0.0]]).view(2, 1, 2)
    # class 0: 3/5 * 1/2 + 1/5 * 3/4 = 0.45 and 3/5 * 3/4 + 1/5 * 1/2 = 0.55
    # class 1: 1/5 * 1/2 + 2/5 * 3/4 = 0.40 and 1/5 * 3/4 + 2/5 * 1/2 = 0.35
    expected = torch.tensor([[[0.45, 0.55]], [[0.40, 0.35]]])
    torch.testing.assert_close(semantic_inference(class_logits, mask_logits), expected)


def _panoptic_example():
    """K = 3 classes (0, 1 things, 2 stuff) on a 4 x 6 image; 7 queries. Mask logits -6 outside each region."""
    confident = [9.0, 0.0, 0.0, 0.0]  # class 0 with probability e^9 / (e^9 + 3)
    class_logits = torch.tensor(
        [
            confident,  # q0: thing 0
            confident,  # q1: thing 0
            [0.0, 1.0, 0.0, 0.0],  # q2: class 1 with probability e / (e + 3) = 0.48 < 0.8: removed
            [0.0, 0.0, 9.0, 0.0],  # q3: stuff 2
            [0.0, 0.0, 9.0, 0.0],  # q4: stuff 2 again, merged with q3
            [0.0, 0.0, 0.0, 9.0],  # q5: no-object: removed
            [0.0, 9.0, 0.0, 0.0],  # q6: thing 1
        ]
    )
    masks = torch.full((7, 4, 6), -6.0)
    masks[0, 0:2, 0:5] = 6.0  # 10 pixels; overlaps q1 in column 4
    masks[1, 0:2, 4:6] = 8.0  # 4 pixels; wins column 4 (larger probability, same score)
    masks[2] = 10.0  # would win everywhere if it were kept
    masks[3, 2, :] = 6.0
    masks[3, 3, 4:] = -3.0  # q3 wins (3, 4) and (3, 5) but with probability < 1/2 there: void pixels
    masks[4, 3, 0:3] = 6.0
    masks[6, 2:4, 0:4] = 4.0  # 8 pixels, loses to q3 / q4 except at (3, 3) ...
    masks[6, 3, 3] = 8.0  # ... which it wins: 1 / 8 of its mask < 0.8, so it is dropped
    masks[5] = 10.0
    return class_logits, masks


def test_panoptic_inference_on_constructed_predictions():
    class_logits, masks = _panoptic_example()
    is_thing = torch.tensor([True, True, False])
    panoptic, segments = panoptic_inference(class_logits, masks, is_thing)
    # q0 keeps 8 of its 10 pixels (ratio 0.8, not below the threshold) -> segment 1; q1 -> segment 2;
    # q3 and q4 (stuff class 2) -> one segment 3; (3, 3) won by the dropped q6 and (3, 4), (3, 5) where no
    # mask reaches 0.5 are void.
    expected = torch.tensor(
        [
            [1, 1, 1, 1, 2, 2],
            [1, 1, 1, 1, 2, 2],
            [3, 3, 3, 3, 3, 3],
            [3, 3, 3, 0, 0, 0],
        ],
        dtype=torch.int32,
    )
    assert panoptic.dtype == torch.int32
    assert torch.equal(panoptic, expected)
    score = math.exp(9) / (math.exp(9) + 3)
    assert segments == [
        {"id": 1, "label": 0, "isthing": True, "score": pytest.approx(score)},
        {"id": 2, "label": 0, "isthing": True, "score": pytest.approx(score)},
        {"id": 3, "label": 2, "isthing": False, "score": pytest.approx(score)},
    ]
    # Class 2 as a thing: q3 and q4 become two segments.
    panoptic, segments = panoptic_inference(class_logits, masks, torch.tensor([True, True, True]))
    assert [s["id"] for s in segments] == [1, 2, 3, 4] and panoptic[3, 0].item() == 4
    # A stricter overlap threshold drops q0 (0.8 < 0.9): its pixels become void.
    panoptic, segments = panoptic_inference(class_logits, masks, is_thing, overlap_threshold=0.9)
    assert [s["label"] for s in segments] == [0, 2] and (panoptic[:2, :4] == 0).all()
    # Nothing confident enough: all void.
    panoptic, segments = panoptic_inference(class_logits, masks, is_thing, object_mask_threshold=0.9999)
    assert segments == [] and (panoptic == 0).all()


def _official_panoptic_loop(class_logits, mask_logits, is_thing, object_mask_threshold, overlap_threshold):
    """The official Mask2Former `panoptic_inference`, transcribed as written (a loop over queries); also
    returns how many stuff queries were merged into an earlier segment."""
    scores, labels = F.softmax(class_logits, dim=-1).max(-1)
    mask_pred = mask_logits.sigmoid()
    keep = labels.ne(class_logits.shape[-1] - 1) & (scores > object_mask_threshold)
    cur_scores, cur_classes, cur_masks = scores[keep], labels[keep], mask_pred[keep]
    cur_prob_masks = cur_scores.view(-1, 1, 1) * cur_masks
    panoptic_seg = torch.zeros(mask_logits.shape[-2:], dtype=torch.int32)
    segments_info = []
    current_segment_id = merged = 0
    if cur_masks.shape[0] == 0:
        return panoptic_seg, segments_info, merged
    cur_mask_ids = cur_prob_masks.argmax(0)
    stuff_memory_list = {}
    for k in range(cur_classes.shape[0]):
        pred_class = cur_classes[k].item()
        isthing = bool(is_thing[pred_class])
        mask_area = (cur_mask_ids == k).sum().item()
        original_area = (cur_masks[k] >= 0.5).sum().item()
        mask = (cur_mask_ids == k) & (cur_masks[k] >= 0.5)
        if mask_area > 0 and original_area > 0 and mask.sum().item() > 0:
            if mask_area / original_area < overlap_threshold:
                continue
            if not isthing:
                if int(pred_class) in stuff_memory_list:
                    panoptic_seg[mask] = stuff_memory_list[int(pred_class)]
                    merged += 1
                    continue
                stuff_memory_list[int(pred_class)] = current_segment_id + 1
            current_segment_id += 1
            panoptic_seg[mask] = current_segment_id
            segments_info.append({"id": current_segment_id, "isthing": isthing, "label": int(pred_class)})
    return panoptic_seg, segments_info, merged


def test_vectorised_panoptic_equals_the_official_loop_on_random_predictions():
    generator = torch.Generator().manual_seed(0)
    is_thing = torch.tensor([True, False, True, False, False])
    checked_segments = checked_merges = 0
    for trial in range(20):
        class_logits = torch.randn(30, 6, generator=generator) * 4  # sharp: many queries pass 0.8
        # each query: a random rectangle (logit +4) on noise around -4
        mask_logits = torch.randn(30, 24, 32, generator=generator) - 4
        corners = torch.randint(0, 20, (30, 2), generator=generator)
        extents = torch.randint(4, 16, (30, 2), generator=generator)
        for q, ((y, x), (h, w)) in enumerate(zip(corners.tolist(), extents.tolist(), strict=True)):
            mask_logits[q, y : y + h, x : x + w] += 8
        threshold = [0.5, 0.8][trial % 2]
        got_map, got_segments = panoptic_inference(class_logits, mask_logits, is_thing, threshold, threshold)
        want_map, want_segments, merged = _official_panoptic_loop(
            class_logits, mask_logits, is_thing, threshold, threshold
        )
        assert torch.equal(got_map, want_map)
        assert [{k: s[k] for k in ("id", "isthing", "label")} for s in got_segments] == want_segments
        checked_segments += len(want_segments)
        checked_merges += merged
    # the comparison covers many segments and stuff merges
    assert checked_segments > 40 and checked_merges > 5, (checked_segments, checked_merges)


def test_instance_inference_top_k_scores_and_boxes():
    # q0: class 0 with p = e^5 / (e^5 + 2); q1: class 1 with p = e^4 / (e^4 + 2); q2: mostly no-object.
    class_logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 3.0]])
    mask_logits = torch.full((3, 6, 8), -2.0)
    mask_logits[0, 1:3, 2:5] = 2.0  # rows 1-2, columns 2-4
    mask_logits[1, 4:6, 0:8] = 1.0  # rows 4-5, every column
    result = instance_inference(class_logits, mask_logits, test_topk=2)
    p0, p1 = math.exp(5) / (math.exp(5) + 2), math.exp(4) / (math.exp(4) + 2)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert result["labels"].tolist() == [0, 1]
    assert torch.equal(result["masks"], mask_logits[:2] > 0)
    # score = class probability x mean mask probability inside the mask (all pixels inside have logit 2, 1)
    torch.testing.assert_close(result["scores"], torch.tensor([p0 * sigmoid(2.0), p1 * sigmoid(1.0)]))
    torch.testing.assert_close(result["boxes"], torch.tensor([[2.0, 1.0, 4.0, 2.0], [0.0, 4.0, 7.0, 5.0]]))
    # only class 0 kept (a panoptic model keeping its thing classes)
    kept = instance_inference(class_logits, mask_logits, test_topk=2, keep_classes=torch.tensor([True, False]))
    assert kept["labels"].tolist() == [0] and kept["masks"].shape == (1, 6, 8)
    # top-k larger than Q x K: every pair, highest class probability first
    every = instance_inference(class_logits, mask_logits, test_topk=100)
    assert len(every["labels"]) == 6 and every["labels"][:2].tolist() == [0, 1]


def _batch_outputs():
    """2 images padded to 32 x 32 (mask logits 8 x 8), K = 2, 3 queries."""
    class_logits = torch.tensor([[9.0, 0.0, 0.0], [0.0, 9.0, 0.0], [0.0, 0.0, 9.0]]).expand(2, 3, 3).clone()
    mask_logits = torch.full((2, 3, 8, 8), -10.0)
    mask_logits[:, 0, :, :4] = 10.0  # query 0 (class 0): padded columns 0-15
    mask_logits[:, 1, :, 4:6] = 10.0  # query 1 (class 1): padded columns 16-23
    mask_logits[:, 2, :, 6:] = 10.0  # query 2 (no-object): columns 24-31, the padding of image 0
    return {"pred_logits": class_logits, "pred_masks": mask_logits}


def test_post_processor_crops_padding_and_resizes_to_the_original_size():
    outputs = _batch_outputs()
    processor = PostProcessor(num_classes=2, thing_classes=[0], semantic_on=True, panoptic_on=True, instance_on=True)
    image_sizes, orig_sizes = [(32, 24), (16, 32)], [(64, 48), (16, 32)]
    results = processor(outputs, image_sizes, orig_sizes)
    assert [sorted(r) for r in results] == [
        ["instances", "panoptic_seg", "segments_info", "sem_seg", "sem_seg_labels"]
    ] * 2

    # Image 1 (16 x 32, no resize): class 0 on columns 0-15, class 1 on 16-23, nothing above 1/2 on 24-31
    # (bilinear upsampling x 4 of the 8 x 8 logits puts the step between pixels 15 and 16).
    sem = results[1]["sem_seg"]
    assert sem.shape == (2, 16, 32) and sem.dtype == torch.float32
    assert (sem[0, :, :16] > 0.9).all() and (sem[1, :, 16:24] > 0.9).all() and (sem[:, :, 24:] < 0.1).all()
    labels = results[1]["sem_seg_labels"]
    assert labels.dtype == torch.int32 and torch.equal(labels, sem.argmax(0).int())
    panoptic = results[1]["panoptic_seg"]
    assert panoptic.dtype == torch.int32 and panoptic.shape == (16, 32)
    assert (panoptic[:, :16] == 1).all() and (panoptic[:, 16:24] == 2).all() and (panoptic[:, 24:] == 0).all()
    assert [(s["label"], s["isthing"]) for s in results[1]["segments_info"]] == [(0, True), (1, False)]
    # instances keep only thing class 0 (panoptic model); box in original pixels
    instances = results[1]["instances"]
    assert instances["labels"].unique().tolist() == [0]
    assert instances["masks"].dtype == torch.bool and instances["masks"].shape[1:] == (16, 32)
    torch.testing.assert_close(instances["boxes"][0], torch.tensor([0.0, 0.0, 15.0, 15.0]))

    # Image 0: valid 32 x 24 of the 32 x 32 input, original 64 x 48: the padding (columns 24-31) is cropped
    # before the x 2 resize, so class 0 covers columns 0-31 and class 1 columns 32-47 of the original.
    expected_masks = F.interpolate(outputs["pred_masks"][:1], size=(32, 32), mode="bilinear")[:, :, :32, :24]
    expected_masks = F.interpolate(expected_masks, size=(64, 48), mode="bilinear")[0]
    torch.testing.assert_close(results[0]["sem_seg"], semantic_inference(outputs["pred_logits"][0], expected_masks))
    panoptic = results[0]["panoptic_seg"]
    assert panoptic.shape == (64, 48)
    assert (panoptic[:, :32] == 1).all() and (panoptic[:, 32:] == 2).all()


def test_post_processor_gives_float32_under_autocast():
    outputs = _batch_outputs()
    processor = PostProcessor(num_classes=2)
    plain = processor(outputs, [(32, 32)] * 2, [(40, 40)] * 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = processor(outputs, [(32, 32)] * 2, [(40, 40)] * 2)
    assert mixed[0]["sem_seg"].dtype == torch.float32
    torch.testing.assert_close(mixed[0]["sem_seg"], plain[0]["sem_seg"], rtol=0, atol=0)


def test_post_processor_tasks_and_errors():
    outputs = _batch_outputs()
    semantic_only = PostProcessor(num_classes=2)(outputs, [(32, 32)] * 2, [(32, 32)] * 2)
    assert [list(r) for r in semantic_only] == [["sem_seg", "sem_seg_labels"]] * 2
    instance_processor = PostProcessor(num_classes=2, semantic_on=False, instance_on=True)
    instance_only = instance_processor(outputs, [(32, 32)] * 2, [(8, 8)] * 2)
    assert list(instance_only[0]) == ["instances"] and set(instance_only[0]["instances"]["labels"].tolist()) == {0, 1}
    with pytest.raises(ValueError, match="thing_classes"):
        PostProcessor(num_classes=2, panoptic_on=True)
    with pytest.raises(ValueError, match="at least one"):
        PostProcessor(num_classes=2, semantic_on=False)
    with pytest.raises(ValueError, match=r"\[5\]"):
        PostProcessor(num_classes=2, thing_classes=[0, 5])
    with pytest.raises(ValueError, match="expected num_classes"):
        PostProcessor(num_classes=3)(outputs, [(32, 32)] * 2, [(32, 32)] * 2)
    with pytest.raises(ValueError, match="larger than the padded input"):
        PostProcessor(num_classes=2)(outputs, [(40, 32)] * 2, [(40, 32)] * 2)
    with pytest.raises(ValueError, match="exact_max_pixels=-1"):
        PostProcessor(num_classes=2, exact_max_pixels=-1)


def _official_pipeline(class_logits, mask_logits, image_size, orig_size, is_thing):
    """The official Mask2Former post-processing of one image, written out: logits upsampled x 4, cropped,
    resized to the original size, then the three inferences there."""
    padded = (mask_logits.shape[-2] * 4, mask_logits.shape[-1] * 4)
    masks = F.interpolate(mask_logits[None], size=padded, mode="bilinear", align_corners=False)
    masks = masks[:, :, : image_size[0], : image_size[1]]
    masks = F.interpolate(masks, size=orig_size, mode="bilinear", align_corners=False)[0]
    panoptic, segments = panoptic_inference(class_logits, masks, is_thing)
    return {
        "sem_seg": semantic_inference(class_logits, masks),
        "panoptic_seg": panoptic,
        "segments_info": segments,
        "instances": instance_inference(class_logits, masks, 100, is_thing),
    }


def _scene(seed: int = 0):
    """K = 5 classes (things 0-2, stuff 3-4), 15 queries on 16 x 24 mask logits (padded input 64 x 96): 12 thing
    queries, one rectangle inside each cell of a 3 x 4 grid (so things never touch); 2 stuff queries, the top and
    bottom halves outside the things; 1 no-object query. Logits +-6 plus noise."""
    generator = torch.Generator().manual_seed(seed)
    randint = lambda low, high: int(torch.randint(low, high + 1, (1,), generator=generator))  # noqa: E731
    class_logits = torch.zeros(15, 6)
    mask_logits = torch.full((15, 16, 24), -6.0)
    things = torch.zeros(16, 24, dtype=torch.bool)
    for query in range(12):
        row, column = divmod(query, 4)
        y0, x0 = 5 * row + randint(0, 1), 6 * column + randint(0, 1)
        height, width = randint(2, 3), randint(2, 4)
        mask_logits[query, y0 : y0 + height, x0 : x0 + width] = 6.0
        things[y0 : y0 + height, x0 : x0 + width] = True
        class_logits[query, query % 3] = 9.0
    halves = torch.zeros(2, 16, 24, dtype=torch.bool)
    halves[0, :8], halves[1, 8:] = True, True
    mask_logits[12:14][halves & ~things] = 6.0
    class_logits[12, 3] = class_logits[13, 4] = class_logits[14, 5] = 9.0
    mask_logits[14] = 6.0  # no-object everywhere: removed
    mask_logits += 0.3 * torch.randn(mask_logits.shape, generator=generator)
    return class_logits, mask_logits


def test_images_within_the_budget_take_the_official_path_unchanged():
    class_logits, mask_logits = _scene()
    outputs = {"pred_logits": class_logits[None], "pred_masks": mask_logits[None]}
    is_thing = torch.tensor([True, True, True, False, False])
    image_size, orig_size = (60, 90), (150, 225)  # a COCO-like upscale of the resized input
    want = _official_pipeline(class_logits, mask_logits, image_size, orig_size, is_thing)
    pixels = orig_size[0] * orig_size[1]
    for budget in (EXACT_MAX_PIXELS, pixels, None):
        processor = PostProcessor(5, [0, 1, 2], panoptic_on=True, instance_on=True, exact_max_pixels=budget)
        (got,) = processor(outputs, [image_size], [orig_size])
        assert torch.equal(got["sem_seg"], want["sem_seg"])
        assert torch.equal(got["sem_seg_labels"], want["sem_seg"].argmax(0).int())
        assert torch.equal(got["panoptic_seg"], want["panoptic_seg"]) and got["segments_info"] == want["segments_info"]
        for key in ("masks", "scores", "labels", "boxes"):
            assert torch.equal(got["instances"][key], want["instances"][key]), key
    # One pixel over the budget: the bounded path (scores at the working size, the maps at the original size).
    processor = PostProcessor(5, [0, 1, 2], panoptic_on=True, instance_on=True, exact_max_pixels=pixels - 1)
    (got,) = processor(outputs, [image_size], [orig_size])
    assert got["sem_seg"].shape == (5, *image_size) and got["sem_seg_labels"].shape == orig_size
    assert got["panoptic_seg"].shape == orig_size and got["instances"]["masks"].shape[1:] == orig_size


def _near_boundary(label_map: torch.Tensor, radius: int) -> torch.Tensor:
    """Pixels with another value within `radius` pixels (Chebyshev) of them in `label_map` (H, W)."""
    values = label_map.double()[None, None]
    window = 2 * radius + 1
    high = F.max_pool2d(values, window, stride=1, padding=radius)
    low = -F.max_pool2d(-values, window, stride=1, padding=radius)
    return (high != low)[0, 0]


def test_bounded_path_equals_the_exact_path_up_to_boundary_pixels():
    """Working size 60 x 90 (the 64 x 96 padded input, cropped), original 180 x 270: upscale x 3. Instances:
    identical (the selected logits are resized as the exact path resizes them). Panoptic: the same segments;
    the id maps differ only within 2 pixels (less than the upscale factor) of a boundary of the exact map, on
    at most 2% of the pixels (0.7% here, all within 1 pixel). Semantic label maps: the same tolerance."""
    class_logits, mask_logits = _scene()
    outputs = {"pred_logits": class_logits[None], "pred_masks": mask_logits[None]}
    image_size, orig_size = (60, 90), (180, 270)
    results = {}
    for name, budget in (("exact", None), ("bounded", 0)):
        processor = PostProcessor(5, [0, 1, 2], panoptic_on=True, instance_on=True, exact_max_pixels=budget)
        (results[name],) = processor(outputs, [image_size], [orig_size])
    exact, bounded = results["exact"], results["bounded"]

    for key in ("masks", "labels", "boxes"):
        assert torch.equal(bounded["instances"][key], exact["instances"][key]), key
    torch.testing.assert_close(bounded["instances"]["scores"], exact["instances"]["scores"], rtol=1e-6, atol=1e-7)
    assert len(exact["instances"]["labels"]) == 45  # 15 queries x 3 thing classes

    assert bounded["segments_info"] == exact["segments_info"] and len(exact["segments_info"]) == 14
    for key in ("panoptic_seg", "sem_seg_labels"):
        assert bounded[key].shape == exact[key].shape == orig_size and bounded[key].dtype == torch.int32
        differ = bounded[key] != exact[key]
        assert differ.float().mean() <= 0.02, (key, differ.float().mean())
        assert not (differ & ~_near_boundary(exact[key], 2)).any(), key
        assert differ.any()  # nearest and bilinear do differ on a boundary: the check is not vacuous
    # Scores at the working size, their arg-max (resized) is the label map.
    assert bounded["sem_seg"].shape == (5, *image_size)
    torch.testing.assert_close(bounded["sem_seg_labels"], resize_nearest(bounded["sem_seg"].argmax(0).int(), orig_size))


def test_resize_nearest_aligns_pixel_centres():
    label_map = torch.tensor([[1, 2, 3], [4, 5, 6]], dtype=torch.int32)
    up = resize_nearest(label_map, (4, 6))
    assert up.dtype == torch.int32
    assert torch.equal(up, label_map.repeat_interleave(2, 0).repeat_interleave(2, 1))
    # 3 -> 2 columns: centres 0.75 and 2.25 fall in source columns 0 and 2; the same as "nearest-exact".
    assert resize_nearest(label_map, (2, 2)).tolist() == [[1, 3], [4, 6]]
    odd = torch.arange(35, dtype=torch.int64).view(5, 7)
    want = F.interpolate(odd[None, None].double(), size=(12, 9), mode="nearest-exact")[0, 0].long()
    assert torch.equal(resize_nearest(odd, (12, 9)), want)


# A 4000 x 3000 photo through the default COCO panoptic set-up (133 classes, 80 things) with 100 queries:
# resized to 800 x 1067 (short side 800), padded 800 x 1088, mask logits 200 x 272. Run alone in a subprocess,
# whose peak RSS growth (getrusage) is the post-processing's own, whatever else runs on the machine.
MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, time
    import torch
    from densepred.heads.postprocess import PostProcessor

    queries, classes, image_size, orig_size = 100, 133, (800, 1067), (3000, 4000)
    generator = torch.Generator().manual_seed(0)
    class_logits = torch.randn(1, queries, classes + 1, generator=generator)
    best = torch.randint(0, classes + 1, (queries,), generator=generator)
    class_logits[0, torch.arange(queries), best] += 12  # one confident class per query
    mask_logits = torch.randn(1, queries, 200, 272, generator=generator) - 4
    corners = torch.randint(0, 150, (queries, 2), generator=generator)
    extents = torch.randint(8, 40, (queries, 2), generator=generator)
    for query, ((y, x), (h, w)) in enumerate(zip(corners.tolist(), extents.tolist())):
        mask_logits[0, query, y : y + h, x : x + w] += 8
    processor = PostProcessor(classes, thing_classes=range(80), panoptic_on=True, instance_on=True)
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit
    start = time.perf_counter()
    (result,) = processor({"pred_logits": class_logits, "pred_masks": mask_logits}, [image_size], [orig_size])
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit
    print(json.dumps({
        "growth_gib": (peak - before) / 2**30,
        "seconds": seconds,
        "shapes": {k: list(result[k].shape) for k in ("sem_seg", "sem_seg_labels", "panoptic_seg")},
        "instance_masks": list(result["instances"]["masks"].shape),
        "segments": len(result["segments_info"]),
    }))
    """
)


@pytest.mark.slow
def test_post_processing_a_12_megapixel_photo_stays_within_3_gib():
    """Peak RSS growth of post-processing the photo above: about 1.7 GiB here (instance masks, N x 12 MB, are
    most of it), limit 3 GiB. The exact path on the same input needs about 25 GiB (measured 1.5 GiB at
    1000 x 750 and 6.2 GiB at 2000 x 1500, growing with the pixel count), and 82 s / 15 GB were seen with 30
    queries before the bounded path existed."""
    completed = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, timeout=600, check=False
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["shapes"] == {
        "sem_seg": [133, 800, 1067],
        "sem_seg_labels": [3000, 4000],
        "panoptic_seg": [3000, 4000],
    }
    assert report["instance_masks"][1:] == [3000, 4000] and 0 < report["instance_masks"][0] <= 100
    assert report["segments"] > 20
    assert report["growth_gib"] < 3.0, report


def test_semantic_evaluation_reads_the_label_map_at_the_original_size():
    """mIoU takes `sem_seg_labels` (a bounded prediction's scores are at the working size, not the ground
    truth's), and gives the same confusion from the label map as from the arg-max of exact scores."""
    from densepred.evaluation import SemanticEvaluator

    class_logits, mask_logits = _scene()
    outputs = {"pred_logits": class_logits[None], "pred_masks": mask_logits[None]}
    (exact,) = PostProcessor(5, exact_max_pixels=None)(outputs, [(60, 90)], [(180, 270)])
    (bounded,) = PostProcessor(5, exact_max_pixels=0)(outputs, [(60, 90)], [(180, 270)])
    ground_truth = exact["sem_seg_labels"].numpy()
    confusions = []
    for prediction in (exact, {"sem_seg": exact["sem_seg"]}, bounded):
        evaluator = SemanticEvaluator(5, 255, lambda image_id: ground_truth, [f"c{i}" for i in range(5)])
        evaluator.process([0], [prediction])
        evaluator.evaluate()
        confusions.append(evaluator.confusion)
    assert (confusions[0] == confusions[1]).all() and confusions[0].trace() == ground_truth.size
    assert confusions[2].trace() >= 0.98 * ground_truth.size  # bounded: boundary pixels only
