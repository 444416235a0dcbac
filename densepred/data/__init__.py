"""Data: COCO instance / panoptic / semantic and custom datasets, transforms, batching, the DataModule."""

from .base import TASKS, SegmentationDataset
from .coco_instance import CocoInstanceDataset
from .coco_panoptic import CocoPanopticDataset, PanopticGroundTruth
from .collate import Collate
from .datamodule import DataModule
from .errors import BadImageError, DataError
from .metadata import IGNORE_INDEX, DatasetMetadata, GroundTruth
from .semantic import SemanticFolderDataset
from .synthetic import ensure_synthetic, generate_synthetic
from .transforms import build_transform

__all__ = [
    "TASKS",
    "SegmentationDataset",
    "CocoInstanceDataset",
    "CocoPanopticDataset",
    "SemanticFolderDataset",
    "Collate",
    "DataModule",
    "DataError",
    "BadImageError",
    "DatasetMetadata",
    "GroundTruth",
    "PanopticGroundTruth",
    "IGNORE_INDEX",
    "ensure_synthetic",
    "generate_synthetic",
    "build_transform",
]
