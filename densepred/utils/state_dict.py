"""Rename checkpoint keys with ordered (regex, replacement) rules (the model converters' shared step)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

Rule = tuple[str, "str | Callable[[re.Match], str]"]


def rename_key(key: str, rules: Sequence[Rule], source: str, expected: str) -> str:
    """The first rule whose pattern matches all of `key` gives its new name; no match is an error naming
    `source` and the checkpoint class `expected`."""
    for pattern, replacement in rules:
        match = re.fullmatch(pattern, key)
        if match:
            return replacement(match) if callable(replacement) else match.expand(replacement)
    raise ValueError(f"{source}: unexpected weight {key!r}; is this a {expected} checkpoint?")
