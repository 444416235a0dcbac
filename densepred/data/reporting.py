"""Counting and reporting of data issues (skipped images, dropped annotations) without flooding the log."""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Iterable

logger = logging.getLogger(__name__)

# One issue: (reason, message). Reasons are short keys ("missing image", "unknown category", ...) that are
# counted; messages name the file and id and are kept as examples.
Issue = tuple[str, str]


class IssueReport:
    """Accumulates issues and logs them as one summary (counts per reason and a few examples each)."""

    def __init__(self, max_examples: int = 3) -> None:
        self.max_examples = max_examples
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = defaultdict(list)

    def extend(self, issues: Iterable[Issue]) -> None:
        for reason, message in issues:
            self.counts[reason] += 1
            if len(self.examples[reason]) < self.max_examples:
                self.examples[reason].append(message)

    def __len__(self) -> int:
        return sum(self.counts.values())

    def summary(self, header: str) -> str:
        """Multi-line text: `header`, then one line per reason with its count and examples."""
        lines = [f"{header}: {len(self)} data issue(s)"]
        for reason, count in sorted(self.counts.items()):
            lines.append(f"  {reason}: {count}, e.g. " + " | ".join(self.examples[reason]))
        return "\n".join(lines)

    def log(self, header: str) -> str | None:
        """Log the summary as one warning and return its text (None, and nothing logged, if no issues)."""
        if not self.counts:
            return None
        text = self.summary(header)
        logger.warning(text)
        return text

    def flush(self, header: str) -> str | None:
        """`log`, then clear the counts."""
        text = self.log(header)
        self.counts.clear()
        self.examples.clear()
        return text
