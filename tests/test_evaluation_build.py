"""Evaluators built from the ground truth a split declares (`DataModule.ground_truth`), and one reading of it:
over one evaluation each ground-truth PNG and JSON is read once, although PQ, AP and mIoU all use them."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from torchvision.ops import masks_to_boxes

from densepred.data import DataModule, DatasetMetadata, GroundTruth
from densepred.evaluation import (
    EVALUATIONS,
    COCOInstanceEvaluator,
    PanopticEvaluator,
    SemanticEvaluator,
    build_evaluators,
)

SMALL = {"num_train": 2, "num_val": 5, "min_size": 48, "max_size": 64, "crowd_prob": 0.5, "seed": 2}


def synthetic_datamodule(root: Path, task: str = "panoptic") -> DataModule:
    splits = {
        split: {
            "img_dir": f"{split}2017",
            "ann_file": f"annotations/instances_{split}2017.json",
            "panoptic_json": f"annotations/panoptic_{split}2017.json",
            "panoptic_root": f"annotations/panoptic_{split}2017",
        }
        for split in ("train", "val")
    }
    return DataModule(task=task, root=str(root), synthetic=SMALL, **splits)


def perfect_predictions(data_root: Path, metadata: DatasetMetadata) -> dict[int, dict]:
    """The ground truth of every val image as predictions, read here with PIL and json (not the code under test)."""
    panoptic = json.loads((data_root / "annotations/panoptic_val2017.json").read_text())
    contiguous, k = metadata.dataset_id_to_contiguous, metadata.num_classes
    predictions = {}
    for ann in panoptic["annotations"]:
        rgb = np.asarray(PIL.Image.open(data_root / "annotations/panoptic_val2017" / ann["file_name"]), dtype=np.int64)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
        segments = ann["segments_info"]
        labels = [contiguous[s["category_id"]] for s in segments]
        classes = np.zeros(ids.shape, dtype=np.int64)  # void pixels are ignored by mIoU: any class will do
        for s, label in zip(segments, labels, strict=True):
            classes[ids == s["id"]] = label
        things = [
            (s, label)
            for s, label in zip(segments, labels, strict=True)
            if metadata.categories[label]["isthing"] and not s["iscrowd"]
        ]
        masks = torch.zeros((len(things), *ids.shape), dtype=torch.bool)
        for n, (s, _) in enumerate(things):
            masks[n] = torch.from_numpy(ids == s["id"])
        segments_info = [
            {"id": s["id"], "label": label, "isthing": metadata.categories[label]["isthing"], "score": 1.0}
            for s, label in zip(segments, labels, strict=True)
        ]
        instances = {
            "masks": masks,
            "scores": torch.ones(len(things)),
            "labels": torch.tensor([t[1] for t in things]),
            "boxes": masks_to_boxes(masks) if len(things) else torch.zeros(0, 4),
        }
        predictions[ann["image_id"]] = {
            "panoptic_seg": torch.from_numpy(ids.astype(np.int32)),
            "segments_info": segments_info,
            "instances": instances,
            "sem_seg": torch.nn.functional.one_hot(torch.from_numpy(classes), k).permute(2, 0, 1).float(),
        }
    return predictions


def test_one_evaluation_reads_each_ground_truth_file_once(tmp_path, monkeypatch):
    dm = synthetic_datamodule(tmp_path)
    ground_truth = dm.ground_truth("val")  # builds the val loader's index (its own reading of the JSON)
    data_root = Path(dm.data_root)
    predictions = perfect_predictions(data_root, ground_truth.metadata)
    assert len(predictions) == SMALL["num_val"]

    opened, loaded = Counter(), Counter()
    real_open, real_load = PIL.Image.open, json.load

    def counting_open(fp, *args, **kwargs):
        opened[Path(fp).name] += 1
        return real_open(fp, *args, **kwargs)

    def counting_load(f, *args, **kwargs):
        loaded[Path(f.name).name] += 1
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", counting_open)
    monkeypatch.setattr(json, "load", counting_load)

    # One evaluation as the LightningModule runs it: build, reset, every evaluator per batch, evaluate.
    evaluators = build_evaluators(EVALUATIONS["panoptic"], ground_truth)
    assert list(evaluators) == ["panoptic", "instance", "semantic"]
    for evaluator in evaluators.values():
        evaluator.reset()
    image_ids = sorted(predictions)
    for start in range(0, len(image_ids), 2):
        batch = image_ids[start : start + 2]
        for evaluator in evaluators.values():
            evaluator.process(batch, [predictions[i] for i in batch])
    results = {}
    for evaluator in evaluators.values():
        results.update(evaluator.evaluate())

    pngs = {f"{i:012d}.png" for i in image_ids}
    assert opened == Counter(dict.fromkeys(pngs, 1)), "each ground-truth PNG is decoded once, for PQ and mIoU"
    assert loaded == Counter({"panoptic_val2017.json": 1, "instances_val2017.json": 1})
    assert results["PQ"] == pytest.approx(100.0) and results["mIoU"] == pytest.approx(100.0)
    assert results["segm/AP"] == pytest.approx(100.0)


def test_semantic_evaluation_without_per_pixel_ground_truth_is_an_error_when_built():
    metadata = DatasetMetadata.from_categories([{"id": 1, "name": "a"}], "x.json")
    with pytest.raises(ValueError, match="semantic evaluation needs per-pixel ground truth"):
        build_evaluators(["semantic"], GroundTruth(metadata))


def test_the_evaluators_follow_the_declared_ground_truth(tmp_path):
    dm = synthetic_datamodule(tmp_path)
    declared = dm.ground_truth("val")
    metadata = declared.metadata
    evaluators = build_evaluators(EVALUATIONS["panoptic"], declared)
    assert isinstance(evaluators["panoptic"], PanopticEvaluator)
    assert isinstance(evaluators["semantic"], SemanticEvaluator)
    assert evaluators["panoptic"].ground_truth.readers == 2  # PQ and mIoU share the decoded PNGs
    instance = evaluators["instance"]
    assert isinstance(instance, COCOInstanceEvaluator) and str(instance.ann_file) == declared.ann_file
    assert instance.dataset_ids == {k: metadata.contiguous_to_dataset_id[k] for k in metadata.thing_classes}

    # Without an instances file there is no AP; without panoptic files no PQ (the error names the settings).
    no_ann = GroundTruth(metadata, panoptic_json=declared.panoptic_json, panoptic_root=declared.panoptic_root)
    assert list(build_evaluators(EVALUATIONS["panoptic"], no_ann)) == ["panoptic", "semantic"]
    with pytest.raises(ValueError, match=r"panoptic evaluation needs the dataset's panoptic_json and panoptic_root"):
        build_evaluators(EVALUATIONS["panoptic"], GroundTruth(metadata, ann_file=declared.ann_file))

    # Label maps: mIoU reads what the split declares; only mIoU on panoptic data: one reader, nothing kept.
    reader = {1: np.zeros((2, 2), np.int64)}.__getitem__
    assert build_evaluators(["semantic"], GroundTruth(metadata, semantic=reader))["semantic"].gt_loader is reader
    semantic_only = build_evaluators(EVALUATIONS["semantic"], no_ann)["semantic"]
    assert semantic_only.gt_loader.__self__.readers == 1
