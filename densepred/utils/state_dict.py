"""State-dict steps shared by the checkpoint converters: renaming keys with ordered regex rules, and packing
separate q / k / v projections into one."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

import torch

Rule = tuple[str, "str | Callable[[re.Match], str]"]


def rename_key(key: str, rules: Sequence[Rule], error: str | None = None) -> str:
    """The new name of `key`: the first rule whose pattern matches all of it gives it (a replacement string
    with `\\1` groups, or a function of the match). No rule matching raises `ValueError(error)`; without
    `error` the key is kept as it is."""
    for pattern, replacement in rules:
        match = re.fullmatch(pattern, key)
        if match:
            return replacement(match) if callable(replacement) else match.expand(replacement)
    if error is not None:
        raise ValueError(error)
    return key


def pack_qkv(parts: Mapping[str, torch.Tensor], error: str) -> torch.Tensor:
    """Separate query / key / value projection weights (or biases) `{"q": .., "k": .., "v": ..}` -> one
    packed tensor, concatenated in q, k, v order along dim 0 (timm's `qkv`, torch's `in_proj_*`).
    A missing or extra part raises `ValueError(error)`."""
    if sorted(parts) != ["k", "q", "v"]:
        raise ValueError(error)
    return torch.cat([parts["q"], parts["k"], parts["v"]], 0)
