"""Semantic segmentation metrics from a confusion matrix, as Detectron2's SemSegEvaluator.

The confusion matrix is (K + 1, K + 1), rows = predicted class, columns = ground-truth class, the last
column collecting ignored pixels (ignore_index), which every metric leaves out. Per class c with
ground-truth pixels: IoU_c = TP / (GT_c + Pred_c - TP) and ACC_c = TP / GT_c; mIoU and mACC average
them over those classes, fwIoU weights IoU_c by GT_c, pACC = sum TP / sum GT. Classes without
ground-truth pixels get NaN and are left out of the means. Metrics are in percent.

Each image's confusion matrix is kept sparse (its non-zero cells) by image id, so evaluate() can drop
DDP-padding duplicates and give the single-process result exactly.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_util

from densepred.evaluation.base import gather_by_image_id, is_main_process, to_numpy
from densepred.evaluation.table import format_table
from densepred.utils.io import atomic_write_json

logger = logging.getLogger(__name__)


def semantic_metrics(confusion: np.ndarray) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """mIoU, fwIoU, mACC, pACC (percent) and per-class IoU, ACC (percent, NaN without ground truth).

    confusion: (K + 1, K + 1) int64, rows predicted, columns ground truth, last column ignored pixels.
    """
    num_classes = confusion.shape[0] - 1
    valid = confusion[:-1, :-1].astype(np.float64)
    tp = np.diag(valid)
    pos_gt, pos_pred = valid.sum(axis=0), valid.sum(axis=1)
    has_gt = pos_gt > 0
    union = pos_gt + pos_pred - tp
    acc, iou = np.full(num_classes, np.nan), np.full(num_classes, np.nan)
    acc[has_gt] = tp[has_gt] / pos_gt[has_gt]
    iou[has_gt] = tp[has_gt] / union[has_gt]
    if not has_gt.any():
        return dict.fromkeys(("mIoU", "fwIoU", "mACC", "pACC"), float("nan")), 100 * iou, 100 * acc
    weights = pos_gt / pos_gt.sum()
    metrics = {
        "mIoU": 100 * float(np.sum(iou[has_gt]) / has_gt.sum()),
        "fwIoU": 100 * float(np.sum(iou[has_gt] * weights[has_gt])),
        "mACC": 100 * float(np.sum(acc[has_gt]) / has_gt.sum()),
        "pACC": 100 * float(np.sum(tp) / np.sum(pos_gt)),
    }
    return metrics, 100 * iou, 100 * acc


class SemanticEvaluator:
    """mIoU, fwIoU, mACC and pACC.

    Args:
        num_classes: K, the number of contiguous classes.
        ignore_index: the ground-truth value of pixels left out (void, crowd, padding).
        gt_loader: image id -> (H, W) integer ground truth at the original size, values in [0, K) or ignore_index.
        class_names: K names, for the per-class results.
        contiguous_to_dataset_id: optional; dataset category ids used in the exported RLE predictions
            (contiguous ids when not given).

    Predictions per image: {"sem_seg_labels": (H, W) integer class map} at the original image size (the
    PostProcessor's), or else {"sem_seg": float (K, H, W) class scores} at that size, arg-maxed here.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int,
        gt_loader: Callable[[int], np.ndarray],
        class_names: Sequence[str],
        contiguous_to_dataset_id: Mapping[int, int] | Sequence[int] | None = None,
    ) -> None:
        if len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names but num_classes is {num_classes}")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.gt_loader, self.class_names = gt_loader, list(class_names)
        if contiguous_to_dataset_id is None:
            contiguous_to_dataset_id = range(num_classes)
        if isinstance(contiguous_to_dataset_id, Mapping):
            contiguous_to_dataset_id = [contiguous_to_dataset_id[i] for i in range(num_classes)]
        self.dataset_ids = np.asarray(contiguous_to_dataset_id, dtype=np.int64)
        self.reset()

    def reset(self) -> None:
        self._confusion: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._rles: dict[int, list[dict[str, Any]]] = {}
        self._gathered_rles: dict[int, list[dict[str, Any]]] | None = None
        self.confusion = np.zeros((self.num_classes + 1, self.num_classes + 1), dtype=np.int64)
        self.metrics: dict[str, float] = {}
        self.per_class: dict[str, dict[str, float]] = {}

    def process(self, image_ids: Sequence[int], predictions: Sequence[Mapping[str, Any]]) -> None:
        """Each image's class map (`sem_seg_labels`, else the arg-max of `sem_seg`): count (predicted,
        ground-truth) pixel pairs."""
        k = self.num_classes
        for image_id, prediction in zip(image_ids, predictions, strict=True):
            image_id = int(image_id)
            key = "sem_seg_labels" if "sem_seg_labels" in prediction else "sem_seg"
            if key == "sem_seg_labels":
                pred = to_numpy(prediction[key]).astype(np.int64)
                if pred.ndim != 2 or (pred.size and (pred.min() < 0 or pred.max() >= k)):
                    raise ValueError(f"image {image_id}: sem_seg_labels must be (H, W) classes in [0, {k})")
            else:
                scores = prediction[key]
                if scores.ndim != 3 or scores.shape[0] != k:
                    raise ValueError(f"image {image_id}: sem_seg has shape {tuple(scores.shape)}, expected ({k}, H, W)")
                pred = to_numpy(scores.argmax(0)).astype(np.int64)
            gt = np.asarray(self.gt_loader(image_id)).astype(np.int64)
            if gt.shape != pred.shape:
                raise ValueError(
                    f"image {image_id}: {key} is {tuple(pred.shape)} but its ground truth is "
                    f"{tuple(gt.shape)}; predictions must be at the original image size"
                )
            out_of_range = (gt != self.ignore_index) & ((gt < 0) | (gt >= k))
            if out_of_range.any():
                raise ValueError(
                    f"image {image_id}: ground truth has values {np.unique(gt[out_of_range]).tolist()} "
                    f"outside [0, {k}) and ignore_index {self.ignore_index}; check the dataset's label mapping"
                )
            gt = np.where(gt == self.ignore_index, k, gt)
            counts = np.bincount((k + 1) * pred.ravel() + gt.ravel(), minlength=(k + 1) ** 2)
            cells = np.flatnonzero(counts)
            self._confusion[image_id] = (cells, counts[cells])
            self._rles[image_id] = self._encode(image_id, pred)

    def _encode(self, image_id: int, pred: np.ndarray) -> list[dict[str, Any]]:
        """COCO stuff results format: one RLE per predicted class (Detectron2 keys it by image id here)."""
        labels = np.unique(pred)
        masks = np.asfortranarray((pred[:, :, None] == labels).astype(np.uint8))  # (H, W, L)
        return [
            {
                "image_id": image_id,
                "category_id": int(self.dataset_ids[label]),
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
            }
            for label, rle in zip(labels, mask_util.encode(masks), strict=True)
        ]

    def evaluate(self) -> dict[str, float]:
        """Gather every rank's per-image counts (a collective), sum them and compute the metrics."""
        gathered = gather_by_image_id({i: (self._confusion[i], self._rles[i]) for i in self._confusion})
        flat = np.zeros((self.num_classes + 1) ** 2, dtype=np.int64)
        for (cells, counts), _ in gathered.values():
            flat[cells] += counts
        self.confusion = flat.reshape(self.num_classes + 1, self.num_classes + 1)
        self._gathered_rles = {i: rles for i, (_, rles) in gathered.items()}
        self.metrics, iou, acc = semantic_metrics(self.confusion)
        self.per_class = {n: {"IoU": float(iou[c]), "ACC": float(acc[c])} for c, n in enumerate(self.class_names)}
        return dict(self.metrics)

    def table(self) -> str:
        return format_table(list(self.metrics), [list(self.metrics.values())], title="Semantic segmentation")

    def write(self, folder: str | os.PathLike) -> list[Path]:
        """On rank 0: sem_seg_predictions.json (COCO stuff results, RLE) and semantic_metrics.json."""
        if self._gathered_rles is None:
            raise RuntimeError("call evaluate() before write()")
        if not is_main_process():
            return []
        folder = Path(folder)
        predictions = [r for rles in self._gathered_rles.values() for r in rles]
        return [
            atomic_write_json(folder / "sem_seg_predictions.json", predictions, indent=None),
            atomic_write_json(
                folder / "semantic_metrics.json",
                {
                    "metrics": self.metrics,
                    "per_class": self.per_class,
                    "confusion_matrix": self.confusion.tolist(),
                },
                indent=None,
            ),
        ]
