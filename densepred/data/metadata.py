"""Dataset metadata (categories in contiguous order, the id mappings) and the ground truth a split declares."""

from __future__ import annotations

import colorsys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import DataError

IGNORE_INDEX = 255


def default_color(index: int) -> tuple[int, int, int]:
    """A distinct, deterministic RGB color for category `index` (golden-ratio hue steps)."""
    hue = (index * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.65, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


@dataclass(frozen=True)
class DatasetMetadata:
    """What the model and the evaluators need to know about a dataset's classes.

    `categories` are dicts {"id": dataset id, "name", "color": (r, g, b), "isthing": bool} in contiguous
    order: contiguous class `k` is `categories[k]`. COCO's sparse ids (1..90, 1..200) map to [0, K).
    """

    categories: tuple[dict[str, Any], ...]
    ignore_index: int = IGNORE_INDEX
    dataset_id_to_contiguous: dict[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dataset_id_to_contiguous", {c["id"]: k for k, c in enumerate(self.categories)})

    @classmethod
    def from_categories(cls, categories: Any, source: str, *, default_isthing: bool = True) -> DatasetMetadata:
        """Validate COCO-style `categories` (read from `source`, named in errors) and order them by id."""
        if not isinstance(categories, Sequence) or isinstance(categories, str) or not categories:
            raise DataError(f"{source}: 'categories' must be a non-empty list of {{'id', 'name'}} objects")
        seen: set[int] = set()
        for position, cat in enumerate(categories):
            if (
                not isinstance(cat, Mapping)
                or not isinstance(cat.get("id"), int)
                or not isinstance(cat.get("name"), str)
            ):
                raise DataError(
                    f"{source}: categories[{position}] = {cat!r} must be an object with an integer 'id' and a "
                    "string 'name'"
                )
            if cat["id"] in seen:
                raise DataError(f"{source}: category id {cat['id']} appears twice in 'categories'; ids must be unique")
            seen.add(cat["id"])
        ordered = sorted(categories, key=lambda c: c["id"])
        cleaned = tuple(
            {
                "id": c["id"],
                "name": c["name"],
                "color": tuple(int(v) for v in c["color"]) if c.get("color") else default_color(k),
                "isthing": bool(c.get("isthing", default_isthing)),
            }
            for k, c in enumerate(ordered)
        )
        return cls(cleaned)

    @classmethod
    def from_class_names(cls, class_names: Sequence[str], source: str) -> DatasetMetadata:
        """Metadata for label-map datasets (class index per pixel): ids 0..K-1, all stuff."""
        if isinstance(class_names, str) or not class_names:
            raise DataError(f"{source}: 'class_names' must be a non-empty list of names, one per class index")
        return cls.from_categories(
            [{"id": k, "name": str(name)} for k, name in enumerate(class_names)], source, default_isthing=False
        )

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in self.categories]

    @property
    def thing_classes(self) -> list[int]:
        """Contiguous ids of the thing (countable) classes."""
        return [k for k, c in enumerate(self.categories) if c["isthing"]]

    @property
    def contiguous_to_dataset_id(self) -> list[int]:
        return [c["id"] for c in self.categories]

    def same_classes(self, other: DatasetMetadata) -> bool:
        """True if both have the same categories (id, name, isthing) in the same order."""
        key = lambda m: [(c["id"], c["name"], c["isthing"]) for c in m.categories]  # noqa: E731
        return key(self) == key(other)


@dataclass(frozen=True)
class GroundTruth:
    """What one split declares for its evaluation: its classes and the ground truth in the original files' terms.

    `ann_file`: the COCO instances JSON (AP); `panoptic_json` + `panoptic_root`: the COCO panoptic JSON and
    its PNG folder (PQ, and for panoptic data also the per-pixel classes of mIoU); `semantic`: for label-map
    data, image id -> (H, W) int64 contiguous classes at the original size, `ignore_index` elsewhere. None
    where the split has no such ground truth. Nothing is read until an evaluator is built from it.
    """

    metadata: DatasetMetadata
    ann_file: str | None = None
    panoptic_json: str | None = None
    panoptic_root: str | None = None
    semantic: Callable[[int], np.ndarray] | None = None
