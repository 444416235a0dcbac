"""What every dataset here provides: samples for training and ground truth in the original files' terms."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from .errors import BadImageError, DataError
from .metadata import DatasetMetadata, GroundTruth
from .reporting import Issue
from .targets import semantic_target, target_from_boxes, target_from_masks, target_from_segment_map

# The training tasks (the one list of them: the engine imports it).
TASKS = ("panoptic", "instance", "semantic", "detection")
MAX_CONSECUTIVE_SKIPS = 16


class SegmentationDataset(Dataset):
    """Base class of the readers.

    Subclasses fill `metadata`, `ground_truth` (what their evaluation reads, see `GroundTruth`), `image_ids`
    and implement `load_raw(index)`, which returns the sample as
    stored (before transforms):
        "image": (H, W, 3) uint8, "image_id", "orig_size": (H, W), "file_name",
        "labels": (N,) int64 contiguous, "iscrowd": (N,) bool, and the segments as one of
        "segment_map": (H, W) int32 (0 void, k + 1 = segment k; panoptic), "masks": (N, H, W) uint8
        (instances, may overlap) or "sem_seg": (H, W) int64 (label maps, ignore_index where unlabeled), or
        for detection "boxes": (N, 4) float32 XYXY pixels, "issues": list of (reason, message) found while decoding.
    `__getitem__` applies the transform and returns {"image": (3, h, w) uint8, "target": {...},
    "image_id", "orig_size", "issues"}, the target as in docs/architecture.md (before padding).
    """

    metadata: DatasetMetadata
    ground_truth: GroundTruth
    image_ids: list[int]

    def __init__(self, task: str, transform: Callable | None, skip_bad_images: bool) -> None:
        if task not in TASKS:
            raise DataError(f"task={task!r} is not one of {list(TASKS)}")
        self.task = task
        self.transform = transform
        self.skip_bad_images = skip_bad_images
        self._isthing = None

    def __len__(self) -> int:
        return len(self.image_ids)

    def index_of(self, image_id: int) -> int:
        """Position of `image_id` in the dataset; a DataError if it is not there."""
        if not hasattr(self, "_positions"):
            self._positions = {image_id: k for k, image_id in enumerate(self.image_ids)}
        if image_id not in self._positions:
            raise DataError(f"image id {image_id} is not in this dataset ({len(self)} images)")
        return self._positions[image_id]

    def load_raw(self, index: int, include_crowd: bool = True) -> dict[str, Any]:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        issues: list[Issue] = []
        for _ in range(MAX_CONSECUTIVE_SKIPS):
            try:
                raw = self.load_raw(index, include_crowd=self.task not in ("instance", "detection"))
                break
            except BadImageError as error:
                if not self.skip_bad_images:
                    raise
                issues.append(("skipped image", str(error)))
                index = (index + 1) % len(self)
        else:
            raise DataError(
                f"{MAX_CONSECUTIVE_SKIPS} consecutive images could not be read, the last: {issues[-1][1]}; "
                "check the image folder setting"
            )
        return self._to_sample(raw, issues + raw["issues"])

    def _to_sample(self, raw: dict[str, Any], issues: list[Issue]) -> dict[str, Any]:
        inputs: dict[str, Any] = {"image": tv_tensors.Image(torch.from_numpy(raw["image"]).permute(2, 0, 1))}
        for key in ("segment_map", "masks", "sem_seg"):
            if key in raw:
                inputs[key] = tv_tensors.Mask(torch.from_numpy(raw[key]))
        if "boxes" in raw:
            inputs["boxes"] = tv_tensors.BoundingBoxes(
                torch.from_numpy(raw["boxes"]), format="XYXY", canvas_size=tuple(raw["image"].shape[:2])
            )
        if self.transform is not None:
            inputs = self.transform(inputs)
        labels = torch.from_numpy(raw["labels"])
        iscrowd = torch.from_numpy(raw["iscrowd"])
        ignore_index = self.metadata.ignore_index
        if "segment_map" in inputs:
            if self._isthing is None:
                self._isthing = torch.tensor([c["isthing"] for c in self.metadata.categories])
            target = target_from_segment_map(
                inputs["segment_map"].as_subclass(torch.Tensor), labels, iscrowd, self._isthing, self.task, ignore_index
            )
        elif "boxes" in inputs:
            target = target_from_boxes(inputs["boxes"].as_subclass(torch.Tensor)[~iscrowd], labels[~iscrowd])
        elif "masks" in inputs:
            target = target_from_masks(inputs["masks"].as_subclass(torch.Tensor)[~iscrowd], labels[~iscrowd])
        else:
            target = semantic_target(inputs["sem_seg"].as_subclass(torch.Tensor), ignore_index)
        return {
            "image": inputs["image"].as_subclass(torch.Tensor),
            "target": target,
            "image_id": raw["image_id"],
            "orig_size": raw["orig_size"],
            "issues": issues,
        }
