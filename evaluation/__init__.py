"""Evaluators: COCO instance AP, panoptic quality, semantic mIoU; DDP-aware (see evaluation/base.py)."""

from evaluation.base import Evaluator, gather_by_image_id
from evaluation.coco_instance import COCOInstanceEvaluator
from evaluation.panoptic import PanopticEvaluator
from evaluation.semantic import SemanticEvaluator
from evaluation.table import format_metrics, format_per_class, format_table

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
