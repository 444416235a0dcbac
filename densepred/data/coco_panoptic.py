"""COCO panoptic: `panoptic_*.json` + a folder of PNGs whose RGB colors encode segment ids.

Also the panoptic-derived semantic segmentation of Mask2Former's COCO recipe: every segment's pixels take
its category (things and stuff), void pixels are ignored.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .base import SegmentationDataset
from .coco_instance import filter_records
from .coco_json import index_images, load_json
from .errors import DataError
from .image_io import read_image, read_label_png
from .metadata import DatasetMetadata
from .records import SerializedList
from .reporting import Issue, IssueReport


def rgb2id(color: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) int32 segment ids, id = R + 256 G + 256^2 B (panopticapi's formula)."""
    color = color.astype(np.int32)
    return color[..., 0] + 256 * color[..., 1] + 256 * 256 * color[..., 2]


def index_panoptic(
    data: Mapping[str, Any], path: str, metadata: DatasetMetadata
) -> tuple[list[dict[str, Any]], list[Issue]]:
    """Per-image records with their segments as (segment id, contiguous label, iscrowd), and the issues."""
    images = index_images(data, path)
    segments: dict[int, list[tuple[int, int, bool]]] = {}
    png_names: dict[int, str] = {}
    void_ids: dict[int, list[int]] = defaultdict(list)
    issues: list[Issue] = []
    for position, ann in enumerate(data["annotations"]):
        if not isinstance(ann, Mapping) or not isinstance(ann.get("segments_info"), list):
            issues.append(("malformed annotation", f"{path}: annotations[{position}] needs 'image_id', 'file_name', 'segments_info'"))
            continue
        image_id = ann.get("image_id")
        if image_id not in images:
            issues.append(("annotation of unknown image", f"{path}: annotations[{position}] refers to image id {image_id}, not in 'images'"))
            continue
        png_names[image_id] = ann.get("file_name") or Path(images[image_id]["file_name"]).with_suffix(".png").name
        kept = []
        for info in ann["segments_info"]:
            label = metadata.dataset_id_to_contiguous.get(info.get("category_id"))
            if not isinstance(info.get("id"), int):
                issues.append(("malformed annotation", f"{path}: image id {image_id}: segment {info!r} has no integer 'id'"))
            elif label is None:
                issues.append(("unknown category", f"{path}: image id {image_id}, segment id {info['id']}: category id {info.get('category_id')} is not in 'categories' (its pixels become void)"))
                void_ids[image_id].append(info["id"])
            else:
                kept.append((info["id"], label, bool(info.get("iscrowd", 0))))
        segments[image_id] = kept
    records = []
    for image_id, image in images.items():
        records.append({
            "image_id": image_id,
            "file_name": image["file_name"],
            "png_name": png_names.get(image_id),
            "height": image["height"],
            "width": image["width"],
            "segments": segments.get(image_id, []),
            "void_ids": void_ids.get(image_id, []),
        })
    return records, issues


class CocoPanopticDataset(SegmentationDataset):
    """COCO panoptic JSON + PNG folder + image folder, for task panoptic, instance (things) or semantic.

    An image without an annotation entry has no segments (kept for evaluation, filtered from training by
    `filter_empty`). While decoding a PNG: an id absent from the JSON is void, a JSON segment absent from
    the PNG gets an empty mask (dropped); both are counted as issues.
    """

    def __init__(
        self,
        panoptic_json: str | Path,
        panoptic_root: str | Path,
        img_dir: str | Path,
        transform: Callable | None = None,
        task: str = "panoptic",
        filter_empty: bool = False,
        skip_bad_images: bool = False,
        ann_file: str | None = None,
    ) -> None:
        super().__init__(task, transform, skip_bad_images)
        self.img_dir, self.png_dir = Path(img_dir), Path(panoptic_root)
        data = load_json(panoptic_json)
        self.metadata = DatasetMetadata.from_categories(
            data["categories"], str(panoptic_json),
            ann_file=ann_file, panoptic_json=str(panoptic_json), panoptic_root=str(panoptic_root),
        )
        records, issues = index_panoptic(data, str(panoptic_json), self.metadata)
        del data
        isthing = [c["isthing"] for c in self.metadata.categories]
        for record in records:
            usable = [s for s in record["segments"] if not s[2] and (task != "instance" or isthing[s[1]])]
            record["num_segments"] = len(usable)
        records = filter_records(records, str(panoptic_json), filter_empty, "non-crowd segments")
        self.index_issues = IssueReport()
        self.index_issues.extend(issues)
        self.index_issues.log(f"{panoptic_json}: dropped at start-up")
        self.image_ids = [r["image_id"] for r in records]
        self._records = SerializedList(records)

    def _segment_map(self, record: dict[str, Any]) -> tuple[np.ndarray, list[Issue]]:
        """(H, W) int32 map, 0 = void and k + 1 = segment k of the record, and the decoding issues."""
        height, width = record["height"], record["width"]
        image_id = record["image_id"]
        if record["png_name"] is None:
            return np.zeros((height, width), dtype=np.int32), []
        png_path = self.png_dir / record["png_name"]
        ids = rgb2id(read_label_png(png_path, image_id, mode="rgb"))
        if ids.shape != (height, width):
            raise DataError(
                f"{png_path}: panoptic PNG of image id {image_id} is {ids.shape[0]}x{ids.shape[1]} but the image is "
                f"{height}x{width}; the PNG does not belong to this image"
            )
        issues: list[Issue] = []
        segment_ids = np.array([s[0] for s in record["segments"]], dtype=np.int64)
        if len(segment_ids) == 0:
            segment_map = np.zeros((height, width), dtype=np.int32)
        else:
            order = np.argsort(segment_ids)
            position = np.minimum(np.searchsorted(segment_ids[order], ids), len(order) - 1)
            matched = segment_ids[order][position] == ids
            segment_map = np.where(matched, order[position] + 1, 0).astype(np.int32)
        unknown = (segment_map == 0) & (ids != 0)
        if unknown.any():
            absent = np.setdiff1d(np.unique(ids[unknown]), record["void_ids"])
            if len(absent):
                issues.append(("PNG id not in JSON", f"{png_path}: image id {image_id}: segment id(s) {absent.tolist()[:5]} in the PNG are not in the JSON's segments_info (treated as void)"))
        areas = np.bincount(segment_map.ravel(), minlength=len(segment_ids) + 1)[1:]
        if (areas == 0).any():
            missing = segment_ids[areas == 0].tolist()
            issues.append(("JSON segment not in PNG", f"{png_path}: image id {image_id}: segment id(s) {missing[:5]} of the JSON have no pixels in the PNG (dropped)"))
        return segment_map, issues

    def load_raw(self, index: int, include_crowd: bool = True) -> dict[str, Any]:
        record = self._records[index]
        height, width = record["height"], record["width"]
        image = read_image(self.img_dir / record["file_name"], record["image_id"], (height, width))
        segment_map, issues = self._segment_map(record)
        return {
            "image": image,
            "image_id": record["image_id"],
            "orig_size": (height, width),
            "file_name": record["file_name"],
            "labels": np.array([s[1] for s in record["segments"]], dtype=np.int64),
            "iscrowd": np.array([s[2] for s in record["segments"]], dtype=bool),
            "segment_ids": [s[0] for s in record["segments"]],
            "segment_map": segment_map,
            "issues": issues,
        }

    def load_semantic_gt(self, image_id: int) -> np.ndarray:
        """Mask2Former's COCO panoptic sem-seg ground truth: every segment (crowd too) -> its class, void -> ignore."""
        record = self._records[self.index_of(image_id)]
        segment_map, _ = self._segment_map(record)
        lut = np.full(len(record["segments"]) + 1, self.metadata.ignore_index, dtype=np.int64)
        lut[1:] = [s[1] for s in record["segments"]]
        return lut[segment_map]
