"""The classes of a transformers MaskFormer / Mask2Former checkpoint, from its config.json `id2label`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def class_names(config: Mapping[str, Any]) -> list[str]:
    """The class names of config.json's `id2label`, in id order; the ids must be 0..N-1 (JSON keys are
    strings, "0", "1", ...). A missing or empty `id2label`, or a gap in the ids, is a ValueError."""
    if not config.get("id2label"):
        raise ValueError("config.json has no id2label: the class names (and their number) are needed")
    id2label = {int(k): v for k, v in config["id2label"].items()}
    num_classes = len(id2label)
    if sorted(id2label) != list(range(num_classes)):
        raise ValueError(f"config.json id2label must have the ids 0..{num_classes - 1}, got {sorted(id2label)}")
    return [id2label[i] for i in range(num_classes)]
