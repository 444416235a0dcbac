"""Evaluators: COCO instance AP, panoptic quality, semantic mIoU; DDP-aware (see evaluation/base.py)."""

from densepred.evaluation.base import Evaluator, gather_by_image_id
from densepred.evaluation.coco_instance import COCOInstanceEvaluator
from densepred.evaluation.panoptic import PanopticEvaluator
from densepred.evaluation.semantic import SemanticEvaluator
from densepred.evaluation.table import format_metrics, format_per_class, format_table

__all__ = [
    "COCOInstanceEvaluator",
    "Evaluator",
    "PanopticEvaluator",
    "SemanticEvaluator",
    "format_metrics",
    "format_per_class",
    "format_table",
    "gather_by_image_id",
]
