"""SemanticEvaluator against a hand-computed example and torchmetrics."""

from __future__ import annotations

import json

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from densepred.evaluation import Evaluator, SemanticEvaluator


def one_hot_scores(pred: np.ndarray, num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.from_numpy(pred), num_classes).permute(2, 0, 1).float()


def test_hand_computed_example():
    # K = 4 (class 3 never appears). Pixels (prediction, ground truth), the last ground truth ignored:
    gt = np.array([[0, 0, 1, 255], [2, 2, 1, 1]])
    pred = np.array([[0, 1, 1, 2], [2, 0, 1, 1]])
    evaluator = SemanticEvaluator(
        4, 255, {7: gt}.__getitem__, ["a", "b", "c", "d"], contiguous_to_dataset_id=[5, 6, 7, 8]
    )
    assert isinstance(evaluator, Evaluator)
    evaluator.process([7], [{"sem_seg": one_hot_scores(pred, 4)}])
    m = evaluator.evaluate()
    # class 0: GT 2, predicted 2, TP 1 -> IoU 1/3, ACC 1/2
    # class 1: GT 3, predicted 4 (the ignored pixel left out), TP 3 -> IoU 3/4, ACC 1
    # class 2: GT 2, predicted 1, TP 1 -> IoU 1/2, ACC 1/2; class 3: no ground truth -> NaN, left out
    assert m["mIoU"] == pytest.approx(100 * 19 / 36)
    assert m["fwIoU"] == pytest.approx(100 * 47 / 84)  # 2/7 * 1/3 + 3/7 * 3/4 + 2/7 * 1/2
    assert m["mACC"] == pytest.approx(100 * 2 / 3)
    assert m["pACC"] == pytest.approx(100 * 5 / 7)
    assert evaluator.per_class["b"] == pytest.approx({"IoU": 75.0, "ACC": 100.0})
    assert np.isnan(evaluator.per_class["d"]["IoU"]) and np.isnan(evaluator.per_class["d"]["ACC"])
    assert evaluator.confusion[3, 4] == 0 and evaluator.confusion[2, 4] == 1  # predicted 2 on the ignored pixel
    assert "mIoU" in evaluator.table() and "52.78" in evaluator.table()


def test_same_numbers_as_torchmetrics(eval_data):
    data = eval_data.make_semantic(seed=0, num_classes=5)
    k = data["num_classes"]
    evaluator = SemanticEvaluator(k, 255, data["ground_truth"].__getitem__, data["class_names"])
    jaccard = MulticlassJaccardIndex(k, average=None, ignore_index=255)
    macro_jaccard = MulticlassJaccardIndex(k, average="macro", ignore_index=255)
    pixel_acc = MulticlassAccuracy(k, average="micro", ignore_index=255)
    class_acc = MulticlassAccuracy(k, average="macro", ignore_index=255)
    for image_id, prediction in data["predictions"].items():
        evaluator.process([image_id], [prediction])
        target = torch.from_numpy(data["ground_truth"][image_id])[None]
        preds = prediction["sem_seg"].argmax(0)[None]
        for metric in (jaccard, macro_jaccard, pixel_acc, class_acc):
            metric.update(preds, target)
    m = evaluator.evaluate()
    iou = [evaluator.per_class[n]["IoU"] for n in data["class_names"]]
    np.testing.assert_allclose(iou, 100 * jaccard.compute().numpy(), rtol=1e-6)
    assert m["mIoU"] == pytest.approx(100 * macro_jaccard.compute().item(), rel=1e-6)
    assert m["pACC"] == pytest.approx(100 * pixel_acc.compute().item(), rel=1e-6)
    assert m["mACC"] == pytest.approx(100 * class_acc.compute().item(), rel=1e-6)
    assert 30 < m["mIoU"] < 95


def test_written_predictions_decode_to_the_argmax(tmp_path, eval_data):
    data = eval_data.make_semantic(seed=1, num_classes=3, num_images=2)
    evaluator = SemanticEvaluator(3, 255, data["ground_truth"].__getitem__, data["class_names"], [10, 20, 30])
    evaluator.process(list(data["predictions"]), list(data["predictions"].values()))
    evaluator.evaluate()
    evaluator.write(tmp_path)
    results = json.loads((tmp_path / "sem_seg_predictions.json").read_text())
    argmax = data["predictions"][1]["sem_seg"].argmax(0).numpy()
    decoded = np.full(argmax.shape, -1)
    for r in (r for r in results if r["image_id"] == 1):
        decoded[mask_util.decode(r["segmentation"]).astype(bool)] = [10, 20, 30].index(r["category_id"])
    np.testing.assert_array_equal(decoded, argmax)
    saved = json.loads((tmp_path / "semantic_metrics.json").read_text())
    assert saved["metrics"] == pytest.approx(evaluator.metrics)
    assert np.array_equal(saved["confusion_matrix"], evaluator.confusion)


def test_bad_input_names_the_image_and_the_fix():
    gt = {3: np.array([[0, 1], [9, 255]])}
    evaluator = SemanticEvaluator(2, 255, gt.__getitem__, ["a", "b"])
    with pytest.raises(ValueError, match=r"image 3: ground truth has values \[9\] outside \[0, 2\)"):
        evaluator.process([3], [{"sem_seg": torch.zeros(2, 2, 2)}])
    with pytest.raises(ValueError, match=r"image 3: sem_seg is \(2, 3\) but its ground truth is \(2, 2\)"):
        evaluator.process([3], [{"sem_seg": torch.zeros(2, 2, 3)}])
    with pytest.raises(ValueError, match=r"image 3: sem_seg has shape \(3, 2, 2\), expected \(2, H, W\)"):
        evaluator.process([3], [{"sem_seg": torch.zeros(3, 2, 2)}])
    with pytest.raises(ValueError, match="class_names has 1 names but num_classes is 2"):
        SemanticEvaluator(2, 255, gt.__getitem__, ["a"])
