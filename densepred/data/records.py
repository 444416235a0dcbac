"""Compact storage of the per-image index, safe to share with forked DataLoader workers.

A list of Python dicts (one per image, holding its annotations) is touched by reference counting in every
worker, so copy-on-write slowly copies it into each worker's memory. Here each record is pickled into one
numpy byte buffer with an offsets array (the approach of detectron2's `DatasetFromList(serialize=True)`),
so a worker only reads it.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from typing import Any

import numpy as np


class SerializedList:
    """An immutable list whose items are stored pickled in a single numpy buffer."""

    def __init__(self, items: Iterable[Any]) -> None:
        blobs = [np.frombuffer(pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL), dtype=np.uint8) for item in items]
        self._ends = np.cumsum([len(b) for b in blobs], dtype=np.int64)
        self._buffer = np.concatenate(blobs) if blobs else np.zeros(0, dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index: int) -> Any:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records")
        index %= len(self)
        start = 0 if index == 0 else int(self._ends[index - 1])
        return pickle.loads(memoryview(self._buffer[start : int(self._ends[index])]))

    @property
    def nbytes(self) -> int:
        return self._buffer.nbytes + self._ends.nbytes
