"""From a split's settings (paths relative to the data root) to a dataset or its metadata."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .base import TASKS, SegmentationDataset
from .coco_instance import CocoInstanceDataset
from .coco_json import read_categories
from .coco_panoptic import CocoPanopticDataset
from .errors import DataError
from .metadata import DatasetMetadata
from .semantic import SemanticFolderDataset

PATH_KEYS = ("img_dir", "ann_file", "panoptic_json", "panoptic_root", "sem_seg_dir")
OPTION_KEYS = ("filter_empty", "skip_bad_images", "ignore_value", "reduce_zero_label", "check_image_sizes")


def resolve_split(split: str, settings: Mapping[str, Any] | None, root: Path) -> dict[str, Any]:
    """Check the keys of `data.<split>` and make its paths absolute (relative ones are under `root`)."""
    if not settings:
        raise DataError(f"data.{split} is not set; give at least data.{split}.img_dir and its annotation path(s)")
    unknown = sorted(set(settings) - set(PATH_KEYS) - set(OPTION_KEYS))
    if unknown:
        raise DataError(f"data.{split} has unknown key(s) {unknown}; known keys: {list(PATH_KEYS + OPTION_KEYS)}")
    resolved = dict(settings)
    for key in PATH_KEYS:
        if resolved.get(key) is not None:
            resolved[key] = str(root / Path(str(resolved[key])).expanduser())
    return resolved


def _source(task: str, split: str, settings: Mapping[str, Any]) -> str:
    """Which reader serves `task` for these settings: "semantic_folder", "instance" (instance, detection) or
    "panoptic"."""
    if task not in TASKS:
        raise DataError(f"data.task={task!r} is not one of {list(TASKS)}")
    if settings.get("sem_seg_dir"):
        needed, source = ("img_dir",), "semantic_folder"
    elif task in ("instance", "detection"):
        needed, source = ("img_dir", "ann_file"), "instance"
    else:
        needed, source = ("img_dir", "panoptic_json", "panoptic_root"), "panoptic"
    missing = [f"data.{split}.{key}" for key in needed if not settings.get(key)]
    if missing:
        raise DataError(
            f"task={task} needs {', '.join(missing)} (instance, detection: img_dir + ann_file; panoptic/semantic: "
            "img_dir + panoptic_json + panoptic_root; semantic from label maps: img_dir + sem_seg_dir)"
        )
    return source


def read_metadata(
    task: str, split: str, settings: Mapping[str, Any], class_names: Sequence[str] | None
) -> DatasetMetadata:
    """The split's metadata from its categories only (no annotation index is built)."""
    source = _source(task, split, settings)
    if source == "semantic_folder":
        if not class_names:
            raise DataError("a label-map dataset (sem_seg_dir) needs data.class_names, one name per class index")
        return DatasetMetadata.from_class_names(class_names, f"data.{split}.sem_seg_dir")
    path = settings["ann_file"] if source == "instance" else settings["panoptic_json"]
    return DatasetMetadata.from_categories(read_categories(path), path)


def build_dataset(
    task: str,
    split: str,
    settings: Mapping[str, Any],
    transform: Callable | None,
    train: bool,
    class_names: Sequence[str] | None = None,
) -> SegmentationDataset:
    """The dataset for a resolved split. Training splits filter images without segments and skip bad
    image files by default; evaluation splits keep every image and raise on a bad file."""
    source = _source(task, split, settings)
    skip = settings.get("skip_bad_images", train)
    if source == "semantic_folder":
        if not class_names:
            raise DataError("a label-map dataset (sem_seg_dir) needs data.class_names, one name per class index")
        return SemanticFolderDataset(
            settings["img_dir"],
            settings["sem_seg_dir"],
            class_names,
            transform,
            task,
            ignore_value=settings.get("ignore_value", 255),
            reduce_zero_label=settings.get("reduce_zero_label", False),
            skip_bad_images=skip,
        )
    filter_empty = settings.get("filter_empty", train)
    if source == "instance":
        return CocoInstanceDataset(
            settings["ann_file"],
            settings["img_dir"],
            transform,
            task,
            filter_empty,
            skip,
            panoptic_json=settings.get("panoptic_json"),
            panoptic_root=settings.get("panoptic_root"),
            check_sizes=settings.get("check_image_sizes", True),
        )
    return CocoPanopticDataset(
        settings["panoptic_json"],
        settings["panoptic_root"],
        settings["img_dir"],
        transform,
        task,
        filter_empty,
        skip,
        ann_file=settings.get("ann_file"),
        check_sizes=settings.get("check_image_sizes", True),
    )
