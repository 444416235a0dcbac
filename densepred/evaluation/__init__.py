"""Evaluators: COCO instance AP, panoptic quality, semantic mIoU; DDP-aware (see evaluation/base.py)."""

from densepred.evaluation.base import Evaluator, gather_by_image_id
from densepred.evaluation.build import EVALUATIONS, build_evaluators
from densepred.evaluation.coco_instance import COCOInstanceEvaluator
from densepred.evaluation.panoptic import PanopticEvaluator
from densepred.evaluation.semantic import SemanticEvaluator
from densepred.evaluation.table import format_table

__all__ = [
    "EVALUATIONS",
    "COCOInstanceEvaluator",
    "Evaluator",
    "PanopticEvaluator",
    "SemanticEvaluator",
    "build_evaluators",
    "format_table",
    "gather_by_image_id",
]
