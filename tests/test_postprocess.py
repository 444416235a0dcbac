"""Post-processing on constructed predictions: semantic by hand; panoptic with overlapping queries, a
low-score query, stuff merge, overlap filter and void; instance top-k, mask scores and boxes; the resize /
crop pipeline of PostProcessor; and the vectorised panoptic inference against the official loop."""

import math

import pytest
import torch
import torch.nn.functional as F

from densepred.heads.postprocess import PostProcessor, instance_inference, panoptic_inference, semantic_inference

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
    assert [sorted(r) for r in results] == [["instances", "panoptic_seg", "segments_info", "sem_seg"]] * 2

    # Image 1 (16 x 32, no resize): class 0 on columns 0-15, class 1 on 16-23, nothing above 1/2 on 24-31
    # (bilinear upsampling x 4 of the 8 x 8 logits puts the step between pixels 15 and 16).
    sem = results[1]["sem_seg"]
    assert sem.shape == (2, 16, 32) and sem.dtype == torch.float32
    assert (sem[0, :, :16] > 0.9).all() and (sem[1, :, 16:24] > 0.9).all() and (sem[:, :, 24:] < 0.1).all()
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
    assert [list(r) for r in semantic_only] == [["sem_seg"], ["sem_seg"]]
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
