"""Row validation: rows → records of one format, or a named error.

Every source yields `(location, row)` pairs; `validate_rows` turns them into records through the format's
converter (formats/), raising `DataError` naming the location of a bad row, or skipping and counting it by
reason. A line a reader could not decode arrives as an `Unreadable` row and is counted like any other.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from ftl.errors import DataError


class Unreadable(ValueError):
    """A line a reader could not turn into a row (not UTF-8, not JSON); `reason` is what skipped rows are
    counted by, the message adds where exactly (column, byte)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason} ({detail})")
        self.reason = reason


@dataclass
class RowReport:
    read: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    first_skipped: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"read": self.read, "kept": self.kept, "skipped": dict(self.skipped),
                "first_skipped": self.first_skipped}

    def add(self, other: "RowReport") -> None:
        self.read += other.read
        self.kept += other.kept
        self.skipped.update(other.skipped)
        self.first_skipped += other.first_skipped[: max(0, 5 - len(self.first_skipped))]

    def rejections(self) -> str:
        """Why rows were skipped, for an error: the counts by reason and the first offending lines."""
        reasons = ", ".join(f"{reason} ({count} row{'s' if count > 1 else ''})"
                            for reason, count in self.skipped.most_common())
        return f"skipped: {reasons}; first: " + "; ".join(self.first_skipped[:3])


def record_kind(record: dict) -> str:
    """The kind of a validated record, from its fields (a stage may get several kinds from mixed sources)."""
    for name, kind in (("messages", "chat"), ("chosen", "preference"), ("completion", "prompt_completion"),
                       ("label", "classification"), ("text", "text"), ("prompt", "prompts")):
        if name in record:
            return kind
    raise ValueError(f"not a record: {sorted(record)}")


def validate_rows(rows: Iterable[tuple[str, Any]], convert: Callable[[Any], dict], fmt: str, on_bad_row: str,
                  report: RowReport) -> Iterator[dict]:
    """convert(row) → record, raising ValueError for a bad row; `fmt` names the format in errors."""
    for location, row in rows:
        report.read += 1
        try:
            if isinstance(row, Unreadable):
                raise row
            if not isinstance(row, dict):
                raise ValueError(f"expected an object with fields, got {type(row).__name__}")
            record = convert(row)
        except ValueError as err:
            if on_bad_row == "error":
                raise DataError(f"{location}: {err} (format '{fmt}'; set data.on_bad_row: skip "
                                "to skip and count bad rows)") from None
            report.skipped[getattr(err, "reason", str(err))] += 1
            if len(report.first_skipped) < 5:
                report.first_skipped.append(f"{location}: {err}")
            continue
        report.kept += 1
        yield record
