"""COCO instance segmentation and detection AP with pycocotools' COCOeval.

Masks are RLE-encoded with pycocotools; the results follow the COCO results format
(https://cocodataset.org/#format-results). As in Detectron2, segm AP is computed on results without
"bbox" and bbox AP on results without "segmentation" (COCO.loadRes takes a result's area from its box
when both are present, which would put masks in the wrong small/medium/large bucket). write() exports
the two files exactly as they were evaluated, so running COCOeval on them gives the same numbers.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from densepred.evaluation.base import (
    dataset_id_lookup,
    gather_by_image_id,
    is_main_process,
    map_label,
    percent,
    to_numpy,
)
from densepred.evaluation.table import format_table
from densepred.utils.io import atomic_write_json

logger = logging.getLogger(__name__)

IOU_TYPES = ("segm", "bbox")
SUMMARY_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[0:6]


class COCOInstanceEvaluator:
    """COCO AP, AP50, AP75, APs, APm, APl for masks ("segm/...") and boxes ("bbox/..."), in percent.

    Args:
        ann_file: COCO instances JSON of the split (images, annotations, categories).
        contiguous_to_dataset_id: dataset category id of each contiguous label (list or dict).
        iou_types: which of "segm", "bbox" to evaluate.

    Predictions per image: {"instances": {"masks": bool (N, H, W), "scores": (N,), "labels": (N,),
    "boxes": (N, 4) XYXY}} at the original image size ("masks" only read for "segm"; a detector gives none and
    is evaluated with iou_types=("bbox",)). Metrics cover the images given to process().
    """

    def __init__(
        self,
        ann_file: str | os.PathLike,
        contiguous_to_dataset_id: Mapping[int, int] | Sequence[int],
        iou_types: Sequence[str] = IOU_TYPES,
    ) -> None:
        self.ann_file = Path(ann_file)
        if not self.ann_file.is_file():
            raise FileNotFoundError(
                f"COCO annotation file {self.ann_file} does not exist; check the dataset's ann_file"
            )
        bad = [t for t in iou_types if t not in IOU_TYPES]
        if bad:
            raise ValueError(f"iou_types {bad} are not supported; choose from {list(IOU_TYPES)}")
        self.iou_types = tuple(iou_types)
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco_gt = COCO(str(self.ann_file))
        for ann in self.coco_gt.anns.values():  # box-only files (detection) may leave out the area COCOeval reads
            if "area" not in ann and isinstance(ann.get("bbox"), list) and len(ann["bbox"]) == 4:
                ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
        self.dataset_ids = dataset_id_lookup(contiguous_to_dataset_id)
        unknown = sorted(set(self.dataset_ids.values()) - set(self.coco_gt.getCatIds()))
        if unknown:
            raise ValueError(
                f"contiguous_to_dataset_id names category ids {unknown} that {self.ann_file} does not define"
            )
        self.reset()

    def reset(self) -> None:
        self._results: dict[int, list[dict[str, Any]]] = {}
        self._gathered: dict[int, list[dict[str, Any]]] | None = None
        self.metrics: dict[str, float] = {}
        self.per_class: dict[str, dict[str, float]] = {}

    def process(self, image_ids: Sequence[int], predictions: Sequence[Mapping[str, Any]]) -> None:
        """Encode each image's instances in the COCO results format (masks as RLE, boxes as XYWH)."""
        for image_id, prediction in zip(image_ids, predictions, strict=True):
            image_id = int(image_id)
            if image_id not in self.coco_gt.imgs:
                raise ValueError(f"image id {image_id} is not in {self.ann_file}; evaluate on the split it describes")
            self._results[image_id] = self._encode(image_id, prediction["instances"])

    def _encode(self, image_id: int, instances: Mapping[str, Any]) -> list[dict[str, Any]]:
        scores, labels = to_numpy(instances["scores"]), to_numpy(instances["labels"])
        boxes = to_numpy(instances["boxes"]).astype(np.float64).reshape(-1, 4)  # (N, 4) XYXY
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
        results = [
            {
                "image_id": image_id,
                "category_id": map_label(self.dataset_ids, label, image_id),
                "score": float(score),
                "bbox": [float(v) for v in box],
            }
            for box, score, label in zip(xywh, scores, labels, strict=True)
        ]
        if "segm" not in self.iou_types:  # box detections: no masks
            return results
        masks = to_numpy(instances["masks"]).astype(bool)  # (N, H, W)
        info = self.coco_gt.imgs[image_id]
        if masks.ndim != 3 or masks.shape[1:] != (info["height"], info["width"]):
            raise ValueError(
                f"image {image_id}: instance masks have shape {tuple(masks.shape)}, expected "
                f"(N, {info['height']}, {info['width']})"
                f" (the image size in {self.ann_file}); resize to the original size"
            )
        rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0), dtype=np.uint8)) if len(masks) else []
        for result, rle in zip(results, rles, strict=True):
            result["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
        return results

    def evaluate(self) -> dict[str, float]:
        """Gather every rank's results (a collective), then run COCOeval for each IoU type."""
        self._gathered = gather_by_image_id(self._results)
        image_ids = list(self._gathered)
        if len(image_ids) < len(self.coco_gt.imgs) and is_main_process():
            logger.warning(
                "COCO instance evaluation on %d of the %d images in %s: not comparable to full-split numbers",
                len(image_ids),
                len(self.coco_gt.imgs),
                self.ann_file,
            )
        self.metrics, self.per_class = {}, {}
        for iou_type in self.iou_types:
            coco_eval = self._run_cocoeval(iou_type, image_ids)
            for name, value in zip(SUMMARY_NAMES, coco_eval.stats[:6], strict=True):
                self.metrics[f"{iou_type}/{name}"] = percent(value)
            for name, ap in self._per_category_ap(coco_eval).items():
                self.per_class.setdefault(name, {})[f"{iou_type}/AP"] = ap
        return dict(self.metrics)

    def results(self, iou_type: str) -> list[dict[str, Any]]:
        """The gathered results in the COCO results format for `iou_type` (what COCOeval is given)."""
        if self._gathered is None:
            raise RuntimeError("call evaluate() before results() or write()")
        drop = "bbox" if iou_type == "segm" else "segmentation"
        return [{k: v for k, v in r.items() if k != drop} for rs in self._gathered.values() for r in rs]

    def _run_cocoeval(self, iou_type: str, image_ids: list[int]) -> COCOeval:
        results = self.results(iou_type)
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = self.coco_gt.loadRes(results) if results else _empty_results(self.coco_gt)
            coco_eval = COCOeval(self.coco_gt, coco_dt, iouType=iou_type)
            coco_eval.params.imgIds = image_ids
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        return coco_eval

    def _per_category_ap(self, coco_eval: COCOeval) -> dict[str, float]:
        """AP per category (Detectron2's definition): mean precision over IoUs and recalls, area all, 100 dets."""
        precision = coco_eval.eval["precision"]  # (T IoUs, R recalls, K categories, A areas, M max dets)
        per_category = {}
        for k, category_id in enumerate(coco_eval.params.catIds):
            p = precision[:, :, k, 0, -1]
            p = p[p > -1]
            per_category[self.coco_gt.cats[category_id]["name"]] = float(100 * p.mean()) if p.size else float("nan")
        return per_category

    def table(self) -> str:
        """AP table, one row per IoU type."""
        rows = [[t, *(self.metrics[f"{t}/{n}"] for n in SUMMARY_NAMES)] for t in self.iou_types]
        return format_table(["", *SUMMARY_NAMES], rows, title=f"COCO instance AP ({self.ann_file.name})")

    def write(self, folder: str | os.PathLike) -> list[Path]:
        """On rank 0: coco_instances_{segm,bbox}_results.json (COCO results format) and instance_metrics.json."""
        if self._gathered is None:
            raise RuntimeError("call evaluate() before write()")
        if not is_main_process():
            return []
        folder = Path(folder)
        written = [
            atomic_write_json(folder / f"coco_instances_{t}_results.json", self.results(t), indent=None)
            for t in self.iou_types
        ]
        metrics = {"metrics": self.metrics, "per_class": self.per_class}
        return [*written, atomic_write_json(folder / "instance_metrics.json", metrics, indent=None)]


def _empty_results(coco_gt: COCO) -> COCO:
    """A results object with no detections (COCO.loadRes cannot take an empty list)."""
    coco_dt = COCO()
    coco_dt.dataset = {**coco_gt.dataset, "annotations": []}
    coco_dt.createIndex()
    return coco_dt
