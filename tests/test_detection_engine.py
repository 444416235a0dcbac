"""Detection in the engine: COCO box AP on box-only files, box overlays, the optimizer's lr multipliers, and the
LightningModule's training step and predictions for task "detection"."""

from __future__ import annotations

import json

import pytest
import torch

from densepred.data.metadata import DatasetMetadata, GroundTruth
from densepred.engine.module import SegmentationModule
from densepred.engine.optim import param_groups
from densepred.evaluation.build import build_evaluators
from densepred.visualization import draw_prediction, draw_target

CATEGORIES = [{"id": 3, "name": "dog"}, {"id": 7, "name": "cat"}]
MODEL = {
    "backbone": {
        "_target_": "densepred.backbones.AutoBackbone.from_config",
        "name": "resnet18",
        "pretrained": None,
        "out_features": ["stage2", "stage3", "stage4"],
    },
    "neck": {
        "_target_": "densepred.necks.deformable_detr_encoder.DeformableDetrEncoder",
        "hidden_dim": 64,
        "encoder_layers": 1,
        "num_heads": 4,
        "dim_feedforward": 64,
    },
    "head": {
        "_target_": "densepred.heads.deformable_detr.DeformableDetrHead",
        "num_queries": 5,
        "num_layers": 2,
        "num_heads": 4,
        "dim_feedforward": 64,
        "with_box_refine": True,
        "two_stage": True,
    },
}


def box_only_file(tmp_path):
    """Two images, boxes only (no segmentation, no area): what a labelling tool exports."""
    images = [
        {"id": 1, "file_name": "a.jpg", "height": 40, "width": 60},
        {"id": 2, "file_name": "b.jpg", "height": 50, "width": 50},
    ]
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [5, 5, 20, 10], "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 7, "bbox": [30, 10, 25, 25], "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 7, "bbox": [0, 0, 40, 30], "iscrowd": 0},
    ]
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return path


def test_detection_evaluates_box_ap_only_on_a_box_only_file(tmp_path):
    path = box_only_file(tmp_path)
    metadata = DatasetMetadata.from_categories(CATEGORIES, str(path))
    evaluators = build_evaluators(("detection",), GroundTruth(metadata, ann_file=str(path)))
    assert list(evaluators) == ["detection"]
    evaluator = evaluators["detection"]
    perfect = [
        {
            "instances": {
                "scores": torch.tensor([0.9, 0.8]),
                "labels": torch.tensor([0, 1]),
                "boxes": torch.tensor([[5.0, 5, 25, 15], [30, 10, 55, 35]]),
            }
        },
        {
            "instances": {
                "scores": torch.tensor([0.7, 0.6]),
                "labels": torch.tensor([1, 0]),
                "boxes": torch.tensor([[0.0, 0, 40, 30], [10, 10, 20, 20]]),
            }
        },  # one false positive dog
    ]
    evaluator.process([1, 2], perfect)
    metrics = evaluator.evaluate()
    assert set(metrics) == {f"bbox/{name}" for name in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
    # cat: both found, precision 1 -> 100; dog: found at rank 1 of 2 detections -> precision 1 at recall 1 -> 100
    assert metrics["bbox/AP"] == pytest.approx(100.0)
    wrong = [
        {
            "instances": {
                "scores": torch.tensor([0.9]),
                "labels": torch.tensor([1]),
                "boxes": torch.tensor([[5.0, 5, 25, 15]]),
            }
        }
    ]
    evaluator.reset()
    evaluator.process([1], wrong)
    assert evaluator.evaluate()["bbox/AP"] == pytest.approx(0.0)


def test_box_overlays_draw_class_colored_boxes():
    image = torch.zeros(3, 40, 60, dtype=torch.uint8)
    categories = [{"name": "dog", "color": (255, 0, 0)}, {"name": "cat", "color": (0, 255, 0)}]
    prediction = {
        "instances": {
            "scores": torch.tensor([0.9, 0.2]),
            "labels": torch.tensor([0, 1]),
            "boxes": torch.tensor([[5.0, 5, 25, 15], [30, 10, 55, 35]]),
        }
    }
    drawn = draw_prediction(image, prediction, categories, score_threshold=0.5)
    assert drawn[:, 5, 10].tolist() == [255, 0, 0]  # the dog box's top edge, in its color
    assert drawn[:, 30, 55].tolist() == [0, 0, 0]  # the cat is below the threshold: not drawn
    target = draw_target(image, {"labels": torch.tensor([1]), "boxes": torch.tensor([[30.0, 10, 55, 35]])}, categories)
    assert target[:, 10, 40].tolist() == [0, 255, 0]


def test_lr_multipliers_scale_the_matching_parameters():
    model = torch.nn.ModuleDict(
        {"backbone": torch.nn.Linear(2, 2), "sampling_offsets": torch.nn.Linear(2, 2), "head": torch.nn.Linear(2, 2)}
    )
    groups = param_groups(model, lr=1.0, weight_decay=0.0, lr_multipliers={"sampling_offsets": 0.1})
    lrs = {
        name: group["lr"]
        for group in groups
        for name, p in model.named_parameters()
        if any(p is q for q in group["params"])
    }
    assert lrs == {
        "backbone.weight": 0.1,
        "backbone.bias": 0.1,
        "sampling_offsets.weight": 0.1,
        "sampling_offsets.bias": 0.1,
        "head.weight": 1.0,
        "head.bias": 1.0,
    }


def detection_module() -> SegmentationModule:
    torch.manual_seed(0)
    metadata = {
        "categories": [{"id": 3, "name": "dog", "isthing": True}, {"id": 7, "name": "cat", "isthing": True}],
        "num_classes": 2,
        "ignore_index": 255,
    }
    criterion = {"_target_": "densepred.heads.box_criterion.BoxCriterion"}
    postprocess = {"object_mask_threshold": 0.8, "overlap_threshold": 0.8, "test_topk": 7, "exact_max_pixels": 1}
    return SegmentationModule(MODEL, criterion, metadata, task="detection", postprocess=postprocess)


def test_module_trains_and_predicts_boxes_at_the_original_size():
    module = detection_module()
    batch = {
        "images": torch.randint(0, 255, (2, 3, 64, 96), dtype=torch.uint8),
        "targets": [
            {"labels": torch.tensor([0, 1]), "boxes": torch.tensor([[2.0, 3, 30, 40], [40, 10, 90, 60]])},
            {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)},
        ],
        "image_ids": [1, 2],
        "image_sizes": [(64, 96), (48, 80)],
        "orig_sizes": [(128, 192), (48, 80)],
    }
    module.log = module.log_dict = lambda *args, **kwargs: None  # no trainer attached
    loss = module.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert module.model.head.enc_class_embed.weight.grad.abs().sum() > 0  # the encoder loss trains the proposals
    module.eval()
    predictions = module.predict(batch)
    first = predictions[0]["instances"]
    assert set(first) == {"scores", "labels", "boxes"} and first["boxes"].shape == (7, 4)
    assert (first["boxes"][:, 2] <= 192).all() and (first["boxes"][:, 3] <= 128).all()
    assert (predictions[1]["instances"]["boxes"][:, 2] <= 80).all()


def test_task_and_criterion_must_agree():
    metadata = {"categories": [{"id": 1, "name": "a", "isthing": True}], "num_classes": 1, "ignore_index": 255}
    with pytest.raises(ValueError, match="train with data.task=detection"):
        SegmentationModule(MODEL, {"_target_": "densepred.heads.box_criterion.BoxCriterion"}, metadata, task="instance")
    with pytest.raises(ValueError, match="data.task=detection with the criterion SetCriterion"):
        SegmentationModule(MODEL, {"_target_": "densepred.heads.criterion.SetCriterion"}, metadata, task="detection")
