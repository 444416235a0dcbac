"""Semantic segmentation from label maps: an image folder and a PNG folder with one class index per pixel.

This is the ADE20K (ADEChallengeData2016) layout. The other semantic source, COCO panoptic-derived
semantic segmentation, is `CocoPanopticDataset(task="semantic")`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .base import SegmentationDataset
from .errors import DataError
from .image_io import IMAGE_SUFFIXES, read_image, read_label_png
from .metadata import DatasetMetadata, GroundTruth
from .records import SerializedList
from .reporting import IssueReport


class SemanticFolderDataset(SegmentationDataset):
    """Images in `img_dir`, labels `<stem>.png` in `sem_seg_dir`; image ids are positions in sorted order.

    Label values: `ignore_value` (and 0 if `reduce_zero_label`, ADE20K's "other") become ignore_index;
    with `reduce_zero_label` the others shift down by one (ADE20K's 1..150 -> 0..149). Values outside
    [0, num_classes) become ignore_index and are counted as issues.
    """

    def __init__(
        self,
        img_dir: str | Path,
        sem_seg_dir: str | Path,
        class_names: Sequence[str],
        transform: Callable | None = None,
        task: str = "semantic",
        ignore_value: int = 255,
        reduce_zero_label: bool = False,
        skip_bad_images: bool = False,
    ) -> None:
        super().__init__(task, transform, skip_bad_images)
        if task != "semantic":
            raise DataError(f"{sem_seg_dir}: a label-map dataset gives task=semantic only, not task={task}")
        self.img_dir, self.sem_seg_dir = Path(img_dir), Path(sem_seg_dir)
        for folder, key in ((self.img_dir, "img_dir"), (self.sem_seg_dir, "sem_seg_dir")):
            if not folder.is_dir():
                raise DataError(f"{folder}: folder not found; check the {key} setting")
        self.metadata = DatasetMetadata.from_class_names(class_names, str(sem_seg_dir))
        self.ground_truth = GroundTruth(self.metadata, semantic=self.load_semantic_gt)
        self.ignore_value, self.reduce_zero_label = ignore_value, reduce_zero_label
        images = sorted(p for p in self.img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        labels = {p.stem for p in self.sem_seg_dir.glob("*.png")}
        self.index_issues = IssueReport()
        self.index_issues.extend(
            ("image without label file", f"{p}: no {self.sem_seg_dir / (p.stem + '.png')}; the image is left out")
            for p in images
            if p.stem not in labels
        )
        self.index_issues.log(f"{sem_seg_dir}: left out at start-up")
        names = [p.name for p in images if p.stem in labels]
        if not names:
            raise DataError(
                f"{self.img_dir}: no image has a label PNG of the same name in {self.sem_seg_dir}; check both folders"
            )
        self.image_ids = list(range(len(names)))
        self._records = SerializedList(names)

    def _labels(self, name: str, image_id: int, shape: tuple[int, int] | None) -> tuple[np.ndarray, list]:
        path = self.sem_seg_dir / (Path(name).stem + ".png")
        raw = read_label_png(path, image_id)
        if shape is not None and raw.shape != shape:
            raise DataError(
                f"{path}: label map of image id {image_id} is {raw.shape[0]}x{raw.shape[1]}"
                f" but the image is {shape[0]}x{shape[1]}"
            )
        ignore_index = self.metadata.ignore_index
        ignored = raw == self.ignore_value
        if self.reduce_zero_label:
            ignored |= raw == 0
            raw = raw - 1
        out_of_range = ~ignored & ((raw < 0) | (raw >= self.metadata.num_classes))
        issues = []
        if out_of_range.any():
            values = np.unique(raw[out_of_range] + self.reduce_zero_label).tolist()[:5]
            issues.append(
                (
                    "label out of range",
                    f"{path}: image id {image_id}: value(s) {values} are not classes (treated as ignore)",
                )
            )
        return np.where(ignored | out_of_range, ignore_index, raw), issues

    def load_raw(self, index: int, include_crowd: bool = True) -> dict[str, Any]:
        name = self._records[index]
        image = read_image(self.img_dir / name, index)
        sem_seg, issues = self._labels(name, index, image.shape[:2])
        return {
            "image": image,
            "image_id": index,
            "orig_size": tuple(image.shape[:2]),
            "file_name": name,
            "labels": np.zeros(0, dtype=np.int64),
            "iscrowd": np.zeros(0, dtype=bool),
            "sem_seg": sem_seg,
            "issues": issues,
        }

    def load_semantic_gt(self, image_id: int) -> np.ndarray:
        """(H, W) int64 contiguous class per pixel at the original size, ignore_index elsewhere (for mIoU)."""
        return self._labels(self._records[self.index_of(image_id)], image_id, None)[0]
