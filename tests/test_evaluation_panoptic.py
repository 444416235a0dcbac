"""PanopticEvaluator against the panopticapi definition: an independent file-based oracle and a hand count."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from densepred.data import PanopticGroundTruth
from densepred.data.image_io import id2rgb, rgb2id
from densepred.evaluation import PanopticEvaluator


@pytest.fixture(scope="module")
def categories(eval_data) -> list[dict]:
    return eval_data.PANOPTIC_CATEGORIES


@pytest.fixture(scope="module")
def c2d(categories) -> list[int]:
    return [c["id"] for c in categories]  # contiguous 0..3 -> person 1, car 2, sky 10, road 11


def run(data) -> PanopticEvaluator:
    ground_truth = PanopticGroundTruth(data["panoptic_json"], data["panoptic_root"])
    evaluator = PanopticEvaluator(ground_truth, data["categories"], data["contiguous_to_dataset_id"])
    items = list(data["predictions"].items())
    for start in range(0, len(items), 2):
        batch = items[start : start + 2]
        evaluator.process([i for i, _ in batch], [p for _, p in batch])
    evaluator.evaluate()
    return evaluator


def assert_matches_reference(evaluator: PanopticEvaluator, reference: dict, categories: list[dict]) -> None:
    for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        for metric in ("PQ", "SQ", "RQ"):
            assert evaluator.metrics[metric + suffix] == pytest.approx(
                100 * reference[group][metric.lower()], abs=1e-10
            )
        assert evaluator.summary[group]["N"] == reference[group]["n"]
    by_id = {c["id"]: c["name"] for c in categories}
    for category_id, values in reference["per_class"].items():
        for metric in ("PQ", "SQ", "RQ"):
            assert evaluator.per_class[by_id[category_id]][metric] == pytest.approx(
                100 * values[metric.lower()], abs=1e-10
            )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_same_numbers_as_reference(tmp_path, eval_data, pq_reference, seed):
    data = eval_data.make_panoptic(tmp_path, seed=seed)
    reference = pq_reference(data["panoptic_json"], data["pred_json"], data["panoptic_root"], data["pred_root"])
    evaluator = run(data)
    assert_matches_reference(evaluator, reference, data["categories"])
    assert 10 < evaluator.metrics["PQ"] < 90 and evaluator.summary["All"]["N"] == 4


def test_written_predictions_give_the_same_numbers(tmp_path, eval_data, pq_reference):
    data = eval_data.make_panoptic(tmp_path / "data", seed=3)
    evaluator = run(data)
    written = evaluator.write(tmp_path / "out")
    assert len(written) == 5 + 2
    pred_json = tmp_path / "out" / "panoptic_predictions.json"
    reference = pq_reference(
        data["panoptic_json"], pred_json, data["panoptic_root"], tmp_path / "out" / "panoptic_predictions"
    )
    assert_matches_reference(evaluator, reference, data["categories"])
    saved = json.loads(pred_json.read_text())
    assert [a["image_id"] for a in saved["annotations"]] == sorted(data["predictions"])
    first = saved["annotations"][0]
    ids = rgb2id(np.asarray(Image.open(tmp_path / "out" / "panoptic_predictions" / first["file_name"])))
    np.testing.assert_array_equal(ids, data["predictions"][first["image_id"]]["panoptic_seg"].numpy())
    assert {s["id"] for s in first["segments_info"]} == set(np.unique(ids).tolist()) - {0}
    metrics = json.loads((tmp_path / "out" / "panoptic_metrics.json").read_text())["metrics"]
    assert metrics == pytest.approx(evaluator.metrics)


@pytest.fixture
def hand_example(tmp_path, categories, c2d):
    """One 10x10 image. Ground truth: sky (id 5) rows 0-4; person (id 7) rows 5-9 x cols 0-4;
    void rows 5-9 x cols 5-7; car (id 9) rows 5-9 x cols 8-9. Prediction: sky (id 1) rows 0-5;
    person (id 2) rows 6-9 x cols 0-4; person (id 3) rows 6-9 x cols 5-7 (on void); road (id 4)
    rows 6-9 x cols 8-9 (on the car)."""
    gt = np.zeros((10, 10), np.int64)
    gt[:5] = 5
    gt[5:, :5] = 7
    gt[5:, 8:] = 9
    pred = np.zeros((10, 10), np.int64)
    pred[:6] = 1
    pred[6:, :5] = 2
    pred[6:, 5:8] = 3
    pred[6:, 8:] = 4
    (tmp_path / "gt").mkdir()
    Image.fromarray(id2rgb(gt)).save(tmp_path / "gt" / "1.png")
    segments = [
        {"id": 5, "category_id": 10, "area": 50, "iscrowd": 0},
        {"id": 7, "category_id": 1, "area": 25, "iscrowd": 0},
        {"id": 9, "category_id": 2, "area": 10, "iscrowd": 0},
    ]
    (tmp_path / "gt.json").write_text(
        json.dumps(
            {
                "images": [{"id": 1, "height": 10, "width": 10, "file_name": "1.jpg"}],
                "annotations": [{"image_id": 1, "file_name": "1.png", "segments_info": segments}],
                "categories": categories,
            }
        )
    )
    segments_info = [{"id": 1, "label": 2}, {"id": 2, "label": 0}, {"id": 3, "label": 0}, {"id": 4, "label": 3}]
    evaluator = PanopticEvaluator(PanopticGroundTruth(tmp_path / "gt.json", tmp_path / "gt"), categories, c2d)
    return evaluator, pred, segments_info


def test_hand_counted_example(hand_example):
    evaluator, pred, segments_info = hand_example
    evaluator.process([1], [{"panoptic_seg": torch.from_numpy(pred), "segments_info": segments_info}])
    m = evaluator.evaluate()
    # sky: |G n P| = 50, |P| = 60, void n P = row 5 x cols 5-7 = 3 -> IoU 50 / (60 + 50 - 50 - 3) = 50/57, TP.
    # person: 20 / (20 + 25 - 20) = 0.8, TP; the second person is all void: ignored, not an FP.
    # car: FN (PQ = SQ = RQ = 0); road: FP (0). Things: person, car; stuff: sky, road.
    sky = 50 / 57
    assert m["PQ_th"] == pytest.approx(100 * 0.8 / 2) and m["SQ_th"] == pytest.approx(100 * 0.8 / 2)
    assert m["RQ_th"] == pytest.approx(50.0) and m["RQ_st"] == pytest.approx(50.0)
    assert m["PQ_st"] == pytest.approx(100 * sky / 2) and m["SQ_st"] == pytest.approx(100 * sky / 2)
    assert m["PQ"] == pytest.approx(100 * (0.8 + sky) / 4) and m["RQ"] == pytest.approx(50.0)
    assert evaluator.per_class["person"] == pytest.approx({"PQ": 80.0, "SQ": 80.0, "RQ": 100.0})
    assert evaluator.per_class["road"] == {"PQ": 0.0, "SQ": 0.0, "RQ": 0.0}
    assert "Things" in evaluator.table() and "| All" in evaluator.table()


def test_non_integer_ground_truth_area_is_used_as_written(tmp_path, hand_example, categories, c2d, pq_reference):
    """panopticapi takes the JSON's "area" as is: 24.6 is not truncated to 24 (nor rounded to 25)."""
    _, pred, segments_info = hand_example
    gt_json = json.loads((tmp_path / "gt.json").read_text())
    gt_json["annotations"][0]["segments_info"][1]["area"] = 24.6  # the person (25 pixels in the PNG)
    (tmp_path / "gt.json").write_text(json.dumps(gt_json))
    evaluator = PanopticEvaluator(PanopticGroundTruth(tmp_path / "gt.json", tmp_path / "gt"), categories, c2d)
    evaluator.process([1], [{"panoptic_seg": torch.from_numpy(pred), "segments_info": segments_info}])
    evaluator.evaluate()
    # person: |G n P| = 20, |P| = 20 -> IoU = 20 / (20 + 24.6 - 20) (truncated: 20 / 24)
    assert evaluator.per_class["person"]["SQ"] == pytest.approx(100 * 20 / 24.6, abs=1e-10)
    evaluator.write(tmp_path / "out")
    reference = pq_reference(
        tmp_path / "gt.json",
        tmp_path / "out" / "panoptic_predictions.json",
        tmp_path / "gt",
        tmp_path / "out" / "panoptic_predictions",
    )
    assert_matches_reference(evaluator, reference, categories)


def test_crowd_region_ignores_predictions_of_its_category_only(tmp_path, hand_example, categories, c2d):
    evaluator, pred, segments_info = hand_example
    gt_json = json.loads((tmp_path / "gt.json").read_text())
    gt_json["annotations"][0]["segments_info"][2]["iscrowd"] = 1  # the car becomes a crowd region
    (tmp_path / "gt.json").write_text(json.dumps(gt_json))
    for road_label, expected_fp in ((3, 1), (1, 0)):  # road on the car crowd: an FP; car on it: ignored
        ground_truth = PanopticGroundTruth(tmp_path / "gt.json", tmp_path / "gt")
        evaluator = PanopticEvaluator(ground_truth, categories, c2d)
        info = segments_info[:3] + [{"id": 4, "label": road_label}]
        evaluator.process([1], [{"panoptic_seg": torch.from_numpy(pred), "segments_info": info}])
        evaluator.evaluate()
        # the crowd car is no FN; things: person only (car has no TP/FP/FN unless the FP is a car)
        assert evaluator.summary["Things"]["N"] == 1
        assert evaluator.summary["Stuff"]["N"] == 1 + expected_fp


def test_bad_input_names_the_image_and_the_fix(tmp_path, hand_example, categories, c2d):
    evaluator, pred, segments_info = hand_example
    with pytest.raises(
        ValueError, match=r"image 1: panoptic_seg contains segment ids \[4\] that segments_info does not list"
    ):
        evaluator.process([1], [{"panoptic_seg": torch.from_numpy(pred), "segments_info": segments_info[:3]}])
    with pytest.raises(ValueError, match="image id 2 has no annotation in .*gt.json"):
        evaluator.process([2], [{"panoptic_seg": torch.from_numpy(pred), "segments_info": segments_info}])
    with pytest.raises(
        ValueError, match=r"image 1: panoptic_seg has shape \(10, 8\), the ground-truth PNG 1.png has \(10, 10\)"
    ):
        evaluator.process([1], [{"panoptic_seg": torch.from_numpy(pred[:, :8]), "segments_info": segments_info}])
    with pytest.raises(ValueError, match="image 1: predicted label 9 is not in contiguous_to_dataset_id"):
        evaluator.process(
            [1],
            [{"panoptic_seg": torch.from_numpy(pred), "segments_info": segments_info[:3] + [{"id": 4, "label": 9}]}],
        )
    with pytest.raises(FileNotFoundError, match="panoptic PNG folder .*nowhere does not exist"):
        PanopticEvaluator(PanopticGroundTruth(tmp_path / "gt.json", tmp_path / "nowhere"), categories, c2d)
