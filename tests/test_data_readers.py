"""Readers against pycocotools and the panopticapi formulas, on the synthetic COCO-format data."""

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from densepred.data import (
    CocoInstanceDataset,
    CocoPanopticDataset,
    DatasetMetadata,
    PanopticGroundTruth,
    SemanticFolderDataset,
    generate_synthetic,
)
from densepred.data.coco_json import read_categories
from densepred.data.image_io import rgb2id
from densepred.data.records import SerializedList


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("syn"), num_train=12, num_val=6, crowd_prob=0.5, seed=3)


def instances(root, split="train"):
    return CocoInstanceDataset(root / f"annotations/instances_{split}2017.json", root / f"{split}2017")


def panoptic(root, split="train", task="panoptic"):
    return CocoPanopticDataset(
        root / f"annotations/panoptic_{split}2017.json",
        root / f"annotations/panoptic_{split}2017",
        root / f"{split}2017",
        task=task,
        ann_file=str(root / f"annotations/instances_{split}2017.json"),
    )


def test_the_synthetic_data_uses_every_coco_segmentation_kind(coco_dir):
    anns = json.loads((coco_dir / "annotations/instances_train2017.json").read_text())["annotations"]
    kinds = {
        ("polygon" if isinstance(a["segmentation"], list) else type(a["segmentation"]["counts"]).__name__) for a in anns
    }
    assert kinds == {"polygon", "list", "str"}  # polygons, uncompressed RLE, compressed RLE
    assert any(a["iscrowd"] for a in anns)


def test_instance_masks_equal_pycocotools_annToMask(coco_dir):
    dataset = instances(coco_dir)
    coco = COCO(str(coco_dir / "annotations/instances_train2017.json"))
    checked = 0
    for index in range(len(dataset)):
        raw = dataset.load_raw(index)
        assert raw["image"].shape == (*raw["orig_size"], 3) and raw["image"].dtype == np.uint8
        for ann_id, mask, label, crowd in zip(
            raw["annotation_ids"], raw["masks"], raw["labels"], raw["iscrowd"], strict=True
        ):
            ann = coco.anns[ann_id]
            np.testing.assert_array_equal(mask, coco.annToMask(ann))
            assert dataset.metadata.contiguous_to_dataset_id[label] == ann["category_id"]
            assert crowd == bool(ann["iscrowd"])
            checked += 1
    assert checked == len(coco.anns)


def mask_extents(masks: torch.Tensor) -> list[list[int]]:
    """[x1, y1, x2, y2] of each mask, x2 / y2 one past the last pixel (COCO's bbox as XYXY)."""
    extents = []
    for mask in masks:
        ys, xs = torch.nonzero(mask, as_tuple=True)
        extents.append([int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1])
    return extents


def test_instance_sample_leaves_crowd_out_and_masks_fit_the_coco_boxes(coco_dir):
    dataset = instances(coco_dir)
    coco = COCO(str(coco_dir / "annotations/instances_train2017.json"))
    for index, image_id in enumerate(dataset.image_ids):
        sample = dataset[index]
        anns = [a for a in coco.imgToAnns[image_id] if not a["iscrowd"]]
        target = sample["target"]
        assert sample["image_id"] == image_id
        assert sample["orig_size"] == (coco.imgs[image_id]["height"], coco.imgs[image_id]["width"])
        assert sorted(target["labels"].tolist()) == sorted(
            dataset.metadata.dataset_id_to_contiguous[a["category_id"]] for a in anns
        )
        # No transform: the masks' extents are the COCO boxes [x, y, w, h] as XYXY.
        expected = sorted(
            [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns
        )
        assert sorted(mask_extents(target["masks"])) == expected
        assert target["masks"].dtype == torch.bool and sample["image"].shape == (3, *sample["orig_size"])


def test_panoptic_segments_follow_rgb2id_and_match_the_instances(coco_dir):
    dataset = panoptic(coco_dir)
    pan = json.loads((coco_dir / "annotations/panoptic_train2017.json").read_text())
    coco = COCO(str(coco_dir / "annotations/instances_train2017.json"))
    for ann in pan["annotations"]:
        raw = dataset.load_raw(dataset.index_of(ann["image_id"]))
        png = np.asarray(Image.open(coco_dir / "annotations/panoptic_train2017" / ann["file_name"]), dtype=np.uint32)
        ids = png[..., 0] + 256 * png[..., 1] + 256 * 256 * png[..., 2]  # panopticapi's rgb2id
        thing_masks = [coco.annToMask(a) for a in coco.imgToAnns[ann["image_id"]]]
        for k, info in enumerate(ann["segments_info"]):
            mask = raw["segment_map"] == k + 1
            np.testing.assert_array_equal(mask, ids == info["id"])
            assert mask.sum() == info["area"]
            assert raw["iscrowd"][k] == bool(info["iscrowd"])
            assert dataset.metadata.categories[raw["labels"][k]]["id"] == info["category_id"]
            if dataset.metadata.categories[raw["labels"][k]]["isthing"]:
                assert sum(np.array_equal(mask, m) for m in thing_masks) == 1


def test_rgb2id():
    color = np.array([[[1, 0, 0], [0, 1, 0], [7, 2, 1]]], dtype=np.uint8)
    assert rgb2id(color).tolist() == [[1, 256, 7 + 2 * 256 + 65536]]


def test_panoptic_tasks_give_things_or_class_maps(coco_dir):
    things = panoptic(coco_dir, task="instance")
    semantic = panoptic(coco_dir, task="semantic")
    ground_truth = PanopticGroundTruth(semantic.ground_truth.panoptic_json, semantic.ground_truth.panoptic_root)
    meta = things.metadata
    for index in range(len(things)):
        raw = things.load_raw(index)
        sample, sem = things[index], semantic[index]
        keep = ~raw["iscrowd"] & np.isin(raw["labels"], meta.thing_classes)
        assert sorted(sample["target"]["labels"].tolist()) == sorted(raw["labels"][keep].tolist())
        # Semantic: crowd pixels are ignored in training, kept (with their class) in the evaluation ground truth.
        sem_seg = sem["target"]["sem_seg"].numpy()
        gt = ground_truth.semantic(raw["image_id"])
        crowd = np.isin(raw["segment_map"], np.flatnonzero(raw["iscrowd"]) + 1)
        np.testing.assert_array_equal(sem_seg[~crowd], gt[~crowd])
        assert (sem_seg[crowd] == 255).all() and (gt[crowd] == 0).all()  # crowds are circles (class 0)
        assert (gt[raw["segment_map"] == 0] == 255).all()
        classes = sorted(set(np.unique(sem_seg).tolist()) - {255})
        assert sem["target"]["labels"].tolist() == classes
        for label, mask in zip(sem["target"]["labels"], sem["target"]["masks"], strict=True):
            np.testing.assert_array_equal(mask.numpy(), sem_seg == int(label))


def test_metadata_maps_sparse_ids_and_keeps_names_colors_isthing(coco_dir):
    dataset = panoptic(coco_dir)
    meta, ground_truth = dataset.metadata, dataset.ground_truth
    assert meta.contiguous_to_dataset_id == [1, 2, 4, 7, 110, 125, 148]
    assert meta.class_names == ["circle", "square", "triangle", "diamond", "sky", "ground", "water"]
    assert meta.thing_classes == [0, 1, 2, 3] and [c["isthing"] for c in meta.categories][4:] == [False] * 3
    assert meta.num_classes == 7
    assert meta.categories[0]["color"] == (220, 40, 40) and meta.dataset_id_to_contiguous[148] == 6
    assert meta.ignore_index == 255 and ground_truth.panoptic_root.endswith("panoptic_train2017")
    assert ground_truth.ann_file.endswith("instances_train2017.json") and ground_truth.metadata is meta
    inst = instances(coco_dir)
    assert inst.metadata.num_classes == 4 and inst.metadata.thing_classes == [0, 1, 2, 3]
    assert inst.ground_truth.panoptic_json is None


def test_read_categories_reads_only_the_categories(coco_dir, tmp_path):
    path = coco_dir / "annotations/panoptic_val2017.json"
    assert read_categories(path) == json.loads(path.read_text())["categories"]
    # "categories" appearing first, and the word inside a string, are handled too.
    data = {
        "info": {"note": '"categories": [1]'},
        "categories": [{"id": 5, "name": "x"}],
        "images": [],
        "annotations": [],
    }
    (tmp_path / "a.json").write_text(json.dumps(data))
    assert read_categories(tmp_path / "a.json") == [{"id": 5, "name": "x"}]


def test_custom_coco_json_with_its_own_categories(tmp_path):
    Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(tmp_path / "a.png")
    rle = mask_utils.encode(np.asfortranarray(np.pad(np.ones((4, 5), np.uint8), ((2, 14), (3, 22)))))
    data = {
        "images": [{"id": 42, "file_name": "a.png", "height": 20, "width": 30}],
        "annotations": [
            {
                "id": 9,
                "image_id": 42,
                "category_id": 300,
                "bbox": [10, 5, 10, 5],
                "iscrowd": 0,
                "segmentation": [[10, 5, 20, 5, 20, 10, 10, 10]],
            },
            {
                "id": 10,
                "image_id": 42,
                "category_id": 17,
                "bbox": [3, 2, 5, 4],
                "iscrowd": 0,
                "segmentation": {"size": [20, 30], "counts": rle["counts"].decode()},
            },
        ],
        "categories": [{"id": 300, "name": "bolt"}, {"id": 17, "name": "nut"}],
    }
    (tmp_path / "train.json").write_text(json.dumps(data))
    dataset = CocoInstanceDataset(tmp_path / "train.json", tmp_path)
    assert dataset.metadata.class_names == ["nut", "bolt"] and dataset.metadata.contiguous_to_dataset_id == [17, 300]
    target = dataset[0]["target"]
    assert target["labels"].tolist() == [1, 0]
    assert mask_extents(target["masks"]) == [[10, 5, 20, 10], [3, 2, 8, 6]]
    assert target["masks"].sum((1, 2)).tolist() == [50, 20]


def test_label_folder_dataset_ade20k_style(tmp_path):
    (tmp_path / "img").mkdir(), (tmp_path / "ann").mkdir()
    label = np.array([[0, 1, 2], [3, 150, 151], [255, 2, 1]], dtype=np.uint8)
    for name in ("b", "a"):
        Image.fromarray(np.zeros((3, 3, 3), np.uint8)).save(tmp_path / "img" / f"{name}.jpg")
        Image.fromarray(label).save(tmp_path / "ann" / f"{name}.png")
    names = [f"c{k}" for k in range(150)]
    dataset = SemanticFolderDataset(tmp_path / "img", tmp_path / "ann", names, reduce_zero_label=True)
    assert dataset.image_ids == [0, 1] and dataset.load_raw(0)["file_name"] == "a.jpg"
    expected = [[255, 0, 1], [2, 149, 255], [255, 1, 0]]  # 0 and 255 ignored, 151 out of range
    assert dataset.load_semantic_gt(1).tolist() == expected
    sample = dataset[0]
    assert sample["target"]["sem_seg"].tolist() == expected
    assert sample["target"]["labels"].tolist() == [0, 1, 2, 149]
    assert [reason for reason, _ in sample["issues"]] == ["label out of range"]
    plain = SemanticFolderDataset(tmp_path / "img", tmp_path / "ann", [f"c{k}" for k in range(152)])
    assert plain.load_semantic_gt(0).tolist() == [[0, 1, 2], [3, 150, 151], [255, 2, 1]]


def test_index_is_serialized_and_nothing_is_decoded_at_start_up(coco_dir, monkeypatch):
    calls, opened = [], []
    monkeypatch.setattr(mask_utils, "decode", lambda *a: calls.append(1))
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda *a: calls.append(1))
    original_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(1) or original_open(*a, **k))
    dataset = instances(coco_dir)
    assert calls == [] and isinstance(dataset._records, SerializedList)
    assert len(opened) == len(dataset) == 12  # each image's header only, for the size check
    items = [{"a": k, "b": [k] * k} for k in range(5)]
    stored = SerializedList(items)
    assert [stored[k] for k in range(5)] == items and stored[-1] == items[-1] and len(stored) == 5


def test_metadata_from_categories_orders_by_id_and_fills_colors():
    meta = DatasetMetadata.from_categories([{"id": 9, "name": "b"}, {"id": 2, "name": "a", "isthing": 0}], "x.json")
    assert meta.class_names == ["a", "b"] and meta.thing_classes == [1]
    assert len({c["color"] for c in meta.categories}) == 2
