"""Training and evaluation transforms on torchvision.transforms.v2 and tv_tensors.

Inputs are dicts {"image": tv_tensors.Image uint8 (3, H, W), and tv_tensors.Mask entries ("segment_map",
"masks", "sem_seg")}; v2 moves every Mask with the image (nearest-neighbour resizing). Transforms never
pad: the collate function pads each batch (to a multiple of 32, or to a fixed size for LSJ) and records
a padding mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from .errors import DataError


class LargeScaleJitter(v2.Transform):
    """Resize to a random `scale` of a `size` x `size` target (aspect kept), then a random crop of at most `size`.

    Equivalent to v2.ScaleJitter followed by a random crop, but the crop window is chosen first and only
    that part of the input is resized (one `resized_crop`), so an upscaled image is never materialised in
    full: at scale 2 of a 1024 target this resizes a quarter of the pixels.
    """

    def __init__(self, size: int, scale_range: Sequence[float] = (0.1, 2.0), antialias: bool = True) -> None:
        super().__init__()
        self.size, self.scale_range, self.antialias = size, tuple(scale_range), antialias

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        low, high = self.scale_range
        scale = low + float(torch.rand(())) * (high - low)
        ratio = min(self.size / height, self.size / width) * scale
        out_h, out_w = max(1, int(height * ratio)), max(1, int(width * ratio))
        crop_h, crop_w = min(self.size, out_h), min(self.size, out_w)
        # The crop window in input pixels (rounded), placed uniformly at random.
        src_h = min(height, max(1, round(crop_h * height / out_h)))
        src_w = min(width, max(1, round(crop_w * width / out_w)))
        top = int(torch.randint(height - src_h + 1, ()))
        left = int(torch.randint(width - src_w + 1, ()))
        return {"top": top, "left": left, "height": src_h, "width": src_w, "size": [crop_h, crop_w]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return F.resized_crop(inpt, **params, antialias=self.antialias)


class RandomCropUpTo(v2.Transform):
    """A random crop of at most `size` x `size` (smaller inputs keep their size along that side)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        crop_h, crop_w = min(self.size, height), min(self.size, width)
        top = int(torch.randint(height - crop_h + 1, ()))
        left = int(torch.randint(width - crop_w + 1, ()))
        return {"top": top, "left": left, "height": crop_h, "width": crop_w}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return F.crop(inpt, **params)


class RandomSizeCrop(v2.Transform):
    """A crop of random height in [min_size, min(H, max_size)] and width in [min_size, min(W, max_size)] at a
    random place (DETR's `RandomSizeCrop`)."""

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__()
        self.min_size, self.max_size = min_size, max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        crop_h = int(torch.randint(min(self.min_size, height), min(height, self.max_size) + 1, ()))
        crop_w = int(torch.randint(min(self.min_size, width), min(width, self.max_size) + 1, ()))
        top = int(torch.randint(height - crop_h + 1, ()))
        left = int(torch.randint(width - crop_w + 1, ()))
        return {"top": top, "left": left, "height": crop_h, "width": crop_w}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return F.crop(inpt, **params)


def detr(
    short_sides: Sequence[int] = tuple(range(480, 801, 32)),
    max_size: int = 1333,
    crop_short_sides: Sequence[int] = (400, 500, 600),
    crop: Sequence[int] = (384, 600),
) -> v2.Compose:
    """DETR / Deformable DETR's COCO recipe: flip, then either a random short side (480..800, long side at most
    1333) or, half the time, a random short side of 400 / 500 / 600, a random crop of 384..600 and the first."""
    resize = v2.RandomShortestSize(list(short_sides), max_size=max_size)
    cropped = v2.Compose([v2.RandomShortestSize(list(crop_short_sides)), RandomSizeCrop(*crop), resize])
    return v2.Compose([v2.RandomHorizontalFlip(), v2.RandomChoice([resize, cropped])])


def lsj(size: int = 1024, scale: Sequence[float] = (0.1, 2.0)) -> v2.Compose:
    """Large-scale jitter (Mask2Former's COCO recipe): flip, random scale of a size x size target, crop."""
    return v2.Compose([v2.RandomHorizontalFlip(), LargeScaleJitter(size, scale)])


def ade(crop: int = 512, short_sides: Sequence[int] | None = None, max_size: int = 2048) -> v2.Compose:
    """Mask2Former's ADE20K recipe: random short side (0.5x to 2x of the crop), crop, photometric jitter, flip."""
    if short_sides is None:
        short_sides = [int(crop * s / 10) for s in range(5, 21)]
    return v2.Compose(
        [
            v2.RandomShortestSize(list(short_sides), max_size=max_size),
            RandomCropUpTo(crop),
            v2.RandomPhotometricDistort(),
            v2.RandomHorizontalFlip(),
        ]
    )


def resize(short: int = 800, max_size: int = 1333) -> v2.Compose:
    """Evaluation resize: short side `short`, long side at most `max_size`."""
    return v2.Compose([v2.Resize(short, max_size=max_size)])


RECIPES = {"lsj": lsj, "ade": ade, "resize": resize, "detr": detr}


def build_transform(recipe: str, **kwargs: Any) -> v2.Compose:
    """A recipe by name ("lsj", "ade", "resize", "detr") with its sizes, e.g. build_transform("lsj", size=128)."""
    if recipe not in RECIPES:
        raise DataError(f"transform recipe {recipe!r} is unknown; choose one of {sorted(RECIPES)}")
    try:
        return RECIPES[recipe](**kwargs)
    except TypeError as e:
        raise DataError(f"transform recipe {recipe!r}: bad settings {kwargs} ({e})") from None


def recipe_fixed_size(recipe: str, **kwargs: Any) -> tuple[int, int] | None:
    """The fixed batch size a recipe pads to (LSJ: size x size), or None (pad to the batch maximum)."""
    if recipe == "lsj":
        size = kwargs.get("size", 1024)
        return (size, size)
    return None
