"""A folder of images to predict on (no annotations): every image file of the folder, in name order.

An image that cannot be read (missing, truncated, corrupt) does not stop a prediction run: its sample is
marked `skipped` with the reason, and `ImageFolderCollate` leaves it out of the batch and lists it under
the batch's "skipped", for the prediction writer to report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from .collate import Collate
from .errors import DataError
from .image_io import IMAGE_SUFFIXES, read_image
from .transforms import resize


def list_images(folder: str | Path) -> list[Path]:
    """The image files (`IMAGE_SUFFIXES`, any case) directly in `folder`, sorted by name."""
    return sorted(p for p in Path(folder).expanduser().iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


class ImageFolderDataset(Dataset):
    """Every image of `folder`, resized as for evaluation (short side `short_side`, long side at most
    `max_size`), as samples for `Collate`: {"image": (3, h, w) uint8, "target": {"masks": (0, h, w)},
    "image_id": the position in `files`, "orig_size": (H, W), "issues": []}. An unreadable file gives
    {"image_id", "skipped": the reason} instead (`ImageFolderCollate` takes it out of the batch).
    """

    def __init__(self, folder: str | Path, short_side: int = 800, max_size: int = 1333) -> None:
        self.folder = Path(folder).expanduser()
        if not self.folder.is_dir():
            raise DataError(f"{self.folder}: not a folder of images")
        self.files = list_images(self.folder)
        if not self.files:
            raise DataError(f"{self.folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        self.transform = resize(int(short_side), int(max_size))

    def __len__(self) -> int:
        return len(self.files)

    def original(self, index: int) -> torch.Tensor:
        """The image file `files[index]` as read: (3, H, W) uint8 RGB, EXIF orientation applied. A file
        that cannot be read raises a DataError (a BadImageError) saying why."""
        path = self.files[index]
        return torch.from_numpy(read_image(path, path.name)).permute(2, 0, 1).contiguous()

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            image = self.original(index)
        except DataError as error:
            return {"image_id": index, "skipped": str(error)}
        resized = self.transform(tv_tensors.Image(image)).as_subclass(torch.Tensor)
        return {
            "image": resized,
            "target": {"masks": torch.zeros(0, *resized.shape[1:], dtype=torch.bool)},
            "image_id": index,
            "orig_size": tuple(image.shape[1:]),
            "issues": [],
        }


class ImageFolderCollate:
    """`Collate` for `ImageFolderDataset` samples: the readable ones batched as usual, the skipped ones left
    out and listed under "skipped": [(image_id, reason)]. A batch of only unreadable images is empty
    (images (0, 3, s, s)), which the model predicts nothing for."""

    def __init__(self, size_divisibility: int = 32) -> None:
        self.size_divisibility = size_divisibility
        self.collate = Collate(size_divisibility=size_divisibility)

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        readable = [s for s in samples if "skipped" not in s]
        if readable:
            batch = self.collate(readable)
        else:
            step = self.size_divisibility
            batch = {
                "images": torch.zeros(0, 3, step, step, dtype=torch.uint8),
                "targets": [],
                "image_ids": [],
                "image_sizes": [],
                "orig_sizes": [],
                "data_issues": [],
            }
        batch["skipped"] = [(int(s["image_id"]), str(s["skipped"])) for s in samples if "skipped" in s]
        return batch
