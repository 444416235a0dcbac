"""data.task=detection: COCO boxes (segmentation ignored), crowd left out, contiguous ids, boxes through the
transforms (flip, resize, LSJ crops dropping what they empty), one counted report per bad-box case, batches and
the synthetic data."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from densepred.data import CocoInstanceDataset, DataError, DataModule
from densepred.data.transforms import LargeScaleJitter

CATEGORIES = [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}]  # sparse and unordered: contiguous by id


def write_dataset(tmp_path, annotations, size=(40, 60)):
    Image.fromarray(np.full((*size, 3), 90, np.uint8)).save(tmp_path / "a.png")
    images = [{"id": 1, "file_name": "a.png", "height": size[0], "width": size[1]}]
    data = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    (tmp_path / "ann.json").write_text(json.dumps(data))
    return tmp_path / "ann.json"


def box(ann_id, bbox, category_id=7, **extra):
    return {"id": ann_id, "image_id": 1, "category_id": category_id, "bbox": bbox, "iscrowd": 0, **extra}


def dataset(tmp_path, annotations, transform=None, **kwargs):
    return CocoInstanceDataset(write_dataset(tmp_path, annotations), tmp_path, transform, task="detection", **kwargs)


def test_boxes_are_read_without_segmentation_crowd_left_out_ids_contiguous(tmp_path):
    annotations = [
        box(1, [10, 5, 20, 10]),  # box only, no segmentation key
        box(2, [0, 0, 30, 30], category_id=3, segmentation=[[0, 0, 1, 0, 1, 1]]),  # a segmentation is ignored
        box(3, [5, 5, 10, 10], iscrowd=1),
    ]
    data = dataset(tmp_path, annotations)
    assert data.metadata.class_names == ["dog", "cat"]
    target = data[0]["target"]
    assert set(target) == {"labels", "boxes"}
    assert target["labels"].tolist() == [1, 0]
    assert target["boxes"].dtype == torch.float32
    assert target["boxes"].tolist() == [[10, 5, 30, 15], [0, 0, 30, 30]]
    assert len(data.index_issues) == 0
    assert data.ground_truth.ann_file == str(tmp_path / "ann.json")


def test_boxes_follow_flip_and_resize(tmp_path):
    annotations = [box(1, [10, 5, 20, 10])]
    flipped = dataset(tmp_path, annotations, v2.RandomHorizontalFlip(p=1.0))[0]["target"]["boxes"]
    assert flipped.tolist() == [[30, 5, 50, 15]]  # width 60: x -> 60 - x
    resized = dataset(tmp_path, annotations, v2.Resize(80))[0]  # short side 40 -> 80: x 2
    assert resized["image"].shape[-2:] == (80, 120)
    assert resized["target"]["boxes"].tolist() == [[20, 10, 60, 30]]


def test_lsj_crop_clips_boxes_and_drops_the_ones_it_empties(tmp_path):
    # scale 2 of a 30 target keeps the 40 x 60 image's size (ratio 30 / 60 x 2 = 1) and crops 30 x 30 of it: the
    # two boxes sit in opposite corners, so no crop holds both
    annotations = [box(1, [0, 0, 10, 10]), box(2, [50, 30, 10, 10], category_id=3)]
    torch.manual_seed(0)
    counts = []
    for _ in range(20):
        target = dataset(tmp_path, annotations, LargeScaleJitter(30, (2.0, 2.0)))[0]["target"]
        boxes = target["boxes"]
        assert len(boxes) == len(target["labels"]) <= 1
        if len(boxes):
            assert (boxes[:, 2:] > boxes[:, :2]).all() and boxes.min() >= 0 and boxes.max() <= 30
        counts.append(len(boxes))
    assert 0 in counts and 1 in counts


def _issues(tmp_path, bad, caplog):
    with caplog.at_level(logging.WARNING):
        data = dataset(tmp_path, [box(1, [1, 1, 5, 5]), bad])
    assert data.load_raw(0)["annotation_ids"] == [1]
    warnings = [r.message for r in caplog.records if "dropped at start-up" in r.message]
    assert len(warnings) == 1 and "annotation id 2 (image id 1)" in warnings[0]
    return dict(data.index_issues.counts), warnings[0]


def test_negative_box_size_is_dropped_and_counted(tmp_path, caplog):
    counts, message = _issues(tmp_path, box(2, [5, 5, -3, 4]), caplog)
    assert counts == {"negative box size": 1} and "negative width or height" in message


def test_box_outside_the_image_is_dropped_and_counted(tmp_path, caplog):
    counts, message = _issues(tmp_path, box(2, [70, 5, 10, 10]), caplog)
    assert counts == {"box outside the image": 1} and "does not overlap the 60 x 40 image" in message


def test_nan_box_is_dropped_and_counted(tmp_path, caplog):
    counts, message = _issues(tmp_path, box(2, [5, float("nan"), 3, 4]), caplog)
    assert counts == {"non-finite box": 1} and "NaN or infinite" in message


def test_box_of_wrong_length_is_dropped_and_counted(tmp_path, caplog):
    counts, message = _issues(tmp_path, box(2, [5, 5, 3]), caplog)
    assert counts == {"malformed box": 1} and "not a list of 4 numbers" in message


def test_empty_missing_and_partly_outside_boxes(tmp_path, caplog):
    counts, _ = _issues(tmp_path, box(2, [5, 5, 0, 4]), caplog)
    assert counts == {"empty box": 1}
    caplog.clear()
    counts, _ = _issues(tmp_path, {k: v for k, v in box(2, None).items() if k != "bbox"}, caplog)
    assert counts == {"missing box": 1}
    # reaching past the border: clipped to the image, as DETR's pipeline does
    assert dataset(tmp_path, [box(1, [50, 30, 20, 20])])[0]["target"]["boxes"].tolist() == [[50, 30, 60, 40]]


def test_every_box_bad_is_an_empty_dataset_error_for_training(tmp_path):
    with pytest.raises(DataError, match="no usable non-crowd boxes"):
        dataset(tmp_path, [box(1, [5, 5, -1, 1])], filter_empty=True)


def test_box_only_file_for_a_mask_task_names_the_detection_task(tmp_path):
    with pytest.raises(DataError, match="data.task=detection"):
        CocoInstanceDataset(write_dataset(tmp_path, [box(1, [1, 1, 5, 5])]), tmp_path, task="instance")


def test_synthetic_data_serves_detection_batches(tmp_path):
    datamodule = DataModule(
        task="detection",
        root=str(tmp_path),
        synthetic={"num_train": 6, "num_val": 2, "min_size": 64, "max_size": 80, "crowd_prob": 0.5},
        train={"img_dir": "train2017", "ann_file": "annotations/instances_train2017.json"},
        val={"img_dir": "val2017", "ann_file": "annotations/instances_val2017.json"},
        train_transform={"recipe": "lsj", "size": 64, "scale": [0.5, 2.0]},
        eval_transform={"recipe": "resize", "short": 64, "max_size": 96},
        batch_size=3,
        num_workers=0,
    )
    datamodule.setup("fit")
    assert datamodule.metadata.class_names == ["circle", "square", "triangle", "diamond"]
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["images"].shape == (3, 3, 64, 64)
    for target in batch["targets"]:
        assert set(target) == {"labels", "boxes"} and len(target["labels"]) == len(target["boxes"]) > 0
        assert target["boxes"].max() <= 64
    val = datamodule.val_dataset[0]
    assert val["target"]["boxes"].shape[1] == 4
