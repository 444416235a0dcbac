"""The evaluators of a run, built from what its data declares (`data.GroundTruth`), never from a dataset."""

from __future__ import annotations

from collections.abc import Sequence

from densepred.data.coco_panoptic import PanopticGroundTruth
from densepred.data.metadata import GroundTruth
from densepred.evaluation.base import Evaluator
from densepred.evaluation.coco_instance import COCOInstanceEvaluator
from densepred.evaluation.panoptic import PanopticEvaluator
from densepred.evaluation.semantic import SemanticEvaluator

# What each training task evaluates (Mask2Former: a panoptic model is also scored on AP and mIoU).
EVALUATIONS = {
    "panoptic": ("panoptic", "instance", "semantic"),
    "instance": ("instance",),
    "semantic": ("semantic",),
    "detection": ("detection",),
}


def build_evaluators(evaluations: Sequence[str], ground_truth: GroundTruth) -> dict[str, Evaluator]:
    """The evaluators named in `evaluations` ("panoptic", "instance", "semantic", "detection") for a split's
    ground truth.

    panoptic: PQ on `panoptic_json` + `panoptic_root` (an error without them); instance: COCO AP on
    `ann_file` (left out when the split has none; only the thing classes, as in COCO's instances files);
    detection: COCO box AP only (`bbox/AP`, ...) on `ann_file`, the same way;
    semantic: mIoU on the declared label-map reader, else on the per-pixel classes of the panoptic files.
    The panoptic files are read through one `PanopticGroundTruth`: the JSON is parsed once and each PNG
    decoded once per evaluation for PQ and mIoU together.
    """
    meta = ground_truth.metadata
    has_panoptic = ground_truth.panoptic_json is not None and ground_truth.panoptic_root is not None
    if "panoptic" in evaluations and not has_panoptic:
        raise ValueError("panoptic evaluation needs the dataset's panoptic_json and panoptic_root (data.val.*)")
    semantic_from_panoptic = "semantic" in evaluations and ground_truth.semantic is None and has_panoptic
    readers = int("panoptic" in evaluations) + int(semantic_from_panoptic)
    panoptic = PanopticGroundTruth(ground_truth.panoptic_json, ground_truth.panoptic_root, readers) if readers else None
    evaluators: dict[str, Evaluator] = {}
    if "panoptic" in evaluations:
        evaluators["panoptic"] = PanopticEvaluator(panoptic, list(meta.categories), meta.contiguous_to_dataset_id)
    if "instance" in evaluations and ground_truth.ann_file is not None:
        things = {k: meta.contiguous_to_dataset_id[k] for k in meta.thing_classes}
        evaluators["instance"] = COCOInstanceEvaluator(ground_truth.ann_file, things)
    if "detection" in evaluations and ground_truth.ann_file is not None:
        things = {k: meta.contiguous_to_dataset_id[k] for k in meta.thing_classes}
        evaluators["detection"] = COCOInstanceEvaluator(ground_truth.ann_file, things, iou_types=("bbox",))
    if "semantic" in evaluations:
        reader = panoptic.semantic if semantic_from_panoptic else ground_truth.semantic
        if reader is None:
            raise ValueError(
                "semantic evaluation needs per-pixel ground truth: a panoptic (panoptic_json + panoptic_root) or "
                "label-map (sem_seg_dir) split; this split has neither"
            )
        evaluators["semantic"] = SemanticEvaluator(meta.num_classes, meta.ignore_index, reader, meta.class_names)
    return evaluators
