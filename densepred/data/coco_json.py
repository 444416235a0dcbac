"""Reading COCO-format JSON files (instances and panoptic) with clear errors for malformed files."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import DataError
from .image_io import image_size_mismatch


def load_json(path: str | Path, required: tuple[str, ...] = ("images", "annotations", "categories")) -> dict[str, Any]:
    """Parse a COCO-format JSON file; a missing file, bad JSON or a missing top-level key is a DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found; check the ann_file / panoptic_json setting")
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}; the file is truncated or "
            "not JSON (re-download or re-export it)"
        ) from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a UTF-8 JSON file ({e.reason} at byte {e.start})") from None
    if not isinstance(data, Mapping):
        raise DataError(f"{path}: the top level must be a JSON object with keys {list(required)}")
    missing = [key for key in required if not isinstance(data.get(key), list)]
    if missing:
        raise DataError(f"{path}: missing or non-list top-level key(s) {missing}; a COCO file needs {list(required)}")
    return data


def index_images(data: Mapping[str, Any], path: str | Path) -> dict[int, dict[str, Any]]:
    """`images` by id, each checked for an integer id, a file_name and positive height/width."""
    images: dict[int, dict[str, Any]] = {}
    for position, image in enumerate(data["images"]):
        if not isinstance(image, Mapping) or not isinstance(image.get("id"), int):
            raise DataError(f"{path}: images[{position}] has no integer 'id'")
        image_id = image["id"]
        if not isinstance(image.get("file_name"), str):
            raise DataError(f"{path}: image id {image_id} has no string 'file_name'")
        height, width = image.get("height"), image.get("width")
        if not (isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0):
            raise DataError(
                f"{path}: image id {image_id} needs positive integer 'height' and 'width', got {height}, {width}"
            )
        if image_id in images:
            raise DataError(f"{path}: image id {image_id} appears twice in 'images'; ids must be unique")
        images[image_id] = image
    return images


def check_image_sizes(records: Sequence[Mapping[str, Any]], img_dir: str | Path, path: str | Path) -> None:
    """Compare each record's JSON height/width with its image file's header (`image_size_mismatch`), so that a
    wrong size is an error when the dataset is built, not when the image is first loaded mid-training. Cost:
    one header read per image, ~0.1 ms on a local disk (COCO train2017, 118k images: ~10 s; val2017: ~0.5 s);
    on slow network storage set the split's `check_image_sizes=false` (the load-time check stays)."""
    img_dir = Path(img_dir)
    wrong = []
    for record in records:
        expected = (record["height"], record["width"])
        size = image_size_mismatch(img_dir / record["file_name"], expected)
        if size is not None:
            wrong.append(
                f"{img_dir / record['file_name']}: image id {record['image_id']} is {size[0]}x{size[1]} (HxW, after "
                f"EXIF orientation) but the annotation file says {expected[0]}x{expected[1]}"
            )
    if wrong:
        shown = "; ".join(wrong[:5]) + (f"; ... ({len(wrong) - 5} more)" if len(wrong) > 5 else "")
        raise DataError(
            f"{path}: {len(wrong)} image(s) differ in size from their 'height'/'width' entry, so the annotations do "
            f"not fit them: {shown}. Fix the entries' height/width or replace the files"
        )


def read_categories(path: str | Path) -> list[dict[str, Any]]:
    """Only the `categories` list of a COCO JSON, without building the annotation index.

    COCO files put `categories` last, so the value after the last `"categories":` key is decoded directly
    (a 450 MB instances file takes well under a second); if that fails the whole file is parsed.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found; check the ann_file / panoptic_json setting")
    text = path.read_bytes().decode("utf-8", errors="replace")
    position = text.rfind('"categories"')
    if position >= 0:
        start = text.find("[", position)
        try:
            if start < 0 or text[position + len('"categories"') : start].strip() != ":":
                raise ValueError("not a top-level categories list")
            categories, _ = json.JSONDecoder().raw_decode(text, start)
            if isinstance(categories, list) and all(isinstance(c, Mapping) and "id" in c for c in categories):
                return categories
        except (json.JSONDecodeError, ValueError):
            pass
    return load_json(path, required=("categories",))["categories"]
