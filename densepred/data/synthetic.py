"""A small synthetic dataset written in the real COCO formats, the default data of the project.

Scenes are textured stuff regions (sky above a wavy horizon; ground and/or water below) with a few solid
shapes as things (circle, square, triangle, diamond: each its own color), sometimes a crowd of small
circles. Written like COCO: JPEG images, `instances_*.json` (polygons for unoccluded shapes, compressed and
uncompressed RLE for the others, crowd as RLE), `panoptic_*.json` + RGB-encoded PNGs, sparse category ids.
Generation is deterministic from the seed (each image from (seed, image id)); `ensure_synthetic` writes it
once into a cache folder and reuses it. Files are written plainly: `ensure_synthetic` makes the whole folder
appear at once (written in a temporary folder, renamed when complete), which no per-file writer could give.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock
from PIL import Image
from pycocotools import mask as mask_utils

from .errors import DataError
from .image_io import id2rgb

GENERATOR_VERSION = 1
THINGS = [  # dataset id, name, color
    (1, "circle", (220, 40, 40)),
    (2, "square", (40, 190, 60)),
    (4, "triangle", (245, 215, 40)),
    (7, "diamond", (190, 60, 210)),
]
STUFF = [(110, "sky", (110, 170, 235)), (125, "ground", (125, 90, 55)), (148, "water", (30, 110, 150))]
SPLITS = ("train", "val")
MIN_VISIBLE_AREA = 16


def _shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[float]:
    """Flat [x0, y0, ...] polygon of a shape centred at (cx, cy) with radius r, rotated by angle."""
    if shape == "circle":
        t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        xy = np.stack([np.cos(t), np.sin(t)], 1) * r
    else:
        base = {
            "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
            "triangle": [(0.0, -1.1), (0.95, 0.55), (-0.95, 0.55)],
            "diamond": [(0.0, -1.2), (0.65, 0.0), (0.0, 1.2), (-0.65, 0.0)],
        }[shape]
        c, s = np.cos(angle), np.sin(angle)
        xy = np.asarray(base) @ np.array([[c, s], [-s, c]]) * r
    xy = xy + (cx, cy)
    return np.round(xy, 2).ravel().tolist()


def _rasterize(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """(H, W) bool from polygons, rasterized by pycocotools (the same raster the readers decode)."""
    rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    return mask_utils.decode(rle).astype(bool)


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE (column-major run lengths, starting with a run of zeros)."""
    flat = mask.ravel(order="F").astype(np.int8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": counts}


def _compressed_rle(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(mask.shape), "counts": rle["counts"].decode("ascii")}


def _bbox(mask: np.ndarray) -> list[float]:
    """COCO [x, y, w, h] of a mask."""
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]


def _stuff_layout(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) stuff index (0 sky, 1 ground, 2 water) and the textured background image (H, W, 3) float."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    horizon = height * rng.uniform(0.3, 0.6) + rng.uniform(2, 8) * np.sin(
        2 * np.pi * xx / rng.uniform(40, 120) + rng.uniform(0, 6.3)
    )
    layout = rng.choice(3, p=[0.25, 0.25, 0.5])  # ground only, water only, split
    if layout == 2:
        boundary = width * rng.uniform(0.3, 0.7) + rng.uniform(-0.5, 0.5) * (yy - height)
        water = (xx < boundary) if rng.random() < 0.5 else (xx >= boundary)
    else:
        water = np.full((height, width), layout == 1)
    stuff = np.where(yy < horizon, 0, np.where(water, 2, 1))
    noise = rng.normal(0, 1, (height, width)).astype(np.float32)
    t = (yy / height)[..., None]
    sky = (1 - t) * np.array([80, 140, 225]) + t * np.array([175, 210, 245]) + 3 * noise[..., None]
    ground = np.array([125, 90, 55]) + 22 * noise[..., None] + 12 * (np.sin(xx / 5) * np.sin(yy / 4))[..., None]
    water_tex = np.array([30, 110, 150]) + (25 * np.sin(yy * 1.3 + 2 * np.sin(xx / 9)) + 5 * noise)[..., None]
    image = np.where((stuff == 0)[..., None], sky, np.where((stuff == 1)[..., None], ground, water_tex))
    return stuff, image


def make_scene(
    seed: int, image_id: int, min_size: int, max_size: int, min_things: int, max_things: int, crowd_prob: float
) -> dict[str, Any]:
    """One scene: the RGB image, its panoptic id map and segments (with the instance annotation of each thing)."""
    rng = np.random.default_rng([seed, image_id])
    height, width = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
    stuff, image = _stuff_layout(rng, height, width)
    side = min(height, width)
    objects = []  # (class index, polygons, full mask, iscrowd), bottom to top
    if rng.random() < crowd_prob:
        cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
        polygons = [
            _shape_polygon("circle", cx + dx, cy + dy, 0.035 * side, 0)
            for dx, dy in rng.uniform(-0.12, 0.12, size=(6, 2)) * side
        ]
        objects.append((0, polygons, _rasterize(polygons, height, width), True))
    for _ in range(int(rng.integers(min_things, max_things + 1))):
        k = int(rng.integers(len(THINGS)))
        r = rng.uniform(0.09, 0.2) * side
        inside = rng.random() < 0.6
        margin = 1.25 * r if inside else 0.0
        cx, cy = rng.uniform(margin, width - margin), rng.uniform(margin, height - margin)
        polygon = _shape_polygon(THINGS[k][1], cx, cy, r, rng.uniform(0, np.pi))
        objects.append((k, [polygon], _rasterize([polygon], height, width), False))
    # Visible parts (later objects on top); objects left almost hidden are not drawn at all.
    while True:
        covered = np.zeros((height, width), dtype=bool)
        visible = []
        for _, _, full, _ in reversed(objects):
            visible.append(full & ~covered)
            covered |= full
        visible.reverse()
        small = [i for i, v in enumerate(visible) if v.sum() < MIN_VISIBLE_AREA]
        if not small:
            break
        objects = [o for i, o in enumerate(objects) if i not in small]
    for k, _, full, _ in objects:
        color = np.array(THINGS[k][2]) + rng.normal(0, 8, (height, width, 1))
        image = np.where(full[..., None], color, image)
    segments = []  # (category id, mask, iscrowd, instance segmentation or None)
    for s, (cat_id, _, _) in enumerate(STUFF):
        mask = (stuff == s) & ~covered
        if mask.sum() > 0:
            segments.append((cat_id, mask, False, None))
    for (k, polygons, full, iscrowd), vis in zip(objects, visible, strict=True):
        polygon_ok = (
            not iscrowd
            and np.array_equal(full, vis)
            and all(
                0 <= x <= width and 0 <= y <= height for p in polygons for x, y in zip(p[0::2], p[1::2], strict=True)
            )
        )
        segments.append((THINGS[k][0], vis, iscrowd, polygons if polygon_ok else None))
    ids = rng.choice(np.arange(1, 1 << 16), size=len(segments), replace=False)
    id_map = np.zeros((height, width), dtype=np.int64)
    for segment_id, (_, mask, _, _) in zip(ids, segments, strict=True):
        id_map[mask] = segment_id
    return {
        "image": np.clip(image, 0, 255).astype(np.uint8),
        "id_map": id_map,
        "segments": [(int(i),) + seg for i, seg in zip(ids, segments, strict=True)],
        "height": height,
        "width": width,
    }


def categories(panoptic: bool) -> list[dict[str, Any]]:
    things = [{"id": i, "name": n, "supercategory": "shape", "isthing": 1, "color": list(c)} for i, n, c in THINGS]
    stuff = [{"id": i, "name": n, "supercategory": "background", "isthing": 0, "color": list(c)} for i, n, c in STUFF]
    return (
        things + stuff if panoptic else [{k: v for k, v in c.items() if k not in ("isthing", "color")} for c in things]
    )


def generate_synthetic(
    out_dir: str | Path,
    num_train: int = 300,
    num_val: int = 50,
    min_size: int = 128,
    max_size: int = 192,
    max_things: int = 4,
    crowd_prob: float = 0.1,
    seed: int = 0,
    min_things: int = 1,
) -> Path:
    """Write the dataset in COCO's layout: {train,val}2017/, annotations/{instances,panoptic}_{split}2017.json
    and annotations/panoptic_{split}2017/ PNGs."""
    out_dir = Path(out_dir)
    ann_dir = out_dir / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    next_image_id, next_ann_id = 1, 1
    for split, count in zip(SPLITS, (num_train, num_val), strict=True):
        img_dir, png_dir = out_dir / f"{split}2017", ann_dir / f"panoptic_{split}2017"
        img_dir.mkdir(exist_ok=True)
        png_dir.mkdir(exist_ok=True)
        images, instances, panoptic = [], [], []
        for image_id in range(next_image_id, next_image_id + count):
            scene = make_scene(seed, image_id, min_size, max_size, min_things, max_things, crowd_prob)
            h, w = scene["height"], scene["width"]
            name = f"{image_id:012d}"
            Image.fromarray(scene["image"]).save(img_dir / f"{name}.jpg", quality=92)
            Image.fromarray(id2rgb(scene["id_map"])).save(png_dir / f"{name}.png")
            images.append({"id": image_id, "file_name": f"{name}.jpg", "height": h, "width": w})
            segments_info = []
            for segment_id, cat_id, mask, iscrowd, polygons in scene["segments"]:
                area, bbox = int(mask.sum()), _bbox(mask)
                segments_info.append(
                    {"id": segment_id, "category_id": cat_id, "iscrowd": int(iscrowd), "bbox": bbox, "area": area}
                )
                if cat_id not in {t[0] for t in THINGS}:
                    continue
                if polygons is not None:
                    segmentation = polygons
                elif iscrowd or next_ann_id % 2 == 0:
                    segmentation = _uncompressed_rle(mask)
                else:
                    segmentation = _compressed_rle(mask)
                instances.append(
                    {
                        "id": next_ann_id,
                        "image_id": image_id,
                        "category_id": cat_id,
                        "segmentation": segmentation,
                        "area": area,
                        "bbox": bbox,
                        "iscrowd": int(iscrowd),
                    }
                )
                next_ann_id += 1
            panoptic.append({"image_id": image_id, "file_name": f"{name}.png", "segments_info": segments_info})
        next_image_id += count
        info = {"description": "densepred synthetic shapes", "version": GENERATOR_VERSION}
        (ann_dir / f"instances_{split}2017.json").write_text(
            json.dumps({"info": info, "images": images, "annotations": instances, "categories": categories(False)})
        )
        (ann_dir / f"panoptic_{split}2017.json").write_text(
            json.dumps({"info": info, "images": images, "annotations": panoptic, "categories": categories(True)})
        )
    return out_dir


def ensure_synthetic(cache_dir: str | Path, **params: Any) -> Path:
    """The synthetic dataset for `params` under `cache_dir`, generated on first use.

    Written into a temporary folder next to the final one and renamed when complete, under a file lock,
    so concurrent processes (DDP ranks, parallel runs) generate it once and never read a partial dataset.
    A `cache_dir` that cannot hold it (a file, not writable, a file in the way) is a DataError naming the
    folder, `data.root` / `DENSEPRED_CACHE` and the fix. A generated dataset is only read (a read-only cache works).
    """
    cache_dir = Path(cache_dir).expanduser()
    key = hashlib.sha1(json.dumps({"version": GENERATOR_VERSION, **params}, sort_keys=True).encode()).hexdigest()[:10]
    final = cache_dir / f"synthetic-{key}"
    done = final / "manifest.json"
    if done.is_file():
        return final
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        if final.exists() and not final.is_dir():
            raise FileExistsError(errno.EEXIST, "a file is in the way of the dataset folder", str(final))
        with FileLock(str(cache_dir / f".synthetic-{key}.lock")):
            if done.is_file():
                return final
            tmp = Path(tempfile.mkdtemp(prefix=f".synthetic-{key}-", dir=cache_dir))
            try:
                generate_synthetic(tmp, **params)
                (tmp / "manifest.json").write_text(json.dumps({"version": GENERATOR_VERSION, "params": params}))
                if final.exists():  # a folder left by an interrupted older layout: replace it
                    shutil.rmtree(final)
                os.replace(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except OSError as error:  # not a folder, not writable, a file in the way, disk full
        raise DataError(
            f"synthetic data: cannot generate the dataset in the cache folder {cache_dir} ({type(error).__name__}: "
            f"{error}). Point data.root at a writable folder (the synthetic config's default is the DENSEPRED_CACHE "
            "environment variable, else ~/.cache/densepred): e.g. `DENSEPRED_CACHE=/tmp/densepred python train.py` "
            "or `python train.py data.root=/tmp/densepred`, or remove the file in the way"
        ) from error
    return final
