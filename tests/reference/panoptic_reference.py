"""Test-only oracle: COCO panoptic quality from files, written from the panopticapi definition.

The official code (github.com/cocodataset/panopticapi, panopticapi/evaluation.py, `pq_compute`) is not
installable from the package index this project uses and is not vendored here, so this oracle restates
its definition independently of evaluation/panoptic.py: it reads the ground-truth and prediction PNGs
(RGB ids) and JSONs, and compares segments as boolean masks one pair at a time (no joint histogram).
It returns panopticapi's result layout: {"All" | "Things" | "Stuff": {"pq", "sq", "rq", "n"}, "per_class"}.

Definition (panopticapi): a prediction matches a non-crowd ground truth of the same category when
|G n P| / (area(G) + area(P) - |G n P| - |void n P|) > 0.5, area(G) from the JSON, area(P) from the PNG;
unmatched non-crowd ground truths are FN; an unmatched prediction is FP unless its pixels on void plus
on the crowd region of its category (the last such crowd segment listed) exceed half its area.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def _read_ids(path: Path) -> np.ndarray:
    rgb = np.asarray(Image.open(path), dtype=np.uint32)
    return rgb[:, :, 0] + 256 * rgb[:, :, 1] + 256 * 256 * rgb[:, :, 2]


def pq_compute_reference(gt_json_file: Path, pred_json_file: Path, gt_folder: Path, pred_folder: Path) -> dict:
    gt_json = json.loads(Path(gt_json_file).read_text())
    pred_json = json.loads(Path(pred_json_file).read_text())
    categories = {c["id"]: c for c in gt_json["categories"]}
    predictions = {a["image_id"]: a for a in pred_json["annotations"]}
    totals = {c: {"iou": 0.0, "tp": 0, "fp": 0, "fn": 0} for c in categories}

    for gt_ann in gt_json["annotations"]:
        pred_ann = predictions[gt_ann["image_id"]]
        gt_ids = _read_ids(Path(gt_folder) / gt_ann["file_name"])
        pred_ids = _read_ids(Path(pred_folder) / pred_ann["file_name"])
        void = gt_ids == 0
        gts = gt_ann["segments_info"]
        preds = [dict(p, mask=pred_ids == p["id"]) for p in pred_ann["segments_info"]]
        for p in preds:
            p["area"] = int(p["mask"].sum())
            assert p["area"] > 0, f"segment {p['id']} of image {gt_ann['image_id']} is in the JSON only"
        listed = {p["id"] for p in preds} | {0}
        assert set(np.unique(pred_ids).tolist()) <= listed, "a PNG id is not in the JSON"

        matched_gt, matched_pred = set(), set()
        for g in gts:
            if g["iscrowd"]:
                continue
            g_mask = gt_ids == g["id"]
            for p in preds:
                if p["category_id"] != g["category_id"]:
                    continue
                inter = int(np.logical_and(g_mask, p["mask"]).sum())
                union = g["area"] + p["area"] - inter - int(np.logical_and(void, p["mask"]).sum())
                if inter / union > 0.5:
                    totals[g["category_id"]]["tp"] += 1
                    totals[g["category_id"]]["iou"] += inter / union
                    matched_gt.add(g["id"])
                    matched_pred.add(p["id"])

        crowd = {}
        for g in gts:
            if g["iscrowd"]:
                crowd[g["category_id"]] = gt_ids == g["id"]
            elif g["id"] not in matched_gt:
                totals[g["category_id"]]["fn"] += 1
        for p in preds:
            if p["id"] in matched_pred:
                continue
            ignored = np.logical_and(p["mask"], void).sum()
            if p["category_id"] in crowd:
                ignored += np.logical_and(p["mask"], crowd[p["category_id"]]).sum()
            if ignored / p["area"] <= 0.5:
                totals[p["category_id"]]["fp"] += 1

    per_class, results = {}, {}
    for category_id, t in totals.items():
        if t["tp"] + t["fp"] + t["fn"] == 0:
            continue
        denominator = t["tp"] + 0.5 * t["fp"] + 0.5 * t["fn"]
        per_class[category_id] = {
            "pq": t["iou"] / denominator,
            "sq": t["iou"] / t["tp"] if t["tp"] else 0.0,
            "rq": t["tp"] / denominator,
        }
    for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
        chosen = [c for c in per_class if isthing is None or bool(categories[c]["isthing"]) == isthing]
        results[name] = {m: sum(per_class[c][m] for c in chosen) / len(chosen) for m in ("pq", "sq", "rq")}
        results[name]["n"] = len(chosen)
    results["per_class"] = per_class
    return results
