"""Decoding image and label files into numpy arrays, with clear errors for missing or corrupt files."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import BadImageError, DataError

# Errors PIL raises for truncated, corrupt or unsupported files.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
# The suffixes of the image files `read_image` decodes (every image folder and predict.py use this list).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def _open(path: Path, what: str, image_id: object) -> Image.Image:
    """Open and fully decode `path`, turning PIL's errors into a BadImageError naming the file."""
    if not path.is_file():
        raise BadImageError(
            f"{path}: {what} of image id {image_id} not found; check the folder setting or remove the entry"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's EXIF / decompression warnings; real problems raise below
            image = Image.open(path)
            image.load()
    except _DECODE_ERRORS as e:
        raise BadImageError(
            f"{path}: {what} of image id {image_id} cannot be decoded ({type(e).__name__}: {e}); the file is "
            "truncated or corrupt, re-download or remove it"
        ) from None
    return image


def to_rgb(image: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 RGB from any PIL mode: gray, palette, RGBA (alpha dropped), CMYK, 16-bit (scaled to 8)."""
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float32)
        gray = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.array(image)  # a writable copy (np.asarray of a PIL image is read-only)


def read_image(path: str | Path, image_id: object, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Read an image as (H, W, 3) uint8 RGB with its EXIF orientation applied.

    A missing or undecodable file is a BadImageError; a size different from `expected_hw` (the JSON's
    height/width) is a DataError naming both sizes.
    """
    path = Path(path)
    image = _open(path, "image file", image_id)
    try:
        image = ImageOps.exif_transpose(image)
    except _DECODE_ERRORS:
        pass  # an unreadable EXIF block: keep the stored orientation
    array = to_rgb(image)
    if expected_hw is not None and tuple(array.shape[:2]) != tuple(expected_hw):
        raise DataError(
            f"{path}: image id {image_id} is {array.shape[0]}x{array.shape[1]} (HxW, after EXIF orientation) but "
            f"the annotation file says {expected_hw[0]}x{expected_hw[1]}; fix the image entry's height/width or "
            "replace the file"
        )
    return array


def image_size_mismatch(path: str | Path, expected_hw: tuple[int, int]) -> tuple[int, int] | None:
    """The (H, W) of an image file after EXIF orientation if it differs from `expected_hw`, else None.

    Read from the file's header (size and EXIF orientation, no pixel data: ~0.1 ms per COCO JPEG); only a
    size that differs by a transpose (an EXIF rotation the header may not show) is confirmed by decoding.
    A missing or unreadable file gives None: `read_image` reports it when the image is loaded.
    """
    path, expected = Path(path), tuple(expected_hw)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as image:
                width, height = image.size
                orientation = Image.Image.getexif(image).get(0x0112, 1)  # from the header only (no load)
    except (*_DECODE_ERRORS, AttributeError, KeyError, TypeError):
        return None
    size = (width, height) if orientation in (5, 6, 7, 8) else (height, width)
    if size == expected:
        return None
    if size[::-1] == expected:  # the orientation decides: decode as `read_image` does
        try:
            size = tuple(read_image(path, None).shape[:2])
        except DataError:
            return None
        return None if size == expected else size
    return size


def read_label_png(path: str | Path, image_id: object) -> np.ndarray:
    """Read a label PNG with one class index per pixel (8- or 16-bit single channel) as (H, W) int64."""
    path = Path(path)
    image = _open(path, "label file", image_id)
    if image.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
        raise DataError(
            f"{path}: label PNG of image id {image_id} is mode {image.mode}; it must hold one class index per pixel "
            "(8- or 16-bit single channel)"
        )
    return np.asarray(image).astype(np.int64)


def rgb2id(color: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) int32 segment ids, id = R + 256 G + 256^2 B (panopticapi's formula)."""
    color = color.astype(np.int32)
    return color[..., 0] + 256 * color[..., 1] + 256 * 256 * color[..., 2]


def id2rgb(ids: np.ndarray) -> np.ndarray:
    """(H, W) segment ids < 2^24 -> (H, W, 3) uint8, the inverse of rgb2id (how panoptic PNGs are written)."""
    ids = ids.astype(np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // (256 * 256)], axis=-1).astype(np.uint8)


def read_panoptic_png(path: str | Path, image_id: object) -> np.ndarray:
    """Read a COCO panoptic PNG (RGB-encoded segment ids) as (H, W) int32 ids, 0 = void."""
    path = Path(path)
    image = _open(path, "label file", image_id)
    if image.mode not in ("RGB", "RGBA"):
        raise DataError(f"{path}: panoptic PNG of image id {image_id} is mode {image.mode}; it must be RGB-encoded ids")
    return rgb2id(np.asarray(image.convert("RGB")))
