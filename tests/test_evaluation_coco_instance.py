"""COCOInstanceEvaluator against a direct pycocotools COCOeval run on the same predictions."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from densepred.evaluation import COCOInstanceEvaluator

NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def cocoeval_stats(ann_file: Path, results_file: Path, iou_type: str) -> np.ndarray:
    """COCOeval.stats[:6] in percent (NaN where COCOeval says -1), the standard way."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(ann_file))
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(str(results_file)), iouType=iou_type)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    stats = coco_eval.stats[:6]
    return np.where(stats >= 0, 100 * stats, np.nan)


def standard_results(predictions: dict, contiguous_to_dataset_id: list[int], iou_type: str) -> list[dict]:
    """The COCO results format written out instance by instance, independently of the evaluator."""
    results = []
    for image_id, prediction in predictions.items():
        instances = prediction["instances"]
        for mask, score, label, box in zip(
            instances["masks"], instances["scores"], instances["labels"], instances["boxes"], strict=True
        ):
            result = {"image_id": image_id, "category_id": contiguous_to_dataset_id[int(label)], "score": float(score)}
            if iou_type == "segm":
                rle = mask_util.encode(np.asfortranarray(mask.numpy()[:, :, None].astype(np.uint8)))[0]
                result["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
            else:
                x0, y0, x1, y1 = box.tolist()
                result["bbox"] = [x0, y0, x1 - x0, y1 - y0]
            results.append(result)
    return results


@pytest.fixture(scope="module")
def data(tmp_path_factory, eval_data):
    return eval_data.make_coco_instances(tmp_path_factory.mktemp("coco"), seed=0)


@pytest.fixture(scope="module")
def evaluated(data):
    evaluator = COCOInstanceEvaluator(data["ann_file"], data["contiguous_to_dataset_id"])
    items = list(data["predictions"].items())
    for start in range(0, len(items), 2):  # batches of two
        batch = items[start : start + 2]
        evaluator.process([i for i, _ in batch], [p for _, p in batch])
    return evaluator, evaluator.evaluate()


@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_same_numbers_as_cocoeval(data, evaluated, tmp_path, iou_type):
    _, metrics = evaluated
    results_file = tmp_path / "results.json"
    results_file.write_text(
        json.dumps(standard_results(data["predictions"], data["contiguous_to_dataset_id"], iou_type))
    )
    expected = cocoeval_stats(data["ann_file"], results_file, iou_type)
    ours = np.array([metrics[f"{iou_type}/{n}"] for n in NAMES])
    np.testing.assert_array_equal(ours, expected)
    assert np.isfinite(ours).all(), "the synthetic data should cover small, medium and large objects"
    assert 5 < metrics[f"{iou_type}/AP"] < 95, "predictions should be neither all right nor all wrong"


def test_written_results_reproduce_the_numbers(data, evaluated, tmp_path):
    evaluator, metrics = evaluated
    written = evaluator.write(tmp_path)
    assert {p.name for p in written} == {
        "coco_instances_segm_results.json",
        "coco_instances_bbox_results.json",
        "instance_metrics.json",
    }
    for iou_type in ("segm", "bbox"):
        stats = cocoeval_stats(data["ann_file"], tmp_path / f"coco_instances_{iou_type}_results.json", iou_type)
        np.testing.assert_array_equal(stats, [metrics[f"{iou_type}/{n}"] for n in NAMES])
    saved = json.loads((tmp_path / "instance_metrics.json").read_text())
    assert saved["metrics"] == pytest.approx(metrics)
    assert set(saved["per_class"]) == {"cat", "dog", "bird"}
    assert not list(tmp_path.glob(".*.tmp")), "atomic writes leave no temporary files"


def test_per_category_ap_averages_to_ap(evaluated):
    evaluator, metrics = evaluated
    per_category = [v["segm/AP"] for v in evaluator.per_class.values() if np.isfinite(v["segm/AP"])]
    assert np.mean(per_category) == pytest.approx(metrics["segm/AP"], abs=1e-9)
    assert "segm" in evaluator.table() and "APm" in evaluator.table()


def test_perfect_predictions_and_no_predictions(data):
    gt = json.loads(Path(data["ann_file"]).read_text())
    images = {im["id"]: im for im in gt["images"]}
    perfect, empty = (
        COCOInstanceEvaluator(data["ann_file"], [1, 3, 7]),
        COCOInstanceEvaluator(data["ann_file"], [1, 3, 7]),
    )
    for image_id, image in images.items():
        anns = [a for a in gt["annotations"] if a["image_id"] == image_id and not a["iscrowd"]]
        masks = torch.from_numpy(
            np.stack([mask_util.decode(a["segmentation"]).astype(bool) for a in anns])
            if anns
            else np.zeros((0, image["height"], image["width"]), bool)
        )
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]).reshape(-1, 4)
        labels = torch.tensor([[1, 3, 7].index(a["category_id"]) for a in anns], dtype=torch.long)
        perfect.process(
            [image_id],
            [{"instances": {"masks": masks, "scores": torch.ones(len(anns)), "labels": labels, "boxes": boxes}}],
        )
        empty.process(
            [image_id],
            [{"instances": {"masks": masks[:0], "scores": torch.ones(0), "labels": labels[:0], "boxes": boxes[:0]}}],
        )
    assert perfect.evaluate()["segm/AP"] == pytest.approx(100.0)
    assert perfect.metrics["bbox/AP"] == pytest.approx(100.0)
    assert empty.evaluate()["segm/AP"] == 0.0


def test_bad_input_names_the_image_and_the_fix(data):
    evaluator = COCOInstanceEvaluator(data["ann_file"], data["contiguous_to_dataset_id"])
    prediction = data["predictions"][10]
    with pytest.raises(ValueError, match="image id 999 is not in .*instances.json"):
        evaluator.process([999], [prediction])
    small = {"instances": dict(prediction["instances"], masks=prediction["instances"]["masks"][:, :8, :8])}
    with pytest.raises(ValueError, match=r"image 10: instance masks have shape .* expected \(N, 40, 48\)"):
        evaluator.process([10], [small])
    wrong_label = {
        "instances": dict(prediction["instances"], labels=torch.full_like(prediction["instances"]["labels"], 5))
    }
    with pytest.raises(ValueError, match="image 10: predicted label 5 is not in contiguous_to_dataset_id"):
        evaluator.process([10], [wrong_label])
    with pytest.raises(ValueError, match=r"category ids \[99\]"):
        COCOInstanceEvaluator(data["ann_file"], [1, 3, 99])
    with pytest.raises(FileNotFoundError, match="missing.json does not exist"):
        COCOInstanceEvaluator(Path(data["ann_file"]).parent / "missing.json", [1, 3, 7])
    with pytest.raises(RuntimeError, match="evaluate"):
        evaluator.write(Path(data["ann_file"]).parent)


def test_subset_of_images_is_evaluated_on_those_images_only(data, tmp_path):
    evaluator = COCOInstanceEvaluator(data["ann_file"], data["contiguous_to_dataset_id"], iou_types=["segm"])
    subset = [10, 12, 13]
    evaluator.process(subset, [data["predictions"][i] for i in subset])
    metrics = evaluator.evaluate()
    results_file = tmp_path / "results.json"
    chosen = {i: data["predictions"][i] for i in subset}
    results_file.write_text(json.dumps(standard_results(chosen, data["contiguous_to_dataset_id"], "segm")))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(data["ann_file"]))
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(str(results_file)), iouType="segm")
        coco_eval.params.imgIds = subset
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    assert metrics["segm/AP"] == 100 * coco_eval.stats[0] and set(metrics) == {f"segm/{n}" for n in NAMES}
