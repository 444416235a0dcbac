"""The evaluator contract, DDP gathering by image id, and the small helpers every evaluator shares.

Every evaluator keeps one small result per image (statistics, encoded predictions) keyed by image id.
`evaluate()` gathers them once from every rank with `all_gather_object`, keeps one copy per image id
(Lightning's DistributedSampler pads the last batch by repeating images on some ranks), orders them by
image id, and computes the metrics on every rank, so every rank returns the same dict and that dict
equals a single-process evaluation of the same images.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np
import torch
import torch.distributed as dist

T = TypeVar("T")


@runtime_checkable
class Evaluator(Protocol):
    """What the LightningModule calls during validation.

    reset() at the start of validation, process() after each batch, evaluate() once at the end on every
    rank (it gathers across ranks), then table() to print and write(folder) on every rank to export.
    """

    def reset(self) -> None: ...

    def process(self, image_ids: Sequence[int], predictions: Sequence[Mapping[str, Any]]) -> None: ...

    def evaluate(self) -> dict[str, float]: ...

    def table(self) -> str: ...

    def write(self, folder: str | os.PathLike) -> list[Path]: ...


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    """True on rank 0, and in a single process."""
    return not is_distributed() or dist.get_rank() == 0


def gather_by_image_id(local: Mapping[int, T]) -> dict[int, T]:
    """Merge the per-image results of every rank: one entry per image id, in ascending id order.

    A collective: under DDP every rank must call it. An image processed on several ranks (sampler
    padding) keeps the copy of the lowest rank; the copies are equal since they come from the same input.
    """
    parts: list[Mapping[int, T]] = [local]
    if is_distributed():
        parts = [{} for _ in range(dist.get_world_size())]
        dist.all_gather_object(parts, dict(local))
    merged: dict[int, T] = {}
    for part in parts:
        for image_id, value in part.items():
            merged.setdefault(image_id, value)
    return dict(sorted(merged.items()))


def dataset_id_lookup(contiguous_to_dataset_id: Mapping[int, int] | Sequence[int]) -> dict[int, int]:
    """Normalise `contiguous_to_dataset_id` (a list indexed by contiguous id, or a dict) to a dict."""
    if isinstance(contiguous_to_dataset_id, Mapping):
        return {int(k): int(v) for k, v in contiguous_to_dataset_id.items()}
    return {i: int(v) for i, v in enumerate(contiguous_to_dataset_id)}


def map_label(lookup: Mapping[int, int], label: int, image_id: int) -> int:
    """Dataset category id of a contiguous label, or a ValueError naming the image and the valid range."""
    try:
        return lookup[int(label)]
    except KeyError:
        raise ValueError(
            f"image {image_id}: predicted label {int(label)} is not in contiguous_to_dataset_id "
            f"(contiguous ids {min(lookup)}..{max(lookup)}); the head's num_classes must match the dataset's"
        ) from None


def to_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """A tensor (any device) or array as a numpy array."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def percent(value: float) -> float:
    """A fraction as a percentage; COCOeval's -1 ("no ground truth") and NaN become NaN."""
    value = float(value)
    return 100.0 * value if value >= 0 else float("nan")
