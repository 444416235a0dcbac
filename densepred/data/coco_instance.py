"""COCO instances: `instances_*.json` (polygons, RLE, crowd; or boxes only for detection) plus an image folder."""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from .base import SegmentationDataset
from .coco_json import check_image_sizes, index_images, load_json
from .errors import DataError
from .image_io import read_image
from .metadata import DatasetMetadata, GroundTruth
from .records import SerializedList
from .reporting import Issue, IssueReport

logger = logging.getLogger(__name__)
MISSING_SEGMENTATION = "missing segmentation"


def _polygon_area(polygon: list[float]) -> float:
    """Shoelace area of a flat [x0, y0, x1, y1, ...] polygon."""
    xy = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def check_segmentation(segm: Any, height: int, width: int) -> tuple[Any, tuple[str, str] | None]:
    """Validate one annotation's `segmentation`; returns (cleaned segmentation, (reason, detail) or None).

    Polygons with fewer than 3 points or zero area are dropped (the annotation is kept if any polygon is
    left); RLE must have `counts` and a `size` equal to the image's [height, width]. No segmentation at all
    (absent, null or [], a box-only annotation) is reason "missing segmentation".
    """
    if segm is None or (isinstance(segm, list) and not segm):
        return None, (MISSING_SEGMENTATION, "has no 'segmentation' (a box-only annotation); masks are needed")
    if isinstance(segm, list):
        if not all(isinstance(p, list) and all(isinstance(v, (int, float)) for v in p) for p in segm):
            return None, ("malformed segmentation", "segmentation is a list but not of [x0, y0, x1, y1, ...] polygons")
        valid = [p for p in segm if len(p) >= 6 and len(p) % 2 == 0 and _polygon_area(p) > 0]
        if not valid:
            return None, ("degenerate polygon", "every polygon has fewer than 3 points or zero area")
        return valid, None
    if isinstance(segm, Mapping):
        size, counts = segm.get("size"), segm.get("counts")
        if not isinstance(counts, (list, str, bytes)) or not isinstance(size, list) or len(size) != 2:
            return None, ("malformed segmentation", "RLE needs 'counts' (list or string) and 'size' [height, width]")
        if list(size) != [height, width]:
            return None, ("RLE size mismatch", f"RLE size {size} differs from the image's [{height}, {width}]")
        return dict(segm), None
    return None, ("malformed segmentation", "unsupported 'segmentation' (need polygons or RLE)")


def check_box(bbox: Any, height: int, width: int) -> tuple[list[float] | None, tuple[str, str] | None]:
    """Validate one annotation's COCO `bbox` [x, y, w, h]; returns (XYXY box clipped to the image, problem or None).

    Problems (the annotation is dropped): not a list of 4 numbers ("malformed box"), NaN or infinite values
    ("non-finite box"), a negative width or height ("negative box size"), zero width or height ("empty box"),
    no overlap with the image ("box outside the image"). A box reaching past the image border is clipped to it,
    as DETR's data pipeline does.
    """
    if bbox is None:
        return None, ("missing box", "has no 'bbox'; detection needs [x, y, width, height] in pixels")
    if (
        not isinstance(bbox, (list, tuple))
        or len(bbox) != 4
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
    ):
        return None, ("malformed box", f"bbox {bbox!r} is not a list of 4 numbers [x, y, width, height]")
    if not all(math.isfinite(v) for v in bbox):
        return None, ("non-finite box", f"bbox {bbox} holds NaN or infinite values")
    x, y, w, h = (float(v) for v in bbox)
    if w < 0 or h < 0:
        return None, ("negative box size", f"bbox {bbox} has a negative width or height")
    if w == 0 or h == 0:
        return None, ("empty box", f"bbox {bbox} has zero width or height")
    x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))
    if x1 <= x0 or y1 <= y0:
        return None, ("box outside the image", f"bbox {bbox} does not overlap the {width} x {height} image")
    return [x0, y0, x1, y1], None


def decode_segmentations(segms: list[Any], height: int, width: int) -> np.ndarray:
    """Polygons / uncompressed RLE / compressed RLE -> (N, H, W) uint8 masks, via pycocotools."""
    if not segms:
        return np.zeros((0, height, width), dtype=np.uint8)
    rles = []
    for segm in segms:
        if isinstance(segm, list):
            rles.append(mask_utils.merge(mask_utils.frPyObjects(segm, height, width)))
        elif isinstance(segm["counts"], list):
            rles.append(mask_utils.frPyObjects(segm, height, width))
        else:
            rles.append(segm)
    return np.ascontiguousarray(mask_utils.decode(rles).transpose(2, 0, 1))


def index_instances(
    data: Mapping[str, Any], path: str, metadata: DatasetMetadata, boxes: bool = False
) -> tuple[list[dict[str, Any]], list[Issue]]:
    """Per-image records (annotations grouped, checked and mapped to contiguous ids) and the issues found.

    Each annotation becomes (id, label, iscrowd, segmentation), or with `boxes` (detection: the segmentation
    is ignored) (id, label, iscrowd, XYXY box clipped to the image).
    """
    images = index_images(data, path)
    annotations: dict[int, list[tuple]] = defaultdict(list)
    issues: list[Issue] = []
    for position, ann in enumerate(data["annotations"]):
        if not isinstance(ann, Mapping):
            issues.append(("malformed annotation", f"{path}: annotations[{position}] is not an object"))
            continue
        ann_id = ann.get("id", f"#{position}")
        image = images.get(ann.get("image_id"))
        where = f"{path}: annotation id {ann_id}"
        if image is None:
            issues.append(
                ("annotation of unknown image", f"{where} refers to image id {ann.get('image_id')}, not in 'images'")
            )
            continue
        where += f" (image id {image['id']})"
        label = metadata.dataset_id_to_contiguous.get(ann.get("category_id"))
        if label is None:
            issues.append(("unknown category", f"{where}: category id {ann.get('category_id')} is not in 'categories'"))
            continue
        bbox = ann.get("bbox")
        if boxes:
            segm, problem = check_box(bbox, image["height"], image["width"])
        elif isinstance(bbox, list) and len(bbox) == 4 and (bbox[2] < 0 or bbox[3] < 0):
            issues.append(("negative box size", f"{where}: bbox {bbox} has a negative width or height"))
            continue
        else:
            segm, problem = check_segmentation(ann.get("segmentation"), image["height"], image["width"])
        if problem is not None:
            issues.append((problem[0], f"{where}: {problem[1]}"))
            continue
        annotations[image["id"]].append((ann_id, label, bool(ann.get("iscrowd", 0)), segm))
    records = [
        {
            "image_id": image_id,
            "file_name": image["file_name"],
            "height": image["height"],
            "width": image["width"],
            "annotations": annotations.get(image_id, []),
        }
        for image_id, image in images.items()
    ]
    return records, issues


def filter_records(records: list[dict[str, Any]], path: str, filter_empty: bool, what: str) -> list[dict[str, Any]]:
    """Drop images without (non-crowd) segments if `filter_empty`; an empty result is a DataError."""
    kept = [r for r in records if not filter_empty or r["num_segments"] > 0]
    if not kept:
        detail = f"all {len(records)} images have no usable {what}" if records else "it lists no images"
        hint = "set filter_empty=false or fix the annotations" if records else "check the file"
        raise DataError(f"{path}: the dataset is empty after filtering ({detail}); {hint}")
    return kept


class CocoInstanceDataset(SegmentationDataset):
    """COCO-format instances JSON + image folder; also the reader for custom COCO-format data.

    Task "instance" (masks) or "detection" (boxes: each annotation's `bbox`, its segmentation ignored).
    Annotations are checked and indexed once (serialized, see records.py); masks are decoded per item.
    Problem annotations (unknown category, polygon with < 3 points or zero area, negative box size, RLE of
    the wrong size, unknown image id; for detection a malformed, non-finite, negative, empty or outside box)
    are dropped, counted and reported once when the dataset is built.
    With `check_sizes` each image file's header is compared with its JSON height/width at start-up
    (`coco_json.check_image_sizes`, ~0.1 ms per image).
    """

    def __init__(
        self,
        ann_file: str | Path,
        img_dir: str | Path,
        transform: Callable | None = None,
        task: str = "instance",
        filter_empty: bool = False,
        skip_bad_images: bool = False,
        panoptic_json: str | None = None,
        panoptic_root: str | None = None,
        check_sizes: bool = True,
    ) -> None:
        super().__init__(task, transform, skip_bad_images)
        if task not in ("instance", "detection"):
            raise DataError(
                f"{ann_file}: an instances JSON gives task=instance or detection only; task={task} needs panoptic_json/"
                "panoptic_root (panoptic, semantic) or sem_seg_dir (semantic)"
            )
        self.img_dir = Path(img_dir)
        data = load_json(ann_file)
        self.metadata = DatasetMetadata.from_categories(data["categories"], str(ann_file))
        self.ground_truth = GroundTruth(
            self.metadata, ann_file=str(ann_file), panoptic_json=panoptic_json, panoptic_root=panoptic_root
        )
        records, issues = index_instances(data, str(ann_file), self.metadata, boxes=task == "detection")
        num_annotations = len(data["annotations"])
        del data
        for record in records:
            record["num_segments"] = sum(1 for a in record["annotations"] if not a[2])
        missing = sum(1 for reason, _ in issues if reason == MISSING_SEGMENTATION)
        if missing and not any(record["num_segments"] for record in records):
            raise DataError(
                f"{ann_file}: {missing} of {num_annotations} annotations have no 'segmentation' (box-only "
                "annotations, e.g. a detection file) and no image has a usable mask; segmentation tasks need masks: "
                "polygons or RLE in each annotation's 'segmentation' (COCO's instances_*.json has them); to train a "
                "box detector on this file set data.task=detection"
            )
        what = "non-crowd boxes" if task == "detection" else "non-crowd annotations"
        records = filter_records(records, str(ann_file), filter_empty, what)
        if check_sizes:
            check_image_sizes(records, self.img_dir, ann_file)
        self.index_issues = IssueReport()
        self.index_issues.extend(issues)
        self.index_issues.log(f"{ann_file}: dropped at start-up")
        self.image_ids = [r["image_id"] for r in records]
        self._records = SerializedList(records)

    def load_raw(self, index: int, include_crowd: bool = True) -> dict[str, Any]:
        record = self._records[index]
        height, width = record["height"], record["width"]
        image = read_image(self.img_dir / record["file_name"], record["image_id"], (height, width))
        anns = [a for a in record["annotations"] if include_crowd or not a[2]]
        raw = {
            "image": image,
            "image_id": record["image_id"],
            "orig_size": (height, width),
            "file_name": record["file_name"],
            "labels": np.array([a[1] for a in anns], dtype=np.int64),
            "iscrowd": np.array([a[2] for a in anns], dtype=bool),
            "annotation_ids": [a[0] for a in anns],
            "issues": [],
        }
        if self.task == "detection":
            raw["boxes"] = np.array([a[3] for a in anns], dtype=np.float32).reshape(-1, 4)
            return raw
        try:
            masks = decode_segmentations([a[3] for a in anns], height, width)
        except (ValueError, TypeError, OverflowError) as e:
            raise DataError(
                f"image id {record['image_id']}: a segmentation cannot be decoded by pycocotools ({e})"
            ) from None
        raw["masks"] = masks
        return raw
