"""Batching: pad images to a common size divisible by 32, pad targets' masks. Images stay raw pixels: the
model normalises them (`Segmenter.preprocess`, with its backbone's pixel statistics)."""

from __future__ import annotations

import math
from typing import Any

import torch


class Collate:
    """Collate samples into the batch of docs/architecture.md.

    Images keep their raw pixel values (uint8, a quarter of float32's host-to-device traffic; float 0-255
    if a transform made them float) and are padded with zeros bottom/right to the batch's largest size
    rounded up to `size_divisibility`, or to `fixed_size` (LSJ). The model normalises them and sets the
    padding (outside `image_sizes`) to 0, the mean color. Targets stay one dict per image, their masks
    padded with False and `sem_seg` with `ignore_index`. Data issues met while loading are passed on under
    "data_issues" (the DataModule takes them out and reports them).
    """

    def __init__(
        self, size_divisibility: int = 32, fixed_size: tuple[int, int] | None = None, ignore_index: int = 255
    ) -> None:
        self.size_divisibility = size_divisibility
        self.fixed_size = tuple(fixed_size) if fixed_size is not None else None
        self.ignore_index = ignore_index

    def padded_size(self, sizes: list[tuple[int, int]]) -> tuple[int, int]:
        height = max(h for h, _ in sizes)
        width = max(w for _, w in sizes)
        if self.fixed_size is not None:
            height, width = max(height, self.fixed_size[0]), max(width, self.fixed_size[1])
        step = self.size_divisibility
        return math.ceil(height / step) * step, math.ceil(width / step) * step

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        sizes = [tuple(s["image"].shape[1:]) for s in samples]
        pad_h, pad_w = self.padded_size(sizes)
        raw = all(s["image"].dtype == torch.uint8 for s in samples)
        images = torch.zeros(len(samples), 3, pad_h, pad_w, dtype=torch.uint8 if raw else torch.float32)
        targets = []
        for i, (sample, (h, w)) in enumerate(zip(samples, sizes, strict=True)):
            images[i, :, :h, :w] = sample["image"]
            target = dict(sample["target"])
            if "masks" in target:  # boxes (detection) need no padding: it is bottom / right
                masks = torch.zeros(target["masks"].shape[0], pad_h, pad_w, dtype=torch.bool)
                masks[:, :h, :w] = target["masks"]
                target["masks"] = masks
            if "sem_seg" in target:
                sem_seg = torch.full((pad_h, pad_w), self.ignore_index, dtype=torch.long)
                sem_seg[:h, :w] = target["sem_seg"]
                target["sem_seg"] = sem_seg
            targets.append(target)
        return {
            "images": images,
            "targets": targets,
            "image_ids": [s["image_id"] for s in samples],
            "image_sizes": sizes,
            "orig_sizes": [tuple(s["orig_size"]) for s in samples],
            "data_issues": [issue for s in samples for issue in s["issues"]],
        }
