"""Bad samples as data: error records that travel down a pipeline, and their counts.

A bad sample does not stop a batch stage: it becomes an *error record* (a dict with
``__error__`` = the reason, the sample key, the shard URL and a detail) that can cross DataLoader
worker boundaries; :class:`SampleErrors` counts records by reason and keeps the first few as
examples for the stage's report.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

ERROR_FIELD = "__error__"


def error_record(reason: str, key: str = "", url: str = "", detail: str = "") -> dict[str, str]:
    return {ERROR_FIELD: reason, "__key__": key, "__url__": url, "detail": detail}


@dataclass
class SampleErrors:
    """Counts of skipped samples by reason, with the first few offending keys per reason."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    unreadable_shards: list[str] = field(default_factory=list)
    max_examples: int = 5

    def add(self, record: dict[str, str]) -> None:
        reason = record[ERROR_FIELD]
        self.counts[reason] += 1
        if reason == "unreadable_shard":
            self.unreadable_shards.append(record["__url__"])
        examples = self.examples.setdefault(reason, [])
        if len(examples) < self.max_examples:
            examples.append({k.strip("_"): v for k, v in record.items() if k != ERROR_FIELD})

    def update(self, other: SampleErrors) -> None:
        """Add the counts and examples of ``other`` (e.g. per-shard errors into a total)."""
        self.counts.update(other.counts)
        self.unreadable_shards.extend(other.unreadable_shards)
        for reason, examples in other.examples.items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(examples[: self.max_examples - len(mine)])

    @property
    def total(self) -> int:
        """Bad samples (unreadable shards are counted apart: their sample count is unknown)."""
        return sum(v for k, v in self.counts.items() if k != "unreadable_shard")

    def summary(self) -> str:
        if not self.counts:
            return "no bad samples"
        parts = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.counts.items()))
        shards = f", {len(self.unreadable_shards)} unreadable shards" if self.unreadable_shards else ""
        return f"skipped {self.total} bad samples{shards} ({parts})"

    def report_lines(self) -> list[str]:
        lines = [self.summary()]
        for reason in sorted(self.examples):
            lines.append(f"  {reason}: {self.counts[reason]}")
            for ex in self.examples[reason]:
                where = f"sample '{ex['key']}' in {ex['url']}" if ex["key"] else ex["url"]
                lines.append(f"    {where}: {ex['detail']}")
        return lines


def drop_errors(samples: Iterable[dict[str, Any]], errors: SampleErrors) -> Iterator[dict[str, Any]]:
    """Yield the good samples; count the error records into ``errors``."""
    for sample in samples:
        if ERROR_FIELD in sample:
            errors.add(sample)
        else:
            yield sample
