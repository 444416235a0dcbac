"""Panoptic quality (PQ, SQ, RQ for all / things / stuff) as defined by the COCO panopticapi.

The definition followed (panopticapi `evaluation.py`, Kirillov et al. 2019):

* Segment ids come from the PNGs (RGB encoding id = R + 256 G + 256^2 B, 0 = void). Ground-truth areas
  are the "area" fields of the JSON, used as written (a non-integer area is not rounded);
  predicted areas are pixel counts.
* A prediction and a non-crowd ground-truth segment of the same category match when
  IoU = |G n P| / (|G| + |P| - |G n P| - |void n P|) > 0.5; each match is a TP adding its IoU.
* Unmatched non-crowd ground truths are FN. An unmatched prediction is an FP unless more than half of
  it lies on void or on the crowd region of its category (the last crowd segment of that category in
  the image's segments_info).
* Per category: PQ = sum IoU / (TP + FP/2 + FN/2), SQ = sum IoU / TP, RQ = TP / (TP + FP/2 + FN/2);
  "All", "Things" and "Stuff" average them over the categories with TP + FP + FN > 0 (NaN if none).

Statistics are computed per image in process() (ground-truth PNGs are read there, on every rank, through
a `data.PanopticGroundTruth` that the semantic evaluator of panoptic data may share, so each is decoded once);
evaluate() gathers them by image id and sums them in image-id order, so DDP gives the single-process
result exactly.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from densepred.data.coco_panoptic import PanopticGroundTruth
from densepred.data.image_io import id2rgb
from densepred.evaluation.base import dataset_id_lookup, gather_by_image_id, is_main_process, map_label, to_numpy
from densepred.evaluation.table import format_table
from densepred.utils.io import atomic_write_bytes, atomic_write_json

logger = logging.getLogger(__name__)

OFFSET = 256 * 256 * 256  # ids are < 2^24 (three 8-bit channels), so gt * OFFSET + pred is a unique pair key
VOID = 0
GROUPS = {"All": None, "Things": True, "Stuff": False}
SUFFIX = {"All": "", "Things": "_th", "Stuff": "_st"}


@dataclass(frozen=True)
class Segment:
    category_id: int
    area: float  # the JSON's "area" as written (panopticapi does not round it); predictions: a pixel count
    iscrowd: bool = False


def pq_image_stats(
    gt_ids: np.ndarray, gt_segments: Mapping[int, Segment], pred_ids: np.ndarray, pred_segments: Mapping[int, Segment]
) -> dict[int, np.ndarray]:
    """Per-category [sum IoU, TP, FP, FN] of one image (only the categories it touches).

    gt_ids, pred_ids: (H, W) segment ids; the segment dicts are in segments_info order.
    """
    keys, counts = np.unique(gt_ids.astype(np.uint64) * OFFSET + pred_ids.astype(np.uint64), return_counts=True)
    overlap = {(int(k) // OFFSET, int(k) % OFFSET): int(c) for k, c in zip(keys, counts, strict=True)}
    stats: dict[int, np.ndarray] = {}

    def add(category_id: int, iou: float = 0.0, tp: int = 0, fp: int = 0, fn: int = 0) -> None:
        stats.setdefault(category_id, np.zeros(4))[:] += (iou, tp, fp, fn)

    gt_matched, pred_matched = set(), set()
    for (gt_id, pred_id), inter in overlap.items():
        gt, pred = gt_segments.get(gt_id), pred_segments.get(pred_id)
        if gt is None or pred is None or gt.iscrowd or gt.category_id != pred.category_id:
            continue
        iou = inter / (pred.area + gt.area - inter - overlap.get((VOID, pred_id), 0))
        if iou > 0.5:
            add(gt.category_id, iou=iou, tp=1)
            gt_matched.add(gt_id)
            pred_matched.add(pred_id)

    crowd_of_category = {}
    for gt_id, gt in gt_segments.items():
        if gt.iscrowd:
            crowd_of_category[gt.category_id] = gt_id
        elif gt_id not in gt_matched:
            add(gt.category_id, fn=1)

    for pred_id, pred in pred_segments.items():
        if pred_id in pred_matched:
            continue
        ignored = overlap.get((VOID, pred_id), 0)
        if pred.category_id in crowd_of_category:
            ignored += overlap.get((crowd_of_category[pred.category_id], pred_id), 0)
        if ignored / pred.area <= 0.5:
            add(pred.category_id, fp=1)
    return stats


def pq_from_stats(
    stats: Mapping[int, np.ndarray], categories: Sequence[Mapping[str, Any]]
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """PQ / SQ / RQ (fractions) and N for All / Things / Stuff, and per category (by name).

    stats: category id -> summed [sum IoU, TP, FP, FN].
    """
    per_class, summary = {}, {}
    valid = {}
    for category in categories:
        iou, tp, fp, fn = stats.get(category["id"], np.zeros(4))
        if tp + fp + fn == 0:
            per_class[category["name"]] = {"PQ": 0.0, "SQ": 0.0, "RQ": 0.0}
            continue
        denominator = tp + 0.5 * fp + 0.5 * fn
        per_class[category["name"]] = {"PQ": iou / denominator, "SQ": iou / tp if tp else 0.0, "RQ": tp / denominator}
        valid[category["name"]] = bool(category["isthing"])
    for group, isthing in GROUPS.items():
        names = [n for n, thing in valid.items() if isthing is None or thing == isthing]
        summary[group] = {
            m: sum(per_class[n][m] for n in names) / len(names) if names else float("nan") for m in ("PQ", "SQ", "RQ")
        }
        summary[group]["N"] = len(names)
    return summary, per_class


class PanopticEvaluator:
    """COCO panoptic quality, in percent: PQ, SQ, RQ and their _th (things) and _st (stuff) variants.

    Args:
        ground_truth: the split's `data.PanopticGroundTruth(panoptic_json, panoptic_root)` (the COCO panoptic
            JSON, read once, and its folder of PNGs).
        categories: the dataset categories (dicts with "id", "name", "isthing"), PQ is averaged over these.
        contiguous_to_dataset_id: dataset category id of each contiguous label (list or dict).

    Predictions per image: {"panoptic_seg": int (H, W) segment ids, 0 = void, "segments_info":
    [{"id", "label" (contiguous), ...}]} at the original image size. Metrics cover the images given to
    process(). Segments listed in segments_info but absent from panoptic_seg are dropped (panopticapi
    rejects them); a pixel id missing from segments_info is an error.
    """

    def __init__(
        self,
        ground_truth: PanopticGroundTruth,
        categories: Sequence[Mapping[str, Any]],
        contiguous_to_dataset_id: Mapping[int, int] | Sequence[int],
    ) -> None:
        self.ground_truth = ground_truth
        self.panoptic_json = ground_truth.panoptic_json
        self.annotations = ground_truth.annotations
        self.categories = [dict(c) for c in categories]
        self.category_ids = {c["id"] for c in self.categories}
        self.dataset_ids = dataset_id_lookup(contiguous_to_dataset_id)
        unknown = sorted(set(self.dataset_ids.values()) - self.category_ids)
        if unknown:
            raise ValueError(f"contiguous_to_dataset_id names category ids {unknown} that `categories` does not define")
        self.reset()

    def reset(self) -> None:
        self.ground_truth.clear()
        self._stats: dict[int, dict[int, np.ndarray]] = {}
        self._segments: dict[int, list[dict[str, Any]]] = {}
        self._pngs: dict[int, bytes] = {}
        self._gathered_segments: dict[int, list[dict[str, Any]]] | None = None
        self.metrics: dict[str, float] = {}
        self.summary: dict[str, dict[str, float]] = {}
        self.per_class: dict[str, dict[str, float]] = {}

    def process(self, image_ids: Sequence[int], predictions: Sequence[Mapping[str, Any]]) -> None:
        """Compute each image's PQ statistics against its ground truth and keep its encoded PNG."""
        for image_id, prediction in zip(image_ids, predictions, strict=True):
            image_id = int(image_id)
            pred_ids = to_numpy(prediction["panoptic_seg"]).astype(np.int64)
            pred_segments, segments_info = self._prediction_segments(image_id, pred_ids, prediction["segments_info"])
            gt_ids, gt_segments = self._load_ground_truth(image_id)
            if gt_ids.shape != pred_ids.shape:
                raise ValueError(
                    f"image {image_id}: panoptic_seg has shape {tuple(pred_ids.shape)}, the ground-truth PNG "
                    f"{self.annotations[image_id]['file_name']} has {tuple(gt_ids.shape)}; resize to the original size"
                )
            self._stats[image_id] = pq_image_stats(gt_ids, gt_segments, pred_ids, pred_segments)
            self._segments[image_id] = segments_info
            png = io.BytesIO()
            Image.fromarray(id2rgb(pred_ids)).save(png, format="PNG")
            self._pngs[image_id] = png.getvalue()

    def _prediction_segments(
        self, image_id: int, pred_ids: np.ndarray, segments_info: Sequence[Mapping[str, Any]]
    ) -> tuple[dict[int, Segment], list[dict[str, Any]]]:
        if pred_ids.ndim != 2 or pred_ids.min(initial=0) < 0 or pred_ids.max(initial=0) >= OFFSET:
            raise ValueError(f"image {image_id}: panoptic_seg must be (H, W) with ids in [0, 2^24), 0 = void")
        ids, areas = np.unique(pred_ids, return_counts=True)
        area_of = dict(zip(ids.tolist(), areas.tolist(), strict=True))
        listed = {int(s["id"]) for s in segments_info}
        missing = sorted(set(area_of) - listed - {VOID})
        if missing:
            raise ValueError(
                f"image {image_id}: panoptic_seg contains segment ids {missing} that segments_info does not list; "
                "every non-zero id needs a segments_info entry (or set those pixels to 0 = void)"
            )
        segments, info = {}, []
        for s in segments_info:
            segment_id = int(s["id"])
            if segment_id == VOID:
                raise ValueError(
                    f"image {image_id}: segments_info uses id 0, which is reserved for void; ids must be > 0"
                )
            if segment_id not in area_of:
                continue
            category_id = map_label(self.dataset_ids, s["label"], image_id)
            segments[segment_id] = Segment(category_id, area_of[segment_id])
            info.append({"id": segment_id, "category_id": category_id, "area": area_of[segment_id], "iscrowd": 0})
        return segments, info

    def _load_ground_truth(self, image_id: int) -> tuple[np.ndarray, dict[int, Segment]]:
        ann = self.ground_truth.annotation(image_id)
        gt_ids = self.ground_truth.ids(image_id)
        segments = {}
        for s in ann["segments_info"]:
            if s["category_id"] not in self.category_ids:
                raise ValueError(
                    f"{self.panoptic_json}: image {image_id} segment {s['id']} has category_id "
                    f"{s['category_id']}, which is not among the evaluator's categories"
                )
            segments[int(s["id"])] = Segment(s["category_id"], s["area"], bool(s.get("iscrowd", 0)))
        return gt_ids, segments

    def evaluate(self) -> dict[str, float]:
        """Gather every rank's statistics and segments (a collective), sum in image-id order, average."""
        gathered = gather_by_image_id({i: (self._stats[i], self._segments[i]) for i in self._stats})
        if len(gathered) < len(self.annotations) and is_main_process():
            logger.warning(
                "panoptic evaluation on %d of the %d images in %s: not comparable to full-split numbers",
                len(gathered),
                len(self.annotations),
                self.panoptic_json,
            )
        totals: dict[int, np.ndarray] = {}
        for image_stats, _ in gathered.values():
            for category_id, values in image_stats.items():
                totals[category_id] = totals.get(category_id, np.zeros(4)) + values
        self._gathered_segments = {i: segments for i, (_, segments) in gathered.items()}
        summary, per_class = pq_from_stats(totals, self.categories)
        self.summary = {g: {m: v if m == "N" else 100 * v for m, v in values.items()} for g, values in summary.items()}
        self.per_class = {name: {m: 100 * v for m, v in values.items()} for name, values in per_class.items()}
        self.metrics = {f"{m}{SUFFIX[g]}": self.summary[g][m] for g in GROUPS for m in ("PQ", "SQ", "RQ")}
        return dict(self.metrics)

    def table(self) -> str:
        """The panopticapi summary: PQ, SQ, RQ and N for All / Things / Stuff."""
        rows = [[g, *(self.summary[g][m] for m in ("PQ", "SQ", "RQ", "N"))] for g in GROUPS]
        return format_table(["", "PQ", "SQ", "RQ", "N"], rows, title=f"Panoptic quality ({self.panoptic_json.name})")

    def write(self, folder: str | os.PathLike) -> list[Path]:
        """Call on every rank after evaluate(): each rank writes the PNGs of its images to
        folder/panoptic_predictions/; rank 0 writes folder/panoptic_predictions.json (COCO panoptic format,
        the layout panopticapi's pq_compute reads by default) and folder/panoptic_metrics.json."""
        if self._gathered_segments is None:
            raise RuntimeError("call evaluate() before write()")
        folder = Path(folder)
        written = [
            atomic_write_bytes(folder / "panoptic_predictions" / self.annotations[i]["file_name"], png)
            for i, png in sorted(self._pngs.items())
        ]
        if is_main_process():
            annotations = [
                {"image_id": i, "file_name": self.annotations[i]["file_name"], "segments_info": segments}
                for i, segments in self._gathered_segments.items()
            ]
            gt_images = self.ground_truth.images
            images = [gt_images[i] for i in self._gathered_segments if i in gt_images]
            prediction_json = {"images": images, "categories": self.ground_truth.categories, "annotations": annotations}
            written.append(atomic_write_json(folder / "panoptic_predictions.json", prediction_json, indent=None))
            metrics = {"metrics": self.metrics, "summary": self.summary, "per_class": self.per_class}
            written.append(atomic_write_json(folder / "panoptic_metrics.json", metrics, indent=None))
        return written
