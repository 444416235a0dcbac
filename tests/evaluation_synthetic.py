"""Small synthetic datasets in the real on-disk formats, with predictions, for the evaluation tests.

Each builder takes a folder and a seed and returns the evaluator's arguments plus predictions keyed by
image id (in the format of docs/architecture.md). Predictions are shifted, relabelled, dropped and
extra copies of the ground truth, so every matching case is exercised.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
import torch
from PIL import Image
from torchvision.ops import masks_to_boxes

from densepred.data.image_io import id2rgb

INSTANCE_CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}, {"id": 7, "name": "bird"}]
PANOPTIC_CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1, "color": [220, 20, 60]},
    {"id": 2, "name": "car", "isthing": 1, "color": [0, 0, 142]},
    {"id": 10, "name": "sky", "isthing": 0, "color": [70, 130, 180]},
    {"id": 11, "name": "road", "isthing": 0, "color": [128, 64, 128]},
]


def _box_mask(h: int, w: int, y0: int, x0: int, bh: int, bw: int) -> np.ndarray:
    mask = np.zeros((h, w), dtype=bool)
    mask[max(y0, 0) : max(y0 + bh, 0), max(x0, 0) : max(x0 + bw, 0)] = True
    return mask


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(mask)
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    ys, xs = ys + dy, xs + dx
    keep = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    out[ys[keep], xs[keep]] = True
    return out


def make_coco_instances(folder: Path, seed: int = 0) -> dict[str, Any]:
    """COCO instances JSON (RLE segmentations, one crowd) with small, medium and large objects."""
    rng = np.random.default_rng(seed)
    sizes = [(40, 48), (36, 36), (128, 120), (64, 80), (50, 40)]
    images, annotations, predictions = [], [], {}
    for image_id, (h, w) in enumerate(sizes, start=10):
        images.append({"id": image_id, "height": h, "width": w, "file_name": f"{image_id:012d}.jpg"})
        masks, scores, labels = [], [], []
        for k in range(int(rng.integers(1, 5))):
            bh, bw = int(rng.integers(6, h * 3 // 4)), int(rng.integers(6, w * 3 // 4))
            if h * w > 10000 and k == 0:  # a large object (area > 96^2)
                bh, bw = h - 10, w - 10
            gt = _box_mask(h, w, int(rng.integers(0, h - bh)), int(rng.integers(0, w - bw)), bh, bw)
            label = int(rng.integers(0, 3))
            iscrowd = int(image_id == 11 and k == 0)
            rle = mask_util.encode(np.asfortranarray(gt[:, :, None], dtype=np.uint8))[0]
            segmentation = (
                {"size": [h, w], "counts": _uncompressed_counts(gt)} if iscrowd
                else {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
            )
            x, y, bw_, bh_ = mask_util.toBbox(rle).tolist()
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": INSTANCE_CATEGORIES[label]["id"],
                "segmentation": segmentation, "area": float(gt.sum()), "bbox": [x, y, bw_, bh_], "iscrowd": iscrowd,
            })
            for _ in range(int(rng.integers(0, 3))):  # 0-2 shifted, sometimes relabelled copies
                pred = _shift(gt, int(rng.integers(-4, 5)), int(rng.integers(-4, 5)))
                if pred.any():
                    masks.append(pred)
                    labels.append(label if rng.random() < 0.8 else int(rng.integers(0, 3)))
                    scores.append(float(rng.random()))
        if rng.random() < 0.7:  # a false positive
            masks.append(_box_mask(h, w, 1, 1, 5, 7))
            labels.append(int(rng.integers(0, 3)))
            scores.append(float(rng.random()))
        m = torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, h, w, dtype=torch.bool)
        predictions[image_id] = {"instances": {
            "masks": m, "scores": torch.tensor(scores, dtype=torch.float32), "labels": torch.tensor(labels),
            "boxes": masks_to_boxes(m) if len(m) else torch.zeros(0, 4),
        }}
    folder.mkdir(parents=True, exist_ok=True)
    ann_file = folder / "instances.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": INSTANCE_CATEGORIES}))
    return {"ann_file": ann_file, "contiguous_to_dataset_id": [c["id"] for c in INSTANCE_CATEGORIES],
            "predictions": predictions}


def _uncompressed_counts(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE of a crowd mask (column-major run lengths, starting with zeros)."""
    flat = mask.T.ravel().astype(np.int8)
    change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return np.diff(np.concatenate([[0], change])).tolist()


def make_panoptic(folder: Path, seed: int = 0, num_images: int = 5) -> dict[str, Any]:
    """COCO panoptic JSON + PNGs with void, crowd regions, and predictions with TPs, FPs, FNs and ignores."""
    rng = np.random.default_rng(seed)
    gt_root, pred_root = folder / "panoptic_gt", folder / "panoptic_pred"
    gt_root.mkdir(parents=True, exist_ok=True)
    pred_root.mkdir(parents=True, exist_ok=True)
    contiguous = {c["id"]: i for i, c in enumerate(PANOPTIC_CATEGORIES)}
    images, gt_anns, pred_anns, predictions = [], [], [], {}
    h, w = 30, 40
    for image_id in range(100, 100 + num_images):
        ids = iter(rng.choice(np.arange(1, 2**24), size=40, replace=False).tolist())
        gt_map, gt_list = np.zeros((h, w), np.int64), []  # (id, category, iscrowd, mask)
        pred_map, pred_list = np.zeros((h, w), np.int64), []  # (id, category)

        horizon = int(rng.integers(8, 20))
        for category, mask in ((10, np.arange(h)[:, None] < horizon), (11, np.arange(h)[:, None] >= horizon)):
            gt_list.append((next(ids), category, 0, np.broadcast_to(mask, (h, w))))
        things = []
        for _ in range(int(rng.integers(1, 5))):
            bh, bw = int(rng.integers(4, 14)), int(rng.integers(4, 16))
            things.append((int(rng.choice([1, 2])), _box_mask(h, w, int(rng.integers(0, h - bh)), int(rng.integers(0, w - bw)), bh, bw)))
            gt_list.append((next(ids), things[-1][0], 0, things[-1][1]))
        crowd = None
        if rng.random() < 0.6:
            crowd = (int(rng.choice([1, 2])), _box_mask(h, w, int(rng.integers(0, h - 8)), int(rng.integers(0, w - 10)), 8, 10))
            gt_list.append((next(ids), crowd[0], 1, crowd[1]))
        for segment_id, _, _, mask in gt_list:
            gt_map[mask] = segment_id
        strip = int(rng.integers(0, w - 4))
        gt_map[:, strip : strip + 3] = 0  # a void strip
        gt_map[rng.random((h, w)) < 0.03] = 0  # scattered void pixels

        shifted = horizon + int(rng.integers(-3, 4))
        for category, mask in ((10, np.arange(h)[:, None] < shifted), (11, np.arange(h)[:, None] >= shifted)):
            if rng.random() < 0.9:
                pred_list.append((next(ids), category, np.broadcast_to(mask, (h, w))))
        for category, mask in things:
            if rng.random() < 0.8:  # else a false negative
                label = category if rng.random() < 0.85 else 3 - category
                pred_list.append((next(ids), label, _shift(mask, int(rng.integers(-3, 4)), int(rng.integers(-3, 4)))))
        if crowd is not None:  # on the crowd region: ignored if same category, else a false positive
            pred_list.append((next(ids), int(rng.choice([1, 2])), _shift(crowd[1], 1, 1)))
        void_ys, void_xs = np.nonzero(gt_map == 0)
        if len(void_ys) and rng.random() < 0.7:  # a segment mostly on void
            m = np.zeros((h, w), bool)
            m[void_ys[:12], void_xs[:12]] = True
            pred_list.append((next(ids), int(rng.choice([1, 2, 10, 11])), m))
        for segment_id, _, mask in pred_list:
            pred_map[mask] = segment_id

        gt_segments = _segments_info(gt_map, [(s, c, crowd_flag) for s, c, crowd_flag, _ in gt_list])
        pred_segments = _segments_info(pred_map, [(s, c, 0) for s, c, _ in pred_list])
        file_name = f"{image_id:012d}.png"
        Image.fromarray(id2rgb(gt_map)).save(gt_root / file_name)
        Image.fromarray(id2rgb(pred_map)).save(pred_root / file_name)
        images.append({"id": image_id, "height": h, "width": w, "file_name": f"{image_id:012d}.jpg"})
        gt_anns.append({"image_id": image_id, "file_name": file_name, "segments_info": gt_segments})
        pred_anns.append({"image_id": image_id, "file_name": file_name, "segments_info": pred_segments})
        segments_info = [
            {"id": s["id"], "label": contiguous[s["category_id"]], "isthing": s["category_id"] < 10, "score": 1.0}
            for s in pred_segments
        ]
        segments_info.append({"id": next(ids), "label": 0, "isthing": True, "score": 0.5})  # no pixels: dropped
        predictions[image_id] = {"panoptic_seg": torch.from_numpy(pred_map.astype(np.int32)), "segments_info": segments_info}

    gt_json, pred_json = folder / "panoptic_gt.json", folder / "panoptic_pred.json"
    gt_json.write_text(json.dumps({"images": images, "annotations": gt_anns, "categories": PANOPTIC_CATEGORIES}))
    pred_json.write_text(json.dumps({"images": images, "annotations": pred_anns, "categories": PANOPTIC_CATEGORIES}))
    return {
        "panoptic_json": gt_json, "panoptic_root": gt_root, "categories": PANOPTIC_CATEGORIES,
        "contiguous_to_dataset_id": [c["id"] for c in PANOPTIC_CATEGORIES], "predictions": predictions,
        "pred_json": pred_json, "pred_root": pred_root,
    }


def _segments_info(id_map: np.ndarray, segments: list[tuple[int, int, int]]) -> list[dict[str, Any]]:
    """segments_info of the segments still visible in `id_map`, with their areas and boxes."""
    info = []
    for segment_id, category_id, iscrowd in segments:
        mask = id_map == segment_id
        if mask.any():
            ys, xs = np.nonzero(mask)
            bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
            info.append({"id": segment_id, "category_id": category_id, "iscrowd": iscrowd,
                         "area": int(mask.sum()), "bbox": bbox})
    return info


def make_semantic(seed: int = 0, num_classes: int = 5, num_images: int = 5) -> dict[str, Any]:
    """Ground-truth maps with ignored pixels and score maps that agree with them on ~70% of pixels."""
    rng = np.random.default_rng(seed)
    ground_truth, predictions = {}, {}
    for image_id in range(num_images):
        h, w = int(rng.integers(12, 24)), int(rng.integers(12, 24))
        gt = rng.integers(0, num_classes, size=(h, w))
        gt[rng.random((h, w)) < 0.1] = 255
        scores = rng.random((num_classes, h, w)).astype(np.float32)
        ys, xs = np.nonzero((rng.random((h, w)) < 0.7) & (gt != 255))
        scores[gt[ys, xs], ys, xs] += 1.0
        ground_truth[image_id] = gt
        predictions[image_id] = {"sem_seg": torch.from_numpy(scores)}
    return {
        "num_classes": num_classes, "ignore_index": 255, "ground_truth": ground_truth,
        "class_names": [f"class{i}" for i in range(num_classes)], "predictions": predictions,
    }
