"""Plain-text tables for printing evaluation results at the end of validation."""

from __future__ import annotations

import math
from collections.abc import Sequence


def format_value(value: object, digits: int = 2) -> str:
    """Floats with `digits` decimals ("nan" for undefined), everything else as str."""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]], title: str | None = None) -> str:
    """A Markdown-style table: first column left-aligned, the others right-aligned.

    >>> print(format_table(["", "PQ"], [["All", 41.5]]))
    |     |    PQ |
    |:----|------:|
    | All | 41.50 |
    """
    cells = [[format_value(v) for v in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths, strict=True))]
        return "| " + " | ".join(parts) + " |"

    rule = "|" + "|".join(":" + "-" * (w + 1) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    lines = ([title] if title else []) + [line([str(h) for h in headers]), rule] + [line(r) for r in cells]
    return "\n".join(lines)
