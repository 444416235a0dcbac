"""COCO panoptic: `panoptic_*.json` + a folder of PNGs whose RGB colors encode segment ids.

Also the panoptic-derived semantic segmentation of Mask2Former's COCO recipe: every segment's pixels take
its category (things and stuff), void pixels are ignored; and `PanopticGroundTruth`, the evaluation's reading
of the same files (the JSON once, each PNG once for PQ and mIoU together).
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .base import SegmentationDataset
from .coco_instance import filter_records
from .coco_json import check_image_sizes, index_images, load_json
from .errors import DataError
from .image_io import read_image, read_panoptic_png
from .metadata import DatasetMetadata, GroundTruth
from .records import SerializedList
from .reporting import Issue, IssueReport

# How many decoded PNGs a PanopticGroundTruth keeps for its other readers (a bound; one batch is enough).
MAX_KEPT_PNGS = 64


def segment_index_map(ids: np.ndarray, segment_ids: np.ndarray) -> np.ndarray:
    """(H, W) int32: k + 1 where `ids` equals segment_ids[k], 0 elsewhere (void, or an id not listed)."""
    if len(segment_ids) == 0:
        return np.zeros(ids.shape, dtype=np.int32)
    order = np.argsort(segment_ids)
    position = np.minimum(np.searchsorted(segment_ids[order], ids), len(order) - 1)
    matched = segment_ids[order][position] == ids
    return np.where(matched, order[position] + 1, 0).astype(np.int32)


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
            issues.append(
                (
                    "malformed annotation",
                    f"{path}: annotations[{position}] needs 'image_id', 'file_name', 'segments_info'",
                )
            )
            continue
        image_id = ann.get("image_id")
        if image_id not in images:
            issues.append(
                (
                    "annotation of unknown image",
                    f"{path}: annotations[{position}] refers to image id {image_id}, not in 'images'",
                )
            )
            continue
        png_names[image_id] = ann.get("file_name") or Path(images[image_id]["file_name"]).with_suffix(".png").name
        kept = []
        for info in ann["segments_info"]:
            label = metadata.dataset_id_to_contiguous.get(info.get("category_id"))
            if not isinstance(info.get("id"), int):
                issues.append(
                    ("malformed annotation", f"{path}: image id {image_id}: segment {info!r} has no integer 'id'")
                )
            elif label is None:
                issues.append(
                    (
                        "unknown category",
                        f"{path}: image id {image_id}, segment id {info['id']}: category id {info.get('category_id')}"
                        f" is not in 'categories' (its pixels become void)",
                    )
                )
                void_ids[image_id].append(info["id"])
            else:
                kept.append((info["id"], label, bool(info.get("iscrowd", 0))))
        segments[image_id] = kept
    records = []
    for image_id, image in images.items():
        records.append(
            {
                "image_id": image_id,
                "file_name": image["file_name"],
                "png_name": png_names.get(image_id),
                "height": image["height"],
                "width": image["width"],
                "segments": segments.get(image_id, []),
                "void_ids": void_ids.get(image_id, []),
            }
        )
    return records, issues


class CocoPanopticDataset(SegmentationDataset):
    """COCO panoptic JSON + PNG folder + image folder, for task panoptic, instance (things) or semantic.

    An image without an annotation entry has no segments (kept for evaluation, filtered from training by
    `filter_empty`). While decoding a PNG: an id absent from the JSON is void, a JSON segment absent from
    the PNG gets an empty mask (dropped); both are counted as issues. With `check_sizes` each image file's
    header is compared with its JSON height/width at start-up (`coco_json.check_image_sizes`).
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
        check_sizes: bool = True,
    ) -> None:
        super().__init__(task, transform, skip_bad_images)
        self.img_dir, self.png_dir = Path(img_dir), Path(panoptic_root)
        data = load_json(panoptic_json)
        self.metadata = DatasetMetadata.from_categories(data["categories"], str(panoptic_json))
        self.ground_truth = GroundTruth(
            self.metadata, ann_file=ann_file, panoptic_json=str(panoptic_json), panoptic_root=str(panoptic_root)
        )
        records, issues = index_panoptic(data, str(panoptic_json), self.metadata)
        del data
        isthing = [c["isthing"] for c in self.metadata.categories]
        for record in records:
            usable = [s for s in record["segments"] if not s[2] and (task != "instance" or isthing[s[1]])]
            record["num_segments"] = len(usable)
        records = filter_records(records, str(panoptic_json), filter_empty, "non-crowd segments")
        if check_sizes:
            check_image_sizes(records, self.img_dir, panoptic_json)
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
        ids = read_panoptic_png(png_path, image_id)
        if ids.shape != (height, width):
            raise DataError(
                f"{png_path}: panoptic PNG of image id {image_id} is {ids.shape[0]}x{ids.shape[1]} but the image is "
                f"{height}x{width}; the PNG does not belong to this image"
            )
        issues: list[Issue] = []
        segment_ids = np.array([s[0] for s in record["segments"]], dtype=np.int64)
        segment_map = segment_index_map(ids, segment_ids)
        unknown = (segment_map == 0) & (ids != 0)
        if unknown.any():
            absent = np.setdiff1d(np.unique(ids[unknown]), record["void_ids"])
            if len(absent):
                issues.append(
                    (
                        "PNG id not in JSON",
                        f"{png_path}: image id {image_id}: segment id(s) {absent.tolist()[:5]}"
                        f" in the PNG are not in the JSON's segments_info (treated as void)",
                    )
                )
        areas = np.bincount(segment_map.ravel(), minlength=len(segment_ids) + 1)[1:]
        if (areas == 0).any():
            missing = segment_ids[areas == 0].tolist()
            issues.append(
                (
                    "JSON segment not in PNG",
                    f"{png_path}: image id {image_id}: segment id(s) {missing[:5]}"
                    f" of the JSON have no pixels in the PNG (dropped)",
                )
            )
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


class PanopticGroundTruth:
    """A COCO panoptic split's ground truth as evaluators read it: the JSON parsed once, each PNG decoded once.

    `ids(image_id)` gives the image's (H, W) int32 segment ids (0 = void) and `annotation(image_id)` its JSON
    entry (PQ); `semantic(image_id)` its per-pixel classes (mIoU, Mask2Former's COCO panoptic sem-seg: every
    listed segment, crowd included, -> its contiguous class; void, ids not in the JSON and segments of
    unknown categories -> ignore_index), computed from the same decoded PNG. With `readers` > 1 (the panoptic
    and the semantic evaluator of one run) a decoded PNG is kept until each of the readers has had it (at
    most MAX_KEPT_PNGS images), so every PNG is decoded once per evaluation whichever reader asks first.
    """

    def __init__(self, panoptic_json: str | Path, panoptic_root: str | Path, readers: int = 1) -> None:
        self.panoptic_json, self.panoptic_root = Path(panoptic_json), Path(panoptic_root)
        if not self.panoptic_json.is_file():
            raise FileNotFoundError(
                f"panoptic annotation file {self.panoptic_json} does not exist; check panoptic_json"
            )
        if not self.panoptic_root.is_dir():
            raise FileNotFoundError(f"panoptic PNG folder {self.panoptic_root} does not exist; check panoptic_root")
        data = load_json(self.panoptic_json)
        self.categories: list[dict[str, Any]] = data["categories"]
        self.metadata = DatasetMetadata.from_categories(self.categories, str(self.panoptic_json))
        self.images = index_images(data, self.panoptic_json)
        self.annotations: dict[int, dict[str, Any]] = {
            ann["image_id"]: ann
            for ann in data["annotations"]
            if isinstance(ann, Mapping) and isinstance(ann.get("segments_info"), list)
        }
        self.readers = readers
        self._kept: OrderedDict[int, list] = OrderedDict()  # image id -> [ids, readers still to come]

    def annotation(self, image_id: int) -> dict[str, Any]:
        """The image's entry of the JSON's `annotations` (file_name, segments_info)."""
        ann = self.annotations.get(image_id)
        if ann is None:
            raise DataError(
                f"image id {image_id} has no annotation in {self.panoptic_json}; evaluate on the split it describes"
            )
        return ann

    def ids(self, image_id: int) -> np.ndarray:
        """(H, W) int32 segment ids of the image's PNG, read-only (shared by the readers)."""
        kept = self._kept.get(image_id)
        if kept is not None:
            kept[1] -= 1
            if kept[1] == 0:
                del self._kept[image_id]
            return kept[0]
        path = self.panoptic_root / self.annotation(image_id)["file_name"]
        if not path.is_file():
            raise FileNotFoundError(
                f"ground-truth PNG {path} of image {image_id} (in {self.panoptic_json}) does not exist"
            )
        ids = read_panoptic_png(path, image_id)
        ids.flags.writeable = False
        if self.readers > 1:
            self._kept[image_id] = [ids, self.readers - 1]
            while len(self._kept) > MAX_KEPT_PNGS:
                self._kept.popitem(last=False)
        return ids

    def semantic(self, image_id: int) -> np.ndarray:
        """(H, W) int64 contiguous class per pixel at the original size, ignore_index elsewhere."""
        ignore_index = self.metadata.ignore_index
        if image_id not in self.annotations:  # an image without segments: all void
            if image_id not in self.images:
                raise DataError(
                    f"image id {image_id} is not in {self.panoptic_json}; evaluate on the split it describes"
                )
            image = self.images[image_id]
            return np.full((image["height"], image["width"]), ignore_index, dtype=np.int64)
        lookup = self.metadata.dataset_id_to_contiguous
        segments = [
            (s["id"], lookup[s.get("category_id")])
            for s in self.annotations[image_id]["segments_info"]
            if isinstance(s.get("id"), int) and s.get("category_id") in lookup
        ]
        index = segment_index_map(self.ids(image_id), np.array([s[0] for s in segments], dtype=np.int64))
        lut = np.full(len(segments) + 1, ignore_index, dtype=np.int64)
        lut[1:] = [s[1] for s in segments]
        return lut[index]

    def clear(self) -> None:
        """Forget the decoded PNGs kept for other readers (at the start of an evaluation)."""
        self._kept.clear()
